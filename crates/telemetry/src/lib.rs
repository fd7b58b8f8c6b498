//! One way to observe every dsvl service.
//!
//! * [`init`]: `tracing` with an `EnvFilter` (`RUST_LOG`, default `info`), human or JSON logs
//!   on stderr ([`logs`]), and, when an OTLP endpoint is configured, spans exported over
//!   OTLP/gRPC.
//! * [`extract_trace_context`] / [`inject_trace_context`]: W3C `traceparent`/`tracestate` in gRPC
//!   metadata, so a request keeps one trace across the gateway and both tiers.
//! * [`serve_prometheus`]: the `/metrics` endpoint on its own port, every metric described
//!   from [`catalog`] (the one list of every tier's metrics).
//! * [`deadline`]: deadlines from `grpc-timeout` and the HTTP timeout headers, capped, never
//!   panicking on hostile values.
//! * [`server`]: the gRPC server skeleton (health, probes, reflection) and the one drain
//!   mechanism of every service.
//! * [`probes`]: `startup` / readiness / `liveness` on grpc.health.v1 for Kubernetes probes.
//! * [`progress`]: progress of long work, as a bar on a terminal and log lines otherwise.
#![deny(missing_docs)]

pub mod catalog;
pub mod deadline;
pub mod health;
pub mod logs;
pub mod oversize;
pub mod probes;
pub mod progress;
pub mod server;

pub use deadline::{answer_by, grpc_timeout, DeadlineError, MAX_DEADLINE};
pub use logs::{LogArgs, LogFormat};

use std::net::SocketAddr;

use opentelemetry::propagation::{Extractor, Injector};
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// Telemetry setup errors.
#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    /// The OTLP exporter could not be built.
    #[error("OTLP exporter: {0}")]
    Otlp(String),
    /// The Prometheus endpoint could not be started.
    #[error("Prometheus endpoint: {0}")]
    Prometheus(String),
    /// gRPC reflection could not be set up.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The internal health port could not be served.
    #[error("health port: {0}")]
    Listen(String),
}

/// Keeps the tracer provider alive; flushes pending spans on drop.
pub struct TelemetryGuard {
    provider: Option<SdkTracerProvider>,
    /// The exporter's own runtime, when `init` was called outside one (it needs a reactor).
    runtime: Option<tokio::runtime::Runtime>,
}

impl Drop for TelemetryGuard {
    fn drop(&mut self) {
        if let Some(p) = self.provider.take() {
            let _ = p.shutdown();
        }
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_background();
        }
    }
}

/// Options of [`init`].
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// `service.name` of exported spans.
    pub service_name: String,
    /// OTLP/gRPC collector endpoint (e.g. `http://otel-collector:4317`); no export when `None`.
    pub otlp_endpoint: Option<String>,
    /// Human-readable or JSON log lines.
    pub log_format: LogFormat,
}

/// Installs the global subscriber and propagator. Call once, early in `main`.
///
/// # Errors
/// When the OTLP exporter cannot be built (bad endpoint).
pub fn init(config: &TelemetryConfig) -> Result<TelemetryGuard, TelemetryError> {
    opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    // The tonic exporter spawns its connection on the current tokio runtime; a process that
    // calls `init` before starting one (or never starts one, like a worker rank) gets a small
    // runtime of its own for it.
    let mut runtime = None;
    let _enter = match (&config.otlp_endpoint, tokio::runtime::Handle::try_current()) {
        (Some(_), Err(_)) => {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .thread_name("otlp-export")
                .enable_all()
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let handle = rt.handle().clone();
            runtime = Some(rt);
            Some(handle)
        }
        _ => None,
    };
    let _guard = _enter.as_ref().map(tokio::runtime::Handle::enter);
    let provider = match &config.otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_tonic()
                .with_endpoint(endpoint.clone())
                .build()
                .map_err(|e| TelemetryError::Otlp(e.to_string()))?;
            let resource = opentelemetry_sdk::Resource::builder()
                .with_service_name(config.service_name.clone())
                .build();
            Some(
                SdkTracerProvider::builder()
                    .with_batch_exporter(exporter)
                    .with_resource(resource)
                    .build(),
            )
        }
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer(config.service_name.clone())));
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let result = match config.log_format {
        LogFormat::Json => registry.with(logs::JsonLayer::new(std::io::stderr)).try_init(),
        LogFormat::Text => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .with_ansi(logs::ansi_on_stderr())
                    .with_writer(std::io::stderr),
            )
            .try_init(),
    };
    // A second init in one process (tests) keeps the first subscriber.
    let _ = result;
    Ok(TelemetryGuard { provider, runtime })
}

