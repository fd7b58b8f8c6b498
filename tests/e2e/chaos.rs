//! Chaos under load: with the load generator running against the cluster (two vision replicas,
//! a TP 2 decoder group, Redis, the gateway), faults arrive one after another:
//! Redis paused (SIGSTOP) then resumed; Redis killed then restarted; a vision replica killed;
//! the surviving replica's model thread panicking (a fail-point that only debug builds have);
//! a decoder worker rank paused past the collective timeout; the gateway sent SIGTERM
//! mid-stream. The test restarts what failed, as Kubernetes would (`dsvl up` does the same, see
//! `crates/cli/tests/up_cli.rs`).
//!
//! Pass: every request ends by its deadline plus 1 s, with success or a retryable status; the
//! vision replica whose model thread died reports liveness NOT_SERVING within 2 s; retries stay
//! within the gateway's retry budget; every request sent from 10 s after a fault cleared until
//! the next fault succeeds; the draining gateway ends every open stream and exits 0 within its
//! drain time.
//!
//! Runs alone (`.config/nextest.toml`).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dsvl_e2e::{signal, Cluster, Options, Svc};
use dsvl_loadgen::{
    retryable, run, BuiltIn, Client, ConnectOptions, Load, Mode, Report, Slo, Until, Workload,
};
use dsvl_proto::internal::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::internal::{EncodeRequest, ImageInput};
use serde_json::{json, Map};
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Each request's deadline.
const DEADLINE: Duration = Duration::from_secs(6);
/// How long after a fault clears every request must succeed again.
const RECOVERY: Duration = Duration::from_secs(10);
/// Healthy time checked after each recovery window, before the next fault.
const CHECKED: Duration = Duration::from_secs(4);
/// The decoder group's collective timeout in this test.
const COLLECTIVE_TIMEOUT_SECS: u64 = 2;
/// The gateway's drain time in this test.
const DRAIN_SECS: u64 = 10;

/// A fault: its name, and when it cleared (from the start of the load).
struct Fault {
    name: &'static str,
    started: Duration,
    cleared: Duration,
}

async fn liveness(svc: &Svc) -> Option<i32> {
    let addr = svc.health.as_ref()?;
    let channel = dsvl_e2e::channel(addr, None).ok()?;
    let req = HealthCheckRequest { service: "liveness".into() };
    let mut client = HealthClient::new(channel);
    let r = tokio::time::timeout(Duration::from_secs(1), client.check(req)).await;
    Some(r.ok()?.ok()?.into_inner().status)
}

/// A PNG no cache has seen, so the replica must run its model on it.
fn fresh_png(salt: u8) -> Vec<u8> {
    let rgb: Vec<u8> = (0..64 * 64 * 3).map(|i| (i as u8).wrapping_mul(salt)).collect();
    dsvl_testkit::png_rgb8(64, 64, &rgb)
}

