//! The decoder's model thread: owns the [`ShardRunner`] (and so the rank's communicator, which
//! must not leave its thread), runs the [`Scheduler`] step after step while there is work, and
//! takes new requests from a channel between steps. While idle it checks that every worker
//! rank is still connected, so a dead rank is noticed without traffic.
//!
//! When a step fails (a rank died, a collective timed out) every stream gets
//! [`Failure::Unavailable`], the engine marks itself dead and its thread returns the error: the
//! group is unusable and the service must exit so the orchestrator recreates it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use dsvl_core::watchdog::Watchdog;
use std::time::{Duration, Instant};

use dsvl_models::llm::ShardRunner;
use dsvl_models::ModelError;

use crate::scheduler::{Failure, NewRequest, Occupancy, Scheduler};

/// Snapshot for `Load` reports.
#[derive(Debug, Clone, Copy, Default)]
pub struct LoadReport {
    /// Queue and cache occupancy.
    pub occupancy: Occupancy,
    /// Recent generated tokens per second.
    pub tokens_per_second: f64,
}

struct Shared {
    load: Mutex<LoadReport>,
    alive: AtomicBool,
    stop: AtomicBool,
}

/// Async-side handle of the engine thread.
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<NewRequest>,
    shared: Arc<Shared>,
}

impl EngineHandle {
    /// Hands a request to the scheduler. Fails, giving the request back, when the engine is
    /// gone.
    pub fn submit(&self, req: NewRequest) -> Result<(), Box<NewRequest>> {
        if !self.is_alive() {
            return Err(Box::new(req));
        }
        self.tx.send(req).map_err(|e| Box::new(e.0))
    }

    /// Whether the group still works.
    pub fn is_alive(&self) -> bool {
        self.shared.alive.load(Ordering::SeqCst)
    }

    /// Asks the engine to stop once it is idle (drain first); it then tells the workers to exit.
    pub fn shutdown(&self) {
        self.shared.stop.store(true, Ordering::SeqCst);
    }

    /// Latest load snapshot.
    pub fn load(&self) -> LoadReport {
        *self.shared.load.lock().expect("load lock poisoned. This is a bug.")
    }
}

/// Starts the engine thread: `build` runs on it (rendezvous, loading: anything whose results
/// must stay on the thread) and returns the runner and the scheduler. Returns the handle once
/// the runner is built, and the thread's join handle, which yields the reason it stopped.
pub fn spawn_engine(
    build: impl FnOnce() -> Result<(ShardRunner, Scheduler), ModelError> + Send + 'static,
    watchdog: Arc<Watchdog>,
) -> Result<(EngineHandle, JoinHandle<Result<(), ModelError>>), ModelError> {
    let (tx, rx) = std::sync::mpsc::channel::<NewRequest>();
    let shared = Arc::new(Shared {
        load: Mutex::new(LoadReport::default()),
        alive: AtomicBool::new(true),
        stop: AtomicBool::new(false),
    });
    let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), ModelError>>();
    let thread_shared = shared.clone();
    let join = std::thread::Builder::new()
        .name("decoder-engine".into())
        .spawn(move || {
            let (mut runner, mut sched) = match build() {
                Ok(v) => {
                    let _ = ready_tx.send(Ok(()));
                    v
                }
                Err(e) => {
                    thread_shared.alive.store(false, Ordering::SeqCst);
                    let msg = e.to_string();
                    let _ = ready_tx.send(Err(e));
                    return Err(ModelError::GroupFailed(msg));
                }
            };
            let result = engine_loop(&mut runner, &mut sched, &rx, &thread_shared, &watchdog);
            thread_shared.alive.store(false, Ordering::SeqCst);
            if let Err(e) = &result {
                tracing::error!(error = %e, "the tensor-parallel group failed");
                sched.fail_all(Failure::Unavailable(format!("the decoder group failed: {e}")));
            } else {
                runner.shutdown();
            }
            result
        })
        .expect("cannot start the engine thread");
    match ready_rx.recv() {
        Ok(Ok(())) => Ok((EngineHandle { tx, shared }, join)),
        Ok(Err(e)) => {
            let _ = join.join();
            Err(e)
        }
        Err(_) => Err(ModelError::GroupFailed("the engine thread died while starting".into())),
    }
}

fn engine_loop(
    runner: &mut ShardRunner,
    sched: &mut Scheduler,
    rx: &Receiver<NewRequest>,
    shared: &Shared,
    watchdog: &Watchdog,
) -> Result<(), ModelError> {
    let mut rate = 0.0f64;
    loop {
        if !sched.has_work() {
            match rx.recv_timeout(Duration::from_millis(100)) {
                Ok(req) => sched.add(req),
                Err(RecvTimeoutError::Timeout) => {
                    if shared.stop.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    if let Some(rank) = runner.links().dead_peer() {
                        return Err(ModelError::Comm(dsvl_parallel::CommError::Disconnected {
                            rank,
                            op: "idle liveness check",
                        }));
                    }
                    continue;
                }
                Err(RecvTimeoutError::Disconnected) => return Ok(()),
            }
        }
        while let Ok(req) = rx.try_recv() {
            sched.add(req);
        }
        let before = sched.occupancy().running;
        let t = Instant::now();
        let busy = watchdog.busy();
        sched.step(runner)?;
        drop(busy);
        let secs = t.elapsed().as_secs_f64();
        if before > 0 {
            let r = before as f64 / secs.max(1e-9);
            rate = if rate == 0.0 { r } else { 0.9 * rate + 0.1 * r };
        }
        let occ = sched.occupancy();
        crate::request_metrics::occupancy(&occ, rate);
        *shared.load.lock().expect("load lock poisoned. This is a bug.") =
            LoadReport { occupancy: occ, tokens_per_second: rate };
    }
}
