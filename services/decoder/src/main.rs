//! `dsvl-decoder`: flags, telemetry, signals. Rank 0 serves gRPC; `--worker` processes (and
//! non-leader nodes of a LeaderWorkerSet group) run a worker rank.

use anyhow::Context;
use clap::Parser;
use dsvl_decoder::{group, run, Args, DecoderConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Freed activations are reused instead of refaulted (dsvl_core::allocator).
    dsvl_core::allocator::keep_freed_memory();
    let _telemetry = dsvl_telemetry::init(&dsvl_telemetry::TelemetryConfig {
        service_name: "dsvl-decoder".into(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        log_format: args.logs.log_format,
    })?;
    let config = DecoderConfig::try_from(&args)?;
    if args.worker || args.node_index > 0 {
        group::run_worker_process(&args).context("worker rank failed")?;
        return Ok(());
    }
    if let Some(addr) = args.metrics_listen {
        let name = args.served_model_name();
        dsvl_telemetry::serve_prometheus(
            addr,
            dsvl_telemetry::catalog::Tier::Decoder,
            &[("model_name", &name)],
        )?;
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("cannot listen on {}", args.listen))?;
        tracing::info!(listen = %listener.local_addr()?, tp = args.tp, "dsvl-decoder starting");
        run(args.clone(), config, listener, dsvl_telemetry::shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