async fn wait_exit(svc: &mut Svc, limit: Duration) -> Result<std::process::ExitStatus> {
    let until = Instant::now() + limit;
    loop {
        if let Some(st) = svc.proc.try_wait()? {
            return Ok(st);
        }
        ensure!(Instant::now() < until, "{} did not exit within {limit:?}", svc.addr);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn faults_under_load_lose_no_request_and_the_cluster_recovers() -> Result<()> {
    let failpoints = tempfile::tempdir()?;
    // Inherited by every service this test starts (each test runs in its own process).
    std::env::set_var("DSVL_FAILPOINTS_DIR", failpoints.path());
    std::env::set_var("DSVL_COLLECTIVE_TIMEOUT_SECS", COLLECTIVE_TIMEOUT_SECS.to_string());
    std::env::set_var("DSVL_DRAIN_SECS", DRAIN_SECS.to_string());
    let mut cluster = Cluster::start(Options { health_ports: true, ..Options::default() }).await?;
    let client =
        Client::connect(&format!("http://{}", cluster.http), ConnectOptions::default()).await?;
    let mut extra = Map::new();
    extra.insert("temperature".into(), json!(0.0));
    extra.insert("ignore_eos".into(), json!(true));
    let workload = Arc::new(Workload::built_in(BuiltIn {
        mix: "text=1,image=2,multiturn=1".parse()?,
        max_tokens: 12,
        long_words: 0,
        distinct_images: 64,
        images: None,
        seed: 2,
        cycle: None,
        extra,
        urgent: None,
    })?);
    let stop = Arc::new(AtomicBool::new(false));
    let load = Load {
        mode: Mode::Closed { concurrency: 4 },
        until: Until::Stopped(stop.clone()),
        deadline: DEADLINE,
        hang_after: Duration::from_secs(10),
        warmup: 0,
        seed: 2,
        first_index: 0,
        progress: false,
    };
    let t0 = Instant::now();
    let runner = {
        let (client, workload) = (client.clone(), workload.clone());
        tokio::spawn(async move { run(&client, workload, &load).await })
    };
    let mut faults: Vec<Fault> = Vec::new();
    let settle = || tokio::time::sleep(RECOVERY + CHECKED);
    tokio::time::sleep(Duration::from_secs(3)).await;

    // 1. Redis paused, then resumed.
    let started = t0.elapsed();
    {
        let redis = cluster.redis.as_ref().context("redis")?;
        let _frozen = redis.freeze()?;
        tokio::time::sleep(Duration::from_secs(3)).await;
    }
    faults.push(Fault { name: "redis paused 3 s", started, cleared: t0.elapsed() });
    settle().await;

    // 2. Redis killed, then restarted (empty).
    let started = t0.elapsed();
    let redis = cluster.redis.as_mut().context("redis")?;
    redis.kill();
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.restart()?;
    faults.push(Fault { name: "redis killed and restarted", started, cleared: t0.elapsed() });
    settle().await;

    // 3. A vision replica killed; restarted as Kubernetes would.
    let started = t0.elapsed();
    signal(cluster.vision[0].proc.pid(), "KILL")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.vision[0].restart()?;
    cluster.vision[0]
        .wait_serving("dsvl.internal.v1.VisionEncoder", Duration::from_secs(60))
        .await?;
    faults.push(Fault { name: "vision replica killed", started, cleared: t0.elapsed() });
    settle().await;

    // 4. The other replica's model thread panics (fail-point), then it is restarted.
    let started = t0.elapsed();
    let survivor = &mut cluster.vision[1];
    std::fs::write(
        failpoints.path().join(format!("vision-model-panic.{}", survivor.proc.pid())),
        b"",
    )?;
    let mut direct = VisionEncoderClient::new(survivor.channel()?);
    let request = EncodeRequest {
        images: vec![ImageInput { data: fresh_png(7).into(), client_digest: String::new() }],
        cache_salt: Default::default(),
        return_inline: true,
    };
    let panicked = direct.encode(request).await;
    ensure!(panicked.as_ref().is_err_and(|s| s.code() == tonic::Code::Unavailable), "{panicked:?}");
    let died = Instant::now();
    loop {
        if liveness(survivor).await == Some(2) {
            break;
        }
        ensure!(
            died.elapsed() < Duration::from_secs(2),
            "liveness still not NOT_SERVING after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    eprintln!("liveness NOT_SERVING {:?} after the model thread died", died.elapsed());
    survivor.restart()?;
    survivor.wait_serving("dsvl.internal.v1.VisionEncoder", Duration::from_secs(60)).await?;
    faults.push(Fault { name: "vision model thread panicked", started, cleared: t0.elapsed() });
    settle().await;

    // 5. A decoder worker rank paused past the collective timeout: the group fails and exits,
    // and is restarted.
    let started = t0.elapsed();
    let workers = dsvl_testkit::child_pids(cluster.decoder.proc.pid());
    ensure!(!workers.is_empty(), "the decoder's worker rank");
    signal(workers[0], "STOP")?;
    let status =
        wait_exit(&mut cluster.decoder, Duration::from_secs(COLLECTIVE_TIMEOUT_SECS + 10)).await?;
    ensure!(!status.success(), "a failed group exits non-zero: {status}");
    cluster.decoder.restart()?;
    cluster.decoder.wait_serving("dsvl.internal.v1.Decoder", Duration::from_secs(60)).await?;
    faults.push(Fault { name: "decoder worker paused", started, cleared: t0.elapsed() });
    settle().await;

    // Retries so far stayed within the budget (0.2 per request + a burst of 10, per tier).
    let requests = cluster.gateway.metric("dsvl_requests_total", &[])?;
    for tier in ["vision", "decoder"] {
        let retries = cluster.gateway.metric("dsvl_gateway_retries_total", &[("tier", tier)])?;
        ensure!(
            retries <= 0.2 * requests + 10.0,
            "{tier}: {retries} retries for {requests} requests"
        );
        eprintln!("{tier}: {retries} retries for {requests} requests");
    }

    // 6. The gateway sent SIGTERM mid-stream: it drains and exits 0 within its drain time.
    let started = t0.elapsed();
    signal(cluster.gateway.proc.pid(), "TERM")?;
    let status = wait_exit(&mut cluster.gateway, Duration::from_secs(DRAIN_SECS + 2)).await?;
    ensure!(status.success(), "the draining gateway exits 0: {status}");
    let drained = t0.elapsed();
    cluster.gateway.restart()?;
    cluster.gateway.wait_serving("dsvl.v1.Chat", Duration::from_secs(60)).await?;
    faults.push(Fault { name: "gateway SIGTERM", started, cleared: t0.elapsed() });
    settle().await;
    stop.store(true, Ordering::Relaxed);
    let r = runner.await??;

    let report = Report::new(&r.outcomes, r.duration, Slo::default());
    eprintln!("{}", report.table());
    ensure!(report.completed > 50, "the load ran: {report:?}");
    for o in &r.outcomes {
        if let Err(class) = &o.result {
            ensure!(
                retryable(class),
                "a {} request sent at {:?} failed with {class}",
                o.kind,
                o.sent_at
            );
        }
        ensure!(
            !o.late(),
            "a request sent at {:?} ended after {:?}: {:?}",
            o.sent_at,
            o.e2e,
            o.result
        );
    }
    for (i, f) in faults.iter().enumerate() {
        let from = f.cleared + RECOVERY;
        let to = faults.get(i + 1).map_or(r.duration, |n| n.started);
        let window: Vec<_> =
            r.outcomes.iter().filter(|o| o.sent_at >= from && o.sent_at + o.e2e <= to).collect();
        let failed: Vec<_> = window.iter().filter(|o| o.result.is_err()).collect();
        let during = r.outcomes.iter().filter(|o| o.sent_at >= f.started && o.sent_at < from);
        let failed_during = during.filter(|o| o.result.is_err()).count();
        eprintln!(
            "{}: {:.1}..{:.1} s; {failed_during} failed until 10 s after; then {} of {} succeeded",
            f.name,
            f.started.as_secs_f64(),
            f.cleared.as_secs_f64(),
            window.len() - failed.len(),
            window.len()
        );
        ensure!(!window.is_empty(), "{}: no request in the window after recovery", f.name);
        ensure!(
            failed.is_empty(),
            "{}: {} failed after recovery: {:?}",
            f.name,
            failed.len(),
            failed.first().map(|o| &o.result)
        );
    }
    eprintln!("gateway drained and exited 0 at {drained:?}");
    Ok(())
}
