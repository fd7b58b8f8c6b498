//! `dsvl-vision`: flags, telemetry, signals; everything else is in the library.

use anyhow::Context;
use clap::Parser;
use dsvl_vision::{run, Args, VisionConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    // Freed activations are reused instead of refaulted (dsvl_core::allocator).
    dsvl_core::allocator::keep_freed_memory();
    let _telemetry = dsvl_telemetry::init(&dsvl_telemetry::TelemetryConfig {
        service_name: "dsvl-vision".into(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        log_format: args.logs.log_format,
    })?;
    let config = VisionConfig::try_from(&args)?;
    if let Some(addr) = args.metrics_listen {
        dsvl_telemetry::serve_prometheus(addr, dsvl_telemetry::catalog::Tier::Vision, &[])?;
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("cannot listen on {}", args.listen))?;
    tracing::info!(listen = %listener.local_addr()?, "dsvl-vision starting");
    run(config, listener, dsvl_telemetry::shutdown_signal()).await?;
    tracing::info!("stopped");
    Ok(())
}
