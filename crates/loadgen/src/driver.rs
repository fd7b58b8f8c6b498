//! Drives a [`Workload`] through a [`Client`]: a closed loop keeps `concurrency` requests in
//! flight; an open loop sends at Poisson arrival times at `rate` per second (optionally capped
//! in flight, as `vllm bench serve --max-concurrency` does), whether or not earlier requests
//! have ended. A run stops after a number of requests or a time, then waits for every request
//! it sent: nothing is dropped from the count.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::SeedableRng;
use rand_distr::{Distribution, Exp};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use crate::report::Outcome;
use crate::{Client, LoadError, Workload};

/// How long a closed-loop worker waits after a failed request before its next one.
pub const FAILURE_PAUSE: Duration = Duration::from_millis(100);

/// How requests are paced.
#[derive(Debug, Clone, Copy)]
pub enum Mode {
    /// A fixed number in flight.
    Closed { concurrency: usize },
    /// Poisson arrivals at `rate` per second, at most `max_in_flight` at once when given.
    Open { rate: f64, max_in_flight: Option<usize> },
}

/// When a run stops sending.
#[derive(Debug, Clone)]
pub enum Until {
    Requests(usize),
    Elapsed(Duration),
    /// Until the flag is set (a test that injects faults while the load runs).
    Stopped(Arc<AtomicBool>),
}

impl Until {
    fn done(&self, stop_at: Option<Instant>) -> bool {
        match self {
            Until::Stopped(flag) => flag.load(Ordering::Relaxed),
            _ => stop_at.is_some_and(|t| Instant::now() >= t),
        }
    }
}

/// A run's settings.
#[derive(Debug, Clone)]
pub struct Load {
    pub mode: Mode,
    pub until: Until,
    /// Each request's deadline unless its workload line has its own.
    pub deadline: Duration,
    /// How long past its deadline a request may run before the client calls it `hung`.
    pub hang_after: Duration,
    /// Requests sent (in a closed loop) before the measured run, and not counted.
    pub warmup: usize,
    /// Seeds the arrival times.
    pub seed: u64,
    /// The workload index of the first request (a sweep's steps send different requests).
    pub first_index: usize,
    /// A progress bar on stderr (drawn only on a terminal).
    pub progress: bool,
}

/// The outcomes of a run, and how long it took from its start (an open loop's first arrival
/// comes one random gap later) to the last end.
#[derive(Debug)]
pub struct Run {
    pub outcomes: Vec<Outcome>,
    pub duration: Duration,
}

