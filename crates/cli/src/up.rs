//! `dsvl up`: the local cluster in one command; runs until Ctrl-C (or SIGTERM), then stops
//! every process it started.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Args;

use crate::cluster::{Cluster, ClusterSpec, MetricsPorts, Observe};
use crate::model_args::ModelArgs;

/// Arguments of `dsvl up`.
#[derive(Args, Debug)]
pub struct UpArgs {
    /// Checkpoint (`--model`; the bundled tiny model when absent), `--dtype`, `--device`.
    #[command(flatten)]
    model: ModelArgs,
    /// Decoder tensor-parallel ranks (processes on this machine).
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Shared embedding cache (`redis://host:port`); each service's in-process cache otherwise.
    #[arg(long)]
    redis: Option<String>,
    /// Gateway gRPC address.
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: SocketAddr,
    /// Gateway OpenAI-compatible HTTP address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: SocketAddr,
    /// API keys file for the gateway (`key tenant` per line); open access when absent.
    #[arg(long)]
    api_keys_file: Option<PathBuf>,
    /// Serve Prometheus metrics from every process, each on a free loopback port (listed
    /// once the cluster is up).
    #[arg(long, conflicts_with = "metrics_port")]
    metrics: bool,
    /// Serve Prometheus metrics on consecutive ports from this one: gateway, vision-encoder,
    /// decoder.
    #[arg(long, value_name = "PORT")]
    metrics_port: Option<u16>,
    /// Export traces over OTLP/gRPC from every process (e.g. `http://127.0.0.1:4317`).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL")]
    otlp_endpoint: Option<String>,
    /// Log format of every process started (`DSVL_LOG_FORMAT`).
    #[command(flatten)]
    logs: dsvl_telemetry::LogArgs,
}

/// The table of what listens where, printed once the cluster is up.
fn listen_table(args: &UpArgs, cluster: &Cluster) -> Vec<(String, String)> {
    let mut rows = vec![
        (
            "gateway HTTP".to_string(),
            format!(
                "{}/v1/chat/completions  (OpenAI-compatible; health at /health)",
                cluster.http_url
            ),
        ),
        (
            "gateway gRPC".into(),
            format!(
                "{}  (dsvl.v1.Chat; try `dsvl chat --gateway {}`)",
                cluster.grpc_url, cluster.grpc_url
            ),
        ),
        ("vision-encoder".into(), format!("{}  (gRPC, mutual TLS)", cluster.vision_addr)),
        (
            "decoder group".into(),
            format!(
                "{}  (gRPC, mutual TLS; rank 0 of {}, ranks join at 127.0.0.1:{})",
                cluster.decoder_addr, args.tp, cluster.rendezvous_port
            ),
        ),
    ];
    for (name, addr) in &cluster.metrics {
        rows.push((format!("metrics {name}"), format!("http://{addr}/metrics")));
    }
    if cluster.metrics.is_empty() {
        rows.push(("metrics".into(), "off (--metrics or --metrics-port PORT)".into()));
    }
    rows.push((
        "redis".into(),
        match &args.redis {
            Some(url) => url.split('@').next_back().unwrap_or(url).to_string(),
            None => "none: each service keeps its own in-process cache (--redis URL)".into(),
        },
    ));
    rows.push((
        "traces".into(),
        match &args.otlp_endpoint {
            Some(e) => format!("OTLP to {e}"),
            None => "off (--otlp-endpoint URL)".into(),
        },
    ));
    rows.push((
        "logs".into(),
        format!("{} on stderr (--log-format)", args.logs.log_format.as_str()),
    ));
    rows
}

/// Runs the command.
pub fn run(args: UpArgs) -> Result<()> {
    ensure!(args.tp >= 1, "--tp must be at least 1");
    let spec = ClusterSpec {
        model: args.model.model.clone(),
        dtype: args.model.dtype,
        device: args.model.device,
        tp: args.tp,
        redis: args.redis.clone(),
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        gateway_args: args
            .api_keys_file
            .iter()
            .flat_map(|p| ["--api-keys-file".to_string(), p.display().to_string()])
            .collect(),
        observe: Observe {
            metrics: match (args.metrics, args.metrics_port) {
                (_, Some(port)) => MetricsPorts::From(port),
                (true, None) => MetricsPorts::Auto,
                (false, None) => MetricsPorts::Off,
            },
            otlp_endpoint: args.otlp_endpoint.clone(),
            log_format: args.logs.log_format,
        },
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut cluster = Cluster::start(&spec).await?;
        println!("dsvl is up:");
        let rows = listen_table(&args, &cluster);
        let width = rows.iter().map(|(k, _)| k.len()).max().unwrap_or(0);
        for (what, where_) in &rows {
            println!("  {what:<width$}  {where_}");
        }
        println!("  internal links: mutual TLS (a throwaway certificate authority for this run)");
        if args.api_keys_file.is_none() {
            println!(
                "  no API keys (--api-keys-file): the gateway serves everyone, started with --allow-unauthenticated"
            );
        }
        println!("Ctrl-C stops everything.");
        let signal = dsvl_telemetry::shutdown_signal();
        tokio::pin!(signal);
        loop {
            tokio::select! {
                () = &mut signal => break,
                () = tokio::time::sleep(Duration::from_millis(500)) => {
                    if let Some(why) = cluster.gateway_exited() {
                        cluster.stop();
                        anyhow::bail!("{why}; stopped the rest of the cluster");
                    }
                    for what in cluster.heal().await {
                        eprintln!("dsvl up: {what}");
                    }
                }
            }
        }
        eprintln!("stopping…");
        cluster.stop();
        eprintln!("stopped");
        Ok(())
    })
}