struct MetadataExtractor<'a>(&'a tonic::metadata::MetadataMap);

impl Extractor for MetadataExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .filter_map(|k| match k {
                tonic::metadata::KeyRef::Ascii(k) => Some(k.as_str()),
                tonic::metadata::KeyRef::Binary(_) => None,
            })
            .collect()
    }
}

struct MetadataInjector<'a>(&'a mut tonic::metadata::MetadataMap);

impl Injector for MetadataInjector<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) =
            (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse())
        {
            self.0.insert(k, v);
        }
    }
}

/// The gRPC metadata key carrying the gateway's request id to the tiers it calls, so their
/// log lines of a request carry the same `request_id` ([`logs`]).
pub const REQUEST_ID_HEADER: &str = "x-request-id";

/// Records the caller's request id ([`REQUEST_ID_HEADER`], at most 128 characters) on `span`'s
/// `request_id` field.
pub fn record_request_id(metadata: &tonic::metadata::MetadataMap, span: &tracing::Span) {
    if let Some(id) =
        metadata.get(REQUEST_ID_HEADER).and_then(|v| v.to_str().ok()).filter(|v| v.len() <= 128)
    {
        span.record("request_id", id);
    }
}

/// Makes the incoming request's W3C trace context (if any) the parent of `span`, and, when
/// tracing is on, records the span's `trace_id` and `span_id` fields (which request spans
/// declare, so that every JSON log line of the request carries them: [`logs`]).
pub fn extract_trace_context(metadata: &tonic::metadata::MetadataMap, span: &tracing::Span) {
    use opentelemetry::trace::TraceContextExt;
    let parent =
        opentelemetry::global::get_text_map_propagator(|p| p.extract(&MetadataExtractor(metadata)));
    let _ = span.set_parent(parent);
    let context = span.context();
    let ids = context.span().span_context().clone();
    if ids.is_valid() {
        span.record("trace_id", ids.trace_id().to_string());
        span.record("span_id", ids.span_id().to_string());
    }
}

/// Writes the current span's trace context into outgoing gRPC metadata.
pub fn inject_trace_context(metadata: &mut tonic::metadata::MetadataMap) {
    let ctx = tracing::Span::current().context();
    opentelemetry::global::get_text_map_propagator(|p| {
        p.inject_context(&ctx, &mut MetadataInjector(metadata))
    });
}

/// Installs the global `metrics` recorder and serves `/metrics` on `addr` (Prometheus text
/// format) for `tier`, with `global_labels` on every series (the decoder and the gateway pass
/// `model_name`) and every metric of the tier described ([`catalog::describe`]). Latency
/// histograms get buckets from 1 ms to 60 s, token counts and batch sizes their own.
///
/// # Errors
/// When the port cannot be bound or a recorder is already installed.
pub fn serve_prometheus(
    addr: SocketAddr,
    tier: catalog::Tier,
    global_labels: &[(&str, &str)],
) -> Result<(), TelemetryError> {
    use metrics_exporter_prometheus::Matcher;
    let err =
        |e: metrics_exporter_prometheus::BuildError| TelemetryError::Prometheus(e.to_string());
    let mut builder = metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets(&[
            0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            60.0,
        ])
        .map_err(err)?
        .set_buckets_for_metric(Matcher::Suffix("_tokens".into()), catalog::TOKEN_BUCKETS)
        .map_err(err)?
        .set_buckets_for_metric(
            Matcher::Full("dsvl_vision_batch_size".into()),
            catalog::BATCH_BUCKETS,
        )
        .map_err(err)?;
    for (k, v) in global_labels {
        builder = builder.add_global_label(*k, *v);
    }
    builder.install().map_err(err)?;
    catalog::describe(tier);
    Ok(())
}

/// Resolves on SIGINT or SIGTERM: the shutdown future every service's `main` passes to `run`.
///
/// # Panics
/// When the SIGTERM handler cannot be installed (no signal support at all).
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// Accepted connections of `listener` with TCP_NODELAY set. tonic ignores its own
/// `tcp_nodelay` setting for `serve_with_incoming*`; without it, small streamed messages wait
/// for Nagle's algorithm and the peer's delayed ACK (about 40 ms per exchange on Linux).
pub fn incoming_nodelay(
    listener: tokio::net::TcpListener,
) -> impl futures::Stream<Item = std::io::Result<tokio::net::TcpStream>> + Send + 'static {
    use tokio_stream::StreamExt;
    tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        if let Ok(c) = &conn {
            let _ = c.set_nodelay(true);
        }
        conn
    })
}