fn bar(until: &Until, show: bool) -> ProgressBar {
    if !show {
        return ProgressBar::hidden();
    }
    let pb = match until {
        Until::Requests(n) => ProgressBar::new(*n as u64),
        _ => ProgressBar::new_spinner(),
    };
    let template = match until {
        Until::Requests(_) => "{elapsed_precise} [{bar:30}] {pos}/{len} requests ({per_sec}) {msg}",
        _ => "{elapsed_precise} {spinner} {pos} requests ({per_sec}) {msg}",
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.enable_steady_tick(Duration::from_millis(200));
    pb
}

/// Counts what ended, for the progress bar.
struct Tally {
    bar: ProgressBar,
    failed: AtomicU64,
}

impl Tally {
    fn record(&self, o: &Outcome) {
        if o.result.is_err() {
            let n = self.failed.fetch_add(1, Ordering::Relaxed) + 1;
            self.bar.set_message(format!("{n} failed"));
        }
        self.bar.inc(1);
    }
}

/// Runs `load` against `client`.
pub async fn run(client: &Client, workload: Arc<Workload>, load: &Load) -> Result<Run, LoadError> {
    match load.mode {
        Mode::Closed { concurrency: 0 } => {
            return Err(LoadError::Load("concurrency must be at least 1".into()))
        }
        Mode::Open { rate, .. } if !(rate.is_finite() && rate > 0.0) => {
            return Err(LoadError::Load(format!("the rate must be a positive number (got {rate})")))
        }
        Mode::Open { max_in_flight: Some(0), .. } => {
            return Err(LoadError::Load("max in flight must be at least 1".into()))
        }
        _ => {}
    }
    if load.warmup > 0 {
        let warm = Load {
            mode: Mode::Closed { concurrency: load.warmup.min(8) },
            until: Until::Requests(load.warmup),
            warmup: 0,
            progress: false,
            first_index: load.first_index + 1_000_000_000,
            ..load.clone()
        };
        Box::pin(run(client, workload.clone(), &warm)).await?;
    }
    let tally = Arc::new(Tally { bar: bar(&load.until, load.progress), failed: AtomicU64::new(0) });
    let start = Instant::now();
    let stop_at = match load.until {
        Until::Elapsed(d) => Some(start + d),
        _ => None,
    };
    let limit = match load.until {
        Until::Requests(n) => n,
        _ => usize::MAX,
    };
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = JoinSet::new();
    let mut outcomes = Vec::new();
    let send = {
        let (client, workload, load, tally) =
            (client.clone(), workload.clone(), load.clone(), tally.clone());
        move |i: usize| {
            let (client, workload, load, tally) =
                (client.clone(), workload.clone(), load.clone(), tally.clone());
            async move {
                let item = workload.item(load.first_index + i);
                let deadline = item.timeout.unwrap_or(load.deadline);
                let o = client.send(&item, deadline, load.hang_after, start.elapsed()).await;
                tally.record(&o);
                o
            }
        }
    };
    match load.mode {
        Mode::Closed { concurrency } => {
            for _ in 0..concurrency {
                let (next, send, until) = (next.clone(), send.clone(), load.until.clone());
                tasks.spawn(async move {
                    let mut mine = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        if i >= limit || until.done(stop_at) {
                            return mine;
                        }
                        let o = send(i).await;
                        // A closed-loop client backs off briefly after a failure instead of
                        // spinning on a refused connection or a 503.
                        if o.result.is_err() {
                            tokio::time::sleep(FAILURE_PAUSE).await;
                        }
                        mine.push(o);
                    }
                });
            }
        }
        Mode::Open { rate, max_in_flight } => {
            let gaps = Exp::new(rate).map_err(|e| LoadError::Load(e.to_string()))?;
            let mut rng = StdRng::seed_from_u64(load.seed);
            let slots = Arc::new(Semaphore::new(max_in_flight.unwrap_or(Semaphore::MAX_PERMITS)));
            let mut at = start;
            for i in 0..limit {
                at += Duration::from_secs_f64(gaps.sample(&mut rng));
                if stop_at.is_some_and(|t| at >= t) {
                    break;
                }
                tokio::time::sleep_until(at.into()).await;
                if load.until.done(None) {
                    break;
                }
                let permit = slots
                    .clone()
                    .acquire_owned()
                    .await
                    .map_err(|e| LoadError::Load(e.to_string()))?;
                let send = send.clone();
                tasks.spawn(async move {
                    let o = send(i).await;
                    drop(permit);
                    vec![o]
                });
                // Reap finished tasks as we go so a long run holds no finished handles.
                while let Some(done) = tasks.try_join_next() {
                    collect(done, &mut outcomes)?;
                }
            }
        }
    }
    while let Some(done) = tasks.join_next().await {
        collect(done, &mut outcomes)?;
    }
    tally.bar.finish_and_clear();
    outcomes.sort_by_key(|o| o.sent_at);
    Ok(Run { outcomes, duration: start.elapsed() })
}

fn collect(
    done: Result<Vec<Outcome>, tokio::task::JoinError>,
    into: &mut Vec<Outcome>,
) -> Result<(), LoadError> {
    into.extend(done.map_err(|e| LoadError::Load(format!("a request task failed: {e}")))?);
    Ok(())
}
