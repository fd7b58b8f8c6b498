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
use dsvl_models::llm::{DeepSeekLlm, PagedKv, PagedKvConfig, ShardRunner};
use dsvl_models::ModelError;
use dsvl_parallel::rendezvous::{self, GroupSpec};
use dsvl_parallel::GroupKey;
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

/// How a process starts the other ranks of its node: the one launcher of every binary that
/// forms groups (`dsvl generate`, the decoder service that `dsvl up` starts, the benchmarks).
///
/// One device convention: each command carries the node's **base** device and the rank's
/// **local** rank (`--device`, `--local-rank`); the worker opens [`device_for`] of the two.
/// Every worker understands `--leader --rank --world-size --local-rank --device
/// --die-with-parent`, plus what `mode` and `extra` add.
#[derive(Debug, Clone)]
pub struct RankLaunch {
    /// The executable (usually `std::env::current_exe()`).
    pub program: std::path::PathBuf,
    /// Arguments that put it in worker mode (`rank-worker`, `--worker`, ...), first.
    pub mode: Vec<String>,
    /// The leader's rendezvous address.
    pub leader: String,
    /// Ranks in the group.
    pub world: usize,
    /// The node's base device.
    pub base_device: dsvl_core::DeviceSpec,
    /// Further arguments every rank gets (model, dtype, timeouts, tag).
    pub extra: Vec<String>,
    /// The group key, handed to each rank in its environment ([`GroupKey::ENV`]), never on
    /// its command line.
    pub key: Option<GroupKey>,
}

impl RankLaunch {
    /// Commands for ranks `first_rank + 1 .. first_rank + local` (the node's first rank is
    /// the calling process), each exiting with its parent.
    pub fn commands(&self, first_rank: usize, local: usize) -> Vec<Command> {
        (1..local)
            .map(|i| {
                let mut c = Command::new(&self.program);
                c.args(&self.mode);
                c.args(["--leader", &self.leader]);
                c.args(["--rank", &(first_rank + i).to_string()]);
                c.args(["--world-size", &self.world.to_string()]);
                c.args(["--local-rank", &i.to_string()]);
                c.args(["--device", &self.base_device.to_string()]);
                c.arg("--die-with-parent");
                c.args(&self.extra);
                match &self.key {
                    Some(k) => c.env(GroupKey::ENV, k.to_hex()),
                    None => c.env_remove(GroupKey::ENV),
                };
                c
            })
            .collect()
    }
}

/// The device of local rank `local_rank` on a node whose first rank uses `base`: consecutive
/// GPUs (`cuda:N+local_rank`), the CPU for every rank of a CPU group.
pub fn device_for(base: dsvl_core::DeviceSpec, local_rank: usize) -> dsvl_core::DeviceSpec {
    match base {
        dsvl_core::DeviceSpec::Cpu => dsvl_core::DeviceSpec::Cpu,
        dsvl_core::DeviceSpec::Cuda(n) => dsvl_core::DeviceSpec::Cuda(n + local_rank),
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
    load: impl FnOnce() -> Result<(DeepSeekLlm, PagedKv), ModelError>,
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

/// A [`lead_group`] / [`run_worker`] loader: the model with a KV pool of geometry `kv`.
pub fn with_kv_pool(
    model: DeepSeekLlm,
    kv: PagedKvConfig,
) -> Result<(DeepSeekLlm, PagedKv), ModelError> {
    let pool = model.kv_pool(kv)?;
    Ok((model, pool))
}

/// The KV pool geometry the leader put in its welcome (`{"kv": {...}}`), so every rank
/// allocates the same pool.
///
/// # Errors
/// A welcome without a well-formed `kv` entry.
pub fn kv_from_welcome(extra: &serde_json::Value) -> Result<PagedKvConfig, ModelError> {
    serde_json::from_value(extra["kv"].clone())
        .map_err(|e| ModelError::InvalidInput(format!("the leader sent no KV pool geometry: {e}")))
}

/// Worker side: join the leader, load the shard and KV store with `load` (given the leader's
/// `extra`), reporting failure to the leader, then execute plans until the leader shuts the
/// group down.
pub fn run_worker(
    spec: &GroupSpec,
    timeouts: GroupTimeouts,
    device: &Device,
    load: impl FnOnce(&serde_json::Value) -> Result<(DeepSeekLlm, PagedKv), ModelError>,
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

#[cfg(test)]
mod tests {
    use super::*;

    fn arg_after(cmd: &Command, flag: &str) -> Option<String> {
        let args: Vec<String> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
        args.iter().position(|a| a == flag).and_then(|i| args.get(i + 1).cloned())
    }

    /// Ranks 5..7 of the second node of a TP 8 group on `cuda:0`: each command carries the base
    /// device and its local rank, and the worker's device is counted once from them.
    #[test]
    fn one_device_convention() {
        let launch = RankLaunch {
            program: "dsvl-decoder".into(),
            mode: vec!["--worker".into()],
            leader: "leader:29500".into(),
            world: 8,
            base_device: dsvl_core::DeviceSpec::Cuda(0),
            extra: vec!["--dtype".into(), "bf16".into()],
            key: Some(GroupKey::random()),
        };
        let cmds = launch.commands(4, 4);
        assert_eq!(cmds.len(), 3);
        for (i, cmd) in cmds.iter().enumerate() {
            assert_eq!(cmd.get_args().next().unwrap(), "--worker", "the mode comes first");
            assert_eq!(arg_after(cmd, "--rank").unwrap(), (5 + i).to_string());
            assert_eq!(arg_after(cmd, "--world-size").unwrap(), "8");
            let base: dsvl_core::DeviceSpec = arg_after(cmd, "--device").unwrap().parse().unwrap();
            let local: usize = arg_after(cmd, "--local-rank").unwrap().parse().unwrap();
            assert_eq!(base, dsvl_core::DeviceSpec::Cuda(0), "the base device, not an offset one");
            assert_eq!(device_for(base, local), dsvl_core::DeviceSpec::Cuda(1 + i));
            assert_eq!(arg_after(cmd, "--dtype").unwrap(), "bf16");
            let key = launch.key.as_ref().unwrap().to_hex();
            assert!(cmd.get_args().all(|a| a.to_string_lossy() != key), "not on the command line");
            let env: Vec<_> = cmd.get_envs().collect();
            assert!(env
                .iter()
                .any(|(k, v)| *k == GroupKey::ENV && v.is_some_and(|v| v == key.as_str())));
        }
        assert_eq!(device_for(dsvl_core::DeviceSpec::Cpu, 3), dsvl_core::DeviceSpec::Cpu);
    }
}
