//! The cluster under load, as its users run it: two vision replicas, a TP 2 decoder group,
//! Redis and the gateway, driven by the same load generator as `dsvl-bench serve`.
//!
//! At the measured saturation point (a short sweep finds it), every request ends with a
//! complete answer or a retryable error before its deadline plus 1 s, none hangs, and once the
//! load stops, in-flight requests, queued images, waiting and running sequences and KV blocks
//! held by sequences (not the evictable prefix cache) are back to zero within 5 s.
//!
//! Runs alone (`.config/nextest.toml`): it saturates the machine on purpose.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use dsvl_e2e::{Cluster, Options};
use dsvl_loadgen::{
    retryable, run, sweep, BuiltIn, Client, ConnectOptions, Load, Mix, Mode, Report, Slo,
    SweepPlan, Until, Workload,
};
use serde_json::{json, Map, Value};

fn workload() -> Result<Arc<Workload>> {
    let mut extra = Map::new();
    extra.insert("temperature".into(), json!(0.0));
    extra.insert("ignore_eos".into(), json!(true));
    Ok(Arc::new(Workload::built_in(BuiltIn {
        mix: Mix::default(),
        max_tokens: 16,
        long_words: 300,
        distinct_images: 8,
        images: None,
        seed: 1,
        cycle: None,
        extra,
        urgent: None,
    })?))
}

/// What must be zero once the load has stopped: (service, metric, value).
fn leftovers(cluster: &Cluster) -> Result<Vec<(String, f64)>> {
    let mut v = vec![
        (
            "gateway in flight".to_string(),
            cluster.gateway.metric("dsvl_gateway_requests_in_flight", &[])?,
        ),
        ("decoder waiting".into(), cluster.decoder.metric("dsvl_decoder_waiting", &[])?),
        ("decoder running".into(), cluster.decoder.metric("dsvl_decoder_running", &[])?),
        (
            "decoder KV blocks held".into(),
            cluster.decoder.metric("dsvl_decoder_kv_blocks_used", &[])?,
        ),
    ];
    for (i, vision) in cluster.vision.iter().enumerate() {
        v.push((format!("vision {i} queue"), vision.metric("dsvl_vision_queue_depth", &[])?));
    }
    Ok(v)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn at_saturation_every_request_ends_in_time_and_nothing_is_left_behind() -> Result<()> {
    let cluster = Cluster::start(Options::default()).await?;
    let client =
        Client::connect(&format!("http://{}", cluster.http), ConnectOptions::default()).await?;
    let workload = workload()?;
    let base = Load {
        mode: Mode::Open { rate: 1.0, max_in_flight: None },
        until: Until::Requests(24),
        deadline: Duration::from_secs(8),
        hang_after: Duration::from_secs(10),
        warmup: 4,
        seed: 1,
        first_index: 0,
        progress: false,
    };
    let plan = SweepPlan {
        start_rate: 2.0,
        factor: 2.0,
        max_steps: 8,
        requests_per_step: 24,
        slo: Slo { ttft_ms: Some(2000.0), ..Slo::default() },
    };
    let s = sweep(&client, workload.clone(), &base, &plan, |step| {
        let r = &step.report;
        eprintln!("sweep: rate {:.1}/s goodput {:.2}/s, {} failed", step.rate, r.goodput, r.failed);
    })
    .await?;
    ensure!(s.saturation_goodput > 0.0, "the sweep found no rate with goodput: {s:?}");

    let load = Load {
        mode: Mode::Open { rate: s.saturation_rate, max_in_flight: None },
        until: Until::Elapsed(Duration::from_secs(20)),
        warmup: 0,
        first_index: 100_000,
        ..base
    };
    let r = run(&client, workload, &load).await?;
    let report = Report::new(&r.outcomes, r.duration, plan.slo);
    eprintln!("at {:.1} requests/s for 20 s:\n{}", s.saturation_rate, report.table());
    ensure!(report.completed >= 10, "too little got through to mean anything: {report:?}");
    for o in &r.outcomes {
        if let Err(class) = &o.result {
            ensure!(
                retryable(class),
                "a {} request failed with {class}, not a retryable error",
                o.kind
            );
        }
        ensure!(
            !o.late(),
            "a {} request ended {:?} after it was sent (deadline {:?}): {:?}",
            o.kind,
            o.e2e,
            o.deadline,
            o.result
        );
    }

    let stopped = Instant::now();
    loop {
        let left = leftovers(&cluster)?;
        if left.iter().all(|(_, v)| *v == 0.0) {
            eprintln!("back to zero {:?} after the load stopped", stopped.elapsed());
            break;
        }
        ensure!(stopped.elapsed() < Duration::from_secs(5), "5 s after the load stopped: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // The same generator as a command: its JSON has the documented fields and counts.
    for url in [format!("http://{}", cluster.http), format!("grpc://{}", cluster.gateway.addr)] {
        let out = std::process::Command::new(dsvl_e2e::binary("dsvl-bench")?)
            .args([
                "serve",
                "--url",
                &url,
                "--concurrency",
                "2",
                "--requests",
                "6",
                "--max-tokens",
                "4",
            ])
            .args(["--mix", "text=1,image=1", "--slo-ttft-ms", "60000", "--json"])
            .output()
            .context("running dsvl-bench serve")?;
        ensure!(out.status.success(), "dsvl-bench serve: {}", String::from_utf8_lossy(&out.stderr));
        let v: Value = serde_json::from_slice(&out.stdout).context("one JSON object")?;
        for k in dsvl_loadgen::REPORT_FIELDS.iter().chain(&["processor"]) {
            ensure!(v.get(k).is_some(), "{k} missing from {v}");
        }
        ensure!(v["completed"] == 6 && v["failed"] == 0, "{url}: {v}");
        ensure!(v["output_tokens_per_s"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
        ensure!(v["ttft_ms"]["p50"].as_f64().unwrap_or(0.0) > 0.0, "{v}");
    }
    Ok(())
}
