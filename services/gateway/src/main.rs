//! `dsvl-gateway`: flags, telemetry, listeners, signals; the rest is [`dsvl_gateway::run`].

use anyhow::Context;
use clap::Parser;
use dsvl_gateway::{run, Args, GatewayConfig};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let _telemetry = dsvl_telemetry::init(&dsvl_telemetry::TelemetryConfig {
        service_name: "dsvl-gateway".into(),
        otlp_endpoint: args.otlp_endpoint.clone(),
        log_format: args.logs.log_format,
    })?;
    let config = GatewayConfig::try_from(&args)?;
    if let Some(addr) = args.metrics_listen {
        dsvl_telemetry::serve_prometheus(
            addr,
            dsvl_telemetry::catalog::Tier::Gateway,
            &[("model_name", &config.model_name)],
        )?;
    }
    tokio::runtime::Runtime::new()?.block_on(async {
        let grpc = tokio::net::TcpListener::bind(args.grpc_listen).await.with_context(|| format!("cannot listen on {}", args.grpc_listen))?;
        let http = tokio::net::TcpListener::bind(args.http_listen).await.with_context(|| format!("cannot listen on {}", args.http_listen))?;
        tracing::info!(grpc = %grpc.local_addr()?, http = %http.local_addr()?, "dsvl-gateway starting");
        run(config, grpc, http, dsvl_telemetry::shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}
