//! `dsvl-bench serve`: load against a running gateway, as `vllm bench serve` and SGLang's
//! `bench_serving` measure serving systems. Closed loop (`--concurrency`) or open loop
//! (`--rate`, Poisson arrivals), a built-in mix or a JSONL workload, per-request deadlines;
//! reports completions and failures by class, TTFT / ITL / E2E percentiles, tokens/s and
//! goodput under the SLO given, as a table or (`--json`) one JSON object. `--sweep` raises the
//! rate until goodput falls and reports the saturation point. The engine is `dsvl-loadgen`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use dsvl_loadgen::{
    run as run_load, sweep, BuiltIn, Client, ConnectOptions, Load, Mix, Mode, Report, Slo,
    SweepPlan, TlsFiles, Until, Urgent, Workload,
};
use serde_json::{json, Map, Value};

/// Arguments of `dsvl-bench serve`.
#[derive(Args, Debug)]
pub struct ServeArgs {
    /// The gateway: `http://HOST:PORT` (OpenAI API, streamed) or `grpc://HOST:PORT`; over TLS,
    /// `https://` or `grpcs://`.
    #[arg(long)]
    url: String,
    /// TLS: trust only this PEM certificate authority (default: the system's trust roots).
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// TLS: present this PEM certificate chain (a gateway that requires client certificates).
    #[arg(long, requires = "client_key")]
    client_cert: Option<PathBuf>,
    /// TLS: the key of --client-cert.
    #[arg(long, requires = "client_cert")]
    client_key: Option<PathBuf>,
    /// Closed loop: this many requests in flight (the default, 8).
    #[arg(long, conflicts_with_all = ["rate", "sweep", "max_concurrency"])]
    concurrency: Option<usize>,
    /// Open loop: Poisson arrivals at this many requests per second.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: at most this many in flight (later arrivals wait).
    #[arg(long)]
    max_concurrency: Option<usize>,
    /// Requests to send (per step with --sweep).
    #[arg(long, default_value_t = 200)]
    requests: usize,
    /// Send for this long instead of a number of requests.
    #[arg(long, conflicts_with = "sweep")]
    duration_s: Option<f64>,
    /// Requests from a JSONL file (one OpenAI chat request per line) instead of the mix.
    #[arg(long)]
    workload: Option<PathBuf>,
    /// The built-in mix's weights.
    #[arg(long, default_value = "text=1,image=1,multiturn=1,long=1")]
    mix: String,
    /// Images for the mix (PNG, JPEG, WebP, GIF) instead of the bundled two.
    #[arg(long)]
    images: Option<PathBuf>,
    /// Distinct images (variants) the mix's `image` requests cycle through.
    #[arg(long, default_value_t = 16)]
    distinct_images: usize,
    /// Output tokens per request of the mix.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Words in a `long` prompt of the mix (about 1.3 tokens each).
    #[arg(long, default_value_t = 1200)]
    long_words: usize,
    /// Generate `max_tokens` tokens whatever the model says (fixed output lengths).
    #[arg(long)]
    ignore_eos: bool,
    /// Sampling temperature of the mix's requests.
    #[arg(long, default_value_t = 0.0)]
    temperature: f64,
    /// Repeat the mix's requests after this many (bounded cache content).
    #[arg(long)]
    cycle: Option<usize>,
    /// Seeds the mix and the arrival times.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// This share (0 to 1) of the mix's requests goes out with --urgent-priority and is
    /// reported as the kind `urgent` (the report breaks TTFT and E2E down by kind).
    #[arg(long, default_value_t = 0.0)]
    urgent_share: f64,
    /// The urgent requests' `priority` (vLLM's: lower values are served first; the others 0).
    #[arg(long, default_value_t = -1, allow_negative_numbers = true)]
    urgent_priority: i32,
    /// Each request's deadline, sent to the gateway (a workload line's `timeout_s` wins).
    #[arg(long, default_value_t = 60.0)]
    deadline_s: f64,
    /// Seconds past its deadline before the client gives up on a request and counts it `hung`.
    #[arg(long, default_value_t = 10.0)]
    hang_after_s: f64,
    /// Requests sent before measuring, not counted.
    #[arg(long, default_value_t = 0)]
    warmup: usize,
    /// Goodput SLO on time to first token.
    #[arg(long)]
    slo_ttft_ms: Option<f64>,
    /// Goodput SLO on a request's mean inter-token latency.
    #[arg(long)]
    slo_itl_ms: Option<f64>,
    /// Goodput SLO on end-to-end latency.
    #[arg(long)]
    slo_e2e_ms: Option<f64>,
    /// Find the saturation point: open-loop steps at rising rates until goodput falls.
    #[arg(long)]
    sweep: bool,
    /// The sweep's first rate (requests/s).
    #[arg(long, default_value_t = 1.0)]
    sweep_start_rate: f64,
    /// Each step's rate is this times the last.
    #[arg(long, default_value_t = 1.5)]
    sweep_factor: f64,
    /// The most steps a sweep takes.
    #[arg(long, default_value_t = 10)]
    sweep_steps: usize,
    /// API key (`Authorization: Bearer`).
    #[arg(long, env = "DSVL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// The model id to ask for (default: the first the gateway lists).
    #[arg(long)]
    model: Option<String>,
    /// HTTP/2 connections for gRPC.
    #[arg(long, default_value_t = 4)]
    grpc_connections: usize,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn secs(s: f64, flag: &str) -> Result<Duration> {
    if !(s.is_finite() && s > 0.0) {
        bail!("{flag} must be a positive number of seconds (got {s})");
    }
    Ok(Duration::from_secs_f64(s))
}

fn workload(a: &ServeArgs) -> Result<Workload> {
    if !(0.0..=1.0).contains(&a.urgent_share) {
        bail!("--urgent-share must be between 0 and 1 (got {})", a.urgent_share);
    }
    if let Some(file) = &a.workload {
        return Ok(Workload::from_file(file)?);
    }
    let mut extra = Map::new();
    extra.insert("temperature".into(), json!(a.temperature));
    if a.ignore_eos {
        extra.insert("ignore_eos".into(), json!(true));
    }
    Ok(Workload::built_in(BuiltIn {
        mix: a.mix.parse::<Mix>()?,
        max_tokens: a.max_tokens,
        long_words: a.long_words,
        distinct_images: a.distinct_images,
        images: a.images.clone(),
        seed: a.seed,
        cycle: a.cycle,
        extra,
        urgent: (a.urgent_share > 0.0)
            .then_some(Urgent { share: a.urgent_share, priority: a.urgent_priority }),
    })?)
}

/// Runs `dsvl-bench serve`.
pub fn run(args: ServeArgs) -> Result<()> {
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(serve(args))
}

async fn serve(a: ServeArgs) -> Result<()> {
    let workload = Arc::new(workload(&a)?);
    if a.url.starts_with("grpc") && workload.has_image_urls() {
        bail!("the workload has image URLs, which gRPC cannot send (use http(s):// or inline the images)");
    }
    let tls = TlsFiles {
        ca: a.ca_file.clone(),
        identity: a.client_cert.clone().zip(a.client_key.clone()),
    };
    let options = ConnectOptions {
        api_key: a.api_key.clone(),
        model: a.model.clone(),
        grpc_connections: a.grpc_connections,
        tls,
    };
    let client = Client::connect(&a.url, options).await.context("connecting to the gateway")?;
    if a.max_concurrency.is_some() && a.rate.is_none() && !a.sweep {
        bail!("--max-concurrency caps an open loop: give --rate or --sweep with it");
    }
    let mode = match (a.rate, a.concurrency) {
        (Some(rate), _) => Mode::Open { rate, max_in_flight: a.max_concurrency },
        (None, _) if a.sweep => {
            Mode::Open { rate: a.sweep_start_rate, max_in_flight: a.max_concurrency }
        }
        (None, c) => Mode::Closed { concurrency: c.unwrap_or(8) },
    };
    let until = match a.duration_s {
        Some(s) => Until::Elapsed(secs(s, "--duration-s")?),
        None => Until::Requests(a.requests),
    };
    let load = Load {
        mode,
        until,
        deadline: secs(a.deadline_s, "--deadline-s")?,
        hang_after: secs(a.hang_after_s, "--hang-after-s")?,
        warmup: a.warmup,
        seed: a.seed,
        first_index: 0,
        progress: !a.json,
    };
    let slo = Slo { ttft_ms: a.slo_ttft_ms, itl_ms: a.slo_itl_ms, e2e_ms: a.slo_e2e_ms };
    let header = json!({
        "command": redacted_command(),
        "processor": crate::machine::processor_model(),
        "target": a.url,
        "model": client.model(),
    });
    if a.sweep {
        let plan = SweepPlan {
            start_rate: a.sweep_start_rate,
            factor: a.sweep_factor,
            max_steps: a.sweep_steps,
            requests_per_step: a.requests,
            slo,
        };
        if !a.json {
            print_header(&header);
            println!(
                "{:>9}{:>11}{:>11}{:>12}{:>10}{:>10}{:>10}",
                "rate", "goodput", "req/s", "out tok/s", "failed", "TTFT p99", "ITL p99"
            );
        }
        let json_out = a.json;
        let s = sweep(&client, workload, &load, &plan, |step| {
            if !json_out {
                let r = &step.report;
                println!(
                    "{:>9.2}{:>11.2}{:>11.2}{:>12.1}{:>10}{:>10.0}{:>10.0}",
                    step.rate,
                    r.goodput,
                    r.requests_per_s,
                    r.output_tokens_per_s,
                    r.failed,
                    r.ttft_ms.p99,
                    r.itl_ms.p99
                );
            }
        })
        .await?;
        if a.json {
            let mut out = header.as_object().cloned().unwrap_or_default();
            out.extend(serde_json::to_value(&s)?.as_object().cloned().unwrap_or_default());
            println!("{}", Value::Object(out));
        } else {
            println!(
                "saturation: {:.2} requests/s offered, goodput {:.2} req/s",
                s.saturation_rate, s.saturation_goodput
            );
        }
        return Ok(());
    }
    let r = run_load(&client, workload, &load).await?;
    let report = Report::new(&r.outcomes, r.duration, slo);
    if a.json {
        let mut out = header.as_object().cloned().unwrap_or_default();
        out.extend(serde_json::to_value(&report)?.as_object().cloned().unwrap_or_default());
        println!("{}", Value::Object(out));
    } else {
        print_header(&header);
        print!("{}", report.table());
    }
    Ok(())
}

/// The command line, with the value of `--api-key` hidden.
fn redacted_command() -> String {
    let mut out = Vec::new();
    let mut hide = false;
    for a in std::env::args() {
        if hide {
            out.push("***".to_string());
            hide = false;
        } else if a.starts_with("--api-key=") {
            out.push("--api-key=***".to_string());
        } else {
            hide = a == "--api-key";
            out.push(a);
        }
    }
    out.join(" ")
}

fn print_header(h: &Value) {
    for k in ["command", "processor", "target", "model"] {
        println!("{k:<18}{}", h[k].as_str().unwrap_or(""));
    }
}
