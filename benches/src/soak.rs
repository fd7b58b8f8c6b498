//! `dsvl-bench soak`: many requests through the local cluster (2 vision replicas, a TP 2
//! decoder group, Redis, the gateway; real processes on the bundled tiny model), in rounds.
//! After each round it reads every process's resident memory, threads and open file
//! descriptors from /proc. Memory must be stable after the warm-up rounds (growth under 5 %
//! from the end of warm-up to the end), and threads and descriptors must not grow (beyond a
//! slack of 4 for pools that follow the load); the command exits non-zero otherwise, or if a
//! process is gone or a request failed. Requests repeat after `--cycle`, so what the caches hold
//! is bounded. Figures go to `benches/README.md`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use dsvl_e2e::{Cluster, Options};
use dsvl_loadgen::{
    run as run_load, BuiltIn, Client, ConnectOptions, Load, Mix, Mode, Report, Slo, Until, Workload,
};
use serde_json::{json, Map};

/// Arguments of `dsvl-bench soak`.
#[derive(Args, Debug)]
pub struct SoakArgs {
    /// Requests in all.
    #[arg(long, default_value_t = 10_000)]
    requests: usize,
    /// Rounds (a sample of every process after each).
    #[arg(long, default_value_t = 10)]
    rounds: usize,
    /// Rounds that count as warm-up.
    #[arg(long, default_value_t = 2)]
    warmup_rounds: usize,
    /// Requests in flight.
    #[arg(long, default_value_t = 8)]
    concurrency: usize,
    /// Output tokens per request.
    #[arg(long, default_value_t = 8)]
    max_tokens: u32,
    /// Distinct images the image requests cycle through.
    #[arg(long, default_value_t = 256)]
    distinct_images: usize,
    /// Requests repeat after this many, so what the caches hold is bounded (the warm-up
    /// rounds should cover at least one cycle).
    #[arg(long, default_value_t = 500)]
    cycle: usize,
    /// Largest resident-memory growth allowed after warm-up, in percent.
    #[arg(long, default_value_t = 5.0)]
    max_growth_percent: f64,
}

/// Threads a process may have beyond its warm count: tokio's blocking pool grows with load and
/// lets idle threads go after 10 s.
const THREAD_SLACK: u64 = 4;
/// Descriptors beyond the warm count: connections of client pools opened and closed with load.
const FD_SLACK: u64 = 4;

/// One process's figures at one moment.
#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    rss_kib: u64,
    threads: u64,
    fds: u64,
}

fn sample(pid: u32) -> Option<Sample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    Some(Sample { rss_kib: field("VmRSS:")?, threads: field("Threads:")?, fds })
}

fn processes(c: &Cluster) -> Vec<(String, u32)> {
    let mut v = vec![("gateway".to_string(), c.gateway.proc.pid())];
    for (i, s) in c.vision.iter().enumerate() {
        v.push((format!("vision {i}"), s.proc.pid()));
    }
    v.push(("decoder rank 0".into(), c.decoder.proc.pid()));
    for (i, pid) in dsvl_testkit::child_pids(c.decoder.proc.pid()).into_iter().enumerate() {
        v.push((format!("decoder rank {}", i + 1), pid));
    }
    if let Some(pid) = c.redis.as_ref().and_then(|r| r.pid()) {
        v.push(("redis".into(), pid));
    }
    v
}

/// Runs `dsvl-bench soak`.
pub fn run(a: SoakArgs) -> Result<()> {
    if a.warmup_rounds == 0 || a.rounds <= a.warmup_rounds || a.requests < a.rounds {
        bail!("--warmup-rounds must be at least 1 and under --rounds, and --requests at least --rounds");
    }
    tokio::runtime::Runtime::new()?.block_on(soak(a))
}

async fn soak(a: SoakArgs) -> Result<()> {
    println!("command    {}", std::env::args().collect::<Vec<_>>().join(" "));
    println!("processor  {}", crate::machine::processor_model());
    let cluster = Cluster::start(Options::default()).await?;
    let client =
        Client::connect(&format!("http://{}", cluster.http), ConnectOptions::default()).await?;
    let mut extra = Map::new();
    extra.insert("temperature".into(), json!(0.0));
    let workload = Arc::new(Workload::built_in(BuiltIn {
        mix: "text=2,image=1,multiturn=1".parse::<Mix>()?,
        max_tokens: a.max_tokens,
        long_words: 0,
        distinct_images: a.distinct_images,
        images: None,
        seed: 3,
        cycle: Some(a.cycle),
        extra,
        urgent: None,
    })?);
    let procs = processes(&cluster);
    let per_round = a.requests / a.rounds;
    let mut rows: Vec<Vec<Sample>> = Vec::new();
    let mut failed = 0;
    let t = Instant::now();
    for round in 0..a.rounds {
        let load = Load {
            mode: Mode::Closed { concurrency: a.concurrency },
            until: Until::Requests(per_round),
            deadline: Duration::from_secs(60),
            hang_after: Duration::from_secs(10),
            warmup: 0,
            seed: round as u64,
            first_index: round * per_round,
            progress: false,
        };
        let r = run_load(&client, workload.clone(), &load).await?;
        let report = Report::new(&r.outcomes, r.duration, Slo::default());
        failed += report.failed;
        tokio::time::sleep(Duration::from_secs(1)).await; // let the last streams' state go
        let mut s = Vec::new();
        for (name, pid) in &procs {
            s.push(sample(*pid).with_context(|| format!("{name} (pid {pid}) is gone"))?);
        }
        eprintln!(
            "round {}/{}: {} requests ({} failed) in {:.1} s; RSS MiB: {}",
            round + 1,
            a.rounds,
            per_round,
            report.failed,
            r.duration.as_secs_f64(),
            s.iter()
                .map(|x| format!("{:.0}", x.rss_kib as f64 / 1024.0))
                .collect::<Vec<_>>()
                .join(" ")
        );
        rows.push(s);
    }
    let (warm, last) = (&rows[a.warmup_rounds - 1], &rows[rows.len() - 1]);
    println!(
        "{} requests in {:.0} s ({failed} failed); warm-up: the first {} rounds",
        per_round * a.rounds,
        t.elapsed().as_secs_f64(),
        a.warmup_rounds
    );
    println!(
        "{:<16}{:>12}{:>12}{:>9}{:>10}{:>10}",
        "process", "RSS warm", "RSS end", "growth", "threads", "fds"
    );
    let mut bad = Vec::new();
    for (i, (name, _)) in procs.iter().enumerate() {
        let (w, e) = (warm[i], last[i]);
        let growth = (e.rss_kib as f64 / w.rss_kib.max(1) as f64 - 1.0) * 100.0;
        println!(
            "{name:<16}{:>9.1} MiB{:>9.1} MiB{:>8.1}%{:>10}{:>10}",
            w.rss_kib as f64 / 1024.0,
            e.rss_kib as f64 / 1024.0,
            growth,
            format!("{}->{}", w.threads, e.threads),
            format!("{}->{}", w.fds, e.fds),
        );
        if growth >= a.max_growth_percent
            || e.threads > w.threads + THREAD_SLACK
            || e.fds > w.fds + FD_SLACK
        {
            bad.push(name.clone());
        }
    }
    if failed > 0 || !bad.is_empty() {
        bail!("{failed} requests failed; not stable: {bad:?}");
    }
    Ok(())
}
