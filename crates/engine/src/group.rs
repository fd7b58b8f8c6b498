//! Forming and running a tensor-parallel group of processes.
//!
//! The leader binds the rendezvous address, starts (or waits for) the workers, loads its own
//! shard while they load theirs, and then waits for every worker's `ready` (or its `error`,
//! which it reports). Local workers are children of the leader: they die with it
//! (`PR_SET_PDEATHSIG` on Linux), see EOF if it closes their link, and are killed and reaped
//! when the [`LocalWorkers`] guard drops, so no process outlives the group on any exit path.

use std::net::TcpListener;
use std::process::{Child, Command};
use std::sync::Arc;
use std::time::Duration;

use candle_core::Device;
use dsvl_models::llm::{ContiguousKv, DeepSeekLlm, KvStore, ShardRunner};
use dsvl_models::ModelError;
use dsvl_parallel::rendezvous::{self, GroupSpec};
use dsvl_parallel::{LinkSet, Message};
use serde_json::json;

use crate::collectives;

/// Worker processes started by this leader; killed and reaped on drop.
#[derive(Default)]
pub struct LocalWorkers {
    children: Vec<Child>,
}

impl LocalWorkers {
    /// Starts one process per command.
    pub fn spawn(commands: Vec<Command>) -> std::io::Result<Self> {
        let mut me = Self::default();
        for mut c in commands {
            me.children.push(c.spawn()?);
        }
        Ok(me)
    }

    /// Returns a description of the first worker that has exited, if any.
    pub fn exited(&mut self) -> Option<String> {
        self.children.iter_mut().find_map(|c| match c.try_wait() {
            Ok(Some(status)) => Some(format!("worker pid {} exited with {status}", c.id())),
            _ => None,
        })
    }

    /// Waits up to `grace` for every worker to exit on its own, then kills the rest.
    pub fn wait_or_kill(&mut self, grace: Duration) {
        let deadline = std::time::Instant::now() + grace;
        for c in &mut self.children {
            while std::time::Instant::now() < deadline {
                if matches!(c.try_wait(), Ok(Some(_))) {
                    break;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        self.kill_all();
    }

    fn kill_all(&mut self) {
        for c in &mut self.children {
            if matches!(c.try_wait(), Ok(None)) {
                let _ = c.kill();
            }
            let _ = c.wait();
        }
        self.children.clear();
    }
}

impl Drop for LocalWorkers {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// Makes the calling process receive SIGKILL when its parent dies (Linux), so a worker never
/// outlives a leader that was killed without cleaning up. No-op elsewhere.
pub fn die_with_parent() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number and has no memory effects.
    unsafe {
        libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        // The parent may already be gone (re-parented to init): exit rather than linger.
        if libc::getppid() == 1 {
            std::process::exit(1);
        }
    }
}

/// Identifies what a group serves (model source, dtype, config hash); ranks with different
/// tags refuse to form a group.
pub fn group_tag(ckpt: &dsvl_models::checkpoint::Checkpoint, dtype: &str) -> String {
    let config = serde_json::to_vec(ckpt.config()).unwrap_or_default();
    format!("{}|{dtype}|{}", ckpt.source(), &blake3::hash(&config).to_hex()[..16])
}

/// Timeouts of a group.
#[derive(Debug, Clone, Copy)]
pub struct GroupTimeouts {
    /// Workers joining the rendezvous.
    pub rendezvous: Duration,
    /// Every rank loading its shard.
    pub load: Duration,
    /// Any collective once running.
    pub collective: Duration,
}

impl Default for GroupTimeouts {
    fn default() -> Self {
        Self {
            rendezvous: Duration::from_secs(120),
            load: Duration::from_secs(1800),
            collective: Duration::from_secs(30),
        }
    }
}

/// Leader side: rendezvous on `listener` (sending `extra`, e.g. the KV pool geometry, to every
/// worker), load the local shard and its KV store with `load`, wait for every worker to be
/// ready, and return the runner.
pub fn lead_group(
    listener: &TcpListener,
    spec: &GroupSpec,
    timeouts: GroupTimeouts,
    mut extra: serde_json::Value,
    device: &Device,
    load: impl FnOnce() -> Result<(DeepSeekLlm, Box<dyn KvStore + Send>), ModelError>,
) -> Result<ShardRunner, ModelError> {
    collectives::prepare_welcome(device, spec.world_size, &mut extra)?;
    let links = Arc::new(rendezvous::lead(listener, spec, extra.clone())?);
    let (model, kv) = match load() {
        Ok(m) => m,
        Err(e) => {
            links.shutdown();
            return Err(e);
        }
    };
    if let LinkSet::Leader { workers } = &*links {
        for w in workers {
            w.expect("ready", "waiting for the worker to load its shard", Some(timeouts.load))?;
        }
    }
    let comm = collectives::communicator(device, &links, timeouts.collective, &extra)
        .inspect_err(|_| links.shutdown())?;
    Ok(ShardRunner::with_communicator(model, kv, links, comm))
}

/// A [`lead_group`] loader for the simple contiguous KV store (`dsvl generate`).
pub fn contiguous_kv(
    model: DeepSeekLlm,
) -> Result<(DeepSeekLlm, Box<dyn KvStore + Send>), ModelError> {
    Ok((model, Box::new(ContiguousKv::new())))
}

/// Worker side: join the leader, load the shard and KV store with `load` (given the leader's
/// `extra`), reporting failure to the leader, then execute plans until the leader shuts the
/// group down.
pub fn run_worker(
    spec: &GroupSpec,
    timeouts: GroupTimeouts,
    device: &Device,
    load: impl FnOnce(&serde_json::Value) -> Result<(DeepSeekLlm, Box<dyn KvStore + Send>), ModelError>,
) -> Result<(), ModelError> {
    let (links, extra) = rendezvous::join(spec)?;
    let links = Arc::new(links);
    let LinkSet::Worker { leader, .. } = &*links else {
        unreachable!("join returns a worker link set")
    };
    let (model, kv) = match load(&extra) {
        Ok(m) => m,
        Err(e) => {
            let _ = leader.send(
                &Message::new(json!({"kind": "error", "reason": e.to_string()})),
                "report load failure",
            );
            return Err(e);
        }
    };
    leader.send(&Message::new(json!({"kind": "ready"})), "ready")?;
    let comm = collectives::communicator(device, &links, timeouts.collective, &extra)?;
    ShardRunner::with_communicator(model, kv, links.clone(), comm).serve()
}
