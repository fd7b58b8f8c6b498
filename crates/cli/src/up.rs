//! `dsvl up`: the local cluster in one command; runs until Ctrl-C (or SIGTERM), then stops
//! every process it started.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{ensure, Result};
use clap::Args;

use crate::cluster::{Cluster, ClusterSpec};
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
}

/// Runs the command.
pub fn run(args: UpArgs) -> Result<()> {
    ensure!(args.tp >= 1, "--tp must be at least 1");
    let spec = ClusterSpec {
        model: args.model.model,
        dtype: args.model.dtype,
        device: args.model.device,
        tp: args.tp,
        redis: args.redis,
        grpc_addr: args.grpc_addr,
        http_addr: args.http_addr,
        gateway_args: args
            .api_keys_file
            .iter()
            .flat_map(|p| ["--api-keys-file".to_string(), p.display().to_string()])
            .collect(),
    };
    tokio::runtime::Runtime::new()?.block_on(async {
        let mut cluster = Cluster::start(&spec).await?;
        println!("dsvl is up:");
        println!(
            "  gRPC   {}   (dsvl.v1.Chat; try `dsvl chat --gateway {} --chat CHAT.json`)",
            cluster.grpc_url, cluster.grpc_url
        );
        println!("  HTTP   {}/v1/chat/completions   (OpenAI-compatible)", cluster.http_url);
        println!("  health {}/health", cluster.http_url);
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
