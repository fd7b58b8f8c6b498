//! The gateway as a library: [`run`] serves `dsvl.v1.Chat` (gRPC) and the OpenAI-compatible
//! HTTP API until a shutdown future resolves; `main.rs` parses flags and sets up telemetry.
//!
//! Layout: [`config`] (flags), [`tenancy`] (keys, quotas, cache salt), [`upstream`] (replica
//! pools, health, routing, retry budget), [`prepare`] (validation, template, tokenization),
//! [`images`] (vision stage), [`chat`] (decoder stage and streaming), [`stops`], [`fetch`]
//! (image URLs), [`grpc`] and [`http`] (the two front ends), [`error`] (status mappings).
#![deny(missing_docs)]

pub mod chat;
pub mod config;
pub mod error;
pub mod fetch;
pub mod grpc;
pub mod http;
pub mod images;
pub mod prepare;
pub mod served;
pub mod stops;
pub mod tenancy;
pub mod upstream;

use dsvl_telemetry::probes;
use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use dsvl_cache::{BreakerConfig, RedisCache, RedisConfig};
use dsvl_proto::internal::InfoResponse;
use dsvl_proto::v1::chat_server::ChatServer;
use tokio::net::TcpListener;

pub use config::{Args, GatewayConfig};

use served::ServedModel;
use tenancy::Tenancy;
use upstream::{Pool, RetryBudget, Tier};

/// Shared state of the gateway.
pub struct Gateway {
    /// Configuration.
    pub config: GatewayConfig,
    /// Tokenizer and model facts.
    pub model: ServedModel,
    /// Keys, tenants, quotas.
    pub tenancy: Tenancy,
    /// Vision replicas.
    pub vision: Arc<Pool>,
    /// Decoder groups.
    pub decoder: Arc<Pool>,
    /// Shared embedding cache, for the skip-if-present probe.
    pub redis: Option<Arc<RedisCache>>,
    /// The vision tier's model info (fingerprint, dtype, shape), refreshed in the background.
    pub vision_info: RwLock<Option<InfoResponse>>,
    /// Retry budget of vision calls.
    pub vision_retries: RetryBudget,
    /// Retry budget of decoder calls (before the first token only).
    pub decoder_retries: RetryBudget,
}

/// Why the gateway stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The tokenizer or model config could not be read.
    #[error("model: {0}")]
    Model(#[from] dsvl_checkpoint::CheckpointError),
    /// The Redis URL is unusable.
    #[error("cache: {0}")]
    Cache(#[from] dsvl_cache::CacheError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// The HTTP server failed.
    #[error("HTTP server: {0}")]
    Http(#[from] std::io::Error),
    /// Reflection setup failed.
    #[error("reflection: {0}")]
    Reflection(String),
}

impl Gateway {
    /// Builds the state: reads the model's tokenizer, sets up pools (not yet resolved).
    ///
    /// # Errors
    /// The model directory or the Redis URL is unusable.
    pub fn new(config: GatewayConfig) -> Result<Self, RunError> {
        let model = ServedModel::load(config.model.as_deref(), config.model_name.clone())?;
        let redis = match &config.redis {
            Some(url) => Some(Arc::new(RedisCache::new(RedisConfig {
                url: url.clone(),
                connect_timeout: Duration::from_millis(500),
                response_timeout: Duration::from_millis(500),
                breaker: BreakerConfig::default(),
            })?)),
            None => None,
        };
        Ok(Self {
            tenancy: Tenancy::new(
                &config.api_keys,
                config.tenant_rpm,
                config.tenant_ipm,
                config.tenant_tpm,
            ),
            vision: Pool::new(Tier::Vision, config.vision.clone()),
            decoder: Pool::new(Tier::Decoder, config.decoder.clone()),
            redis,
            vision_info: RwLock::new(None),
            vision_retries: RetryBudget::new(0.2, 10.0),
            decoder_retries: RetryBudget::new(0.2, 10.0),
            model,
            config,
        })
    }

    /// Whether requests can be served now, and why not.
    pub fn readiness(&self) -> (bool, String) {
        let healthy =
            |p: &Pool| p.replicas().iter().filter(|r| r.healthy.load(Ordering::SeqCst)).count();
        let decoders = healthy(&self.decoder);
        if decoders == 0 {
            return (false, "no healthy decoder group".into());
        }
        if self.vision.is_configured() && healthy(&self.vision) == 0 {
            return (true, format!("{decoders} decoder group(s); no healthy vision replica (text-only requests work)"));
        }
        (true, format!("{decoders} decoder group(s), {} vision replica(s)", healthy(&self.vision)))
    }

    /// One refresh round: endpoints, health, load, vision model info.
    pub async fn refresh(&self) {
        tokio::join!(self.vision.refresh(), self.decoder.refresh());
        if self.vision.is_configured() {
            self.refresh_vision_info().await;
        }
    }
}

/// Serves gRPC on `grpc` and HTTP on `http` until `shutdown` resolves, then drains: health
/// turns NOT_SERVING, listeners close, in-flight requests get up to `config.drain` to finish.
///
/// # Errors
/// The model cannot be read or a server fails.
pub async fn run(
    config: GatewayConfig,
    grpc: TcpListener,
    http: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), RunError> {
    let drain = config.drain;
    let refresh_every = config.refresh;
    let gw = Arc::new(
        tokio::task::spawn_blocking(move || Gateway::new(config))
            .await
            .map_err(|e| RunError::Reflection(e.to_string()))??,
    );
    let (health, health_service) = tonic_health::server::health_reporter();
    probes::set_ready::<ChatServer<grpc::ChatService>>(&health, false).await;
    // No model to load: started at once, alive while the runtime answers (`probes`); readiness
    // (`""`) follows the upstreams.
    probes::starting(&health).await;
    probes::started(&health).await;

    // Background: re-resolve endpoints, poll health and load, follow readiness.
    let refresher = {
        let gw = gw.clone();
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                gw.refresh().await;
                probes::set_ready::<ChatServer<grpc::ChatService>>(&health, gw.readiness().0).await;
                tokio::time::sleep(refresh_every).await;
            }
        })
    };

    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(dsvl_proto::v1::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .map_err(|e| RunError::Reflection(e.to_string()))?;
    let max_message = gw.config.max_images.max(1) * gw.config.max_image_bytes + (4 << 20);
    let chat = ChatServer::new(grpc::ChatService { gateway: gw.clone() })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);

    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut grpc_stop = stop_rx.clone();
    let grpc_server = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(reflection)
        .add_service(chat)
        .serve_with_incoming_shutdown(dsvl_telemetry::incoming_nodelay(grpc), async move {
            let _ = grpc_stop.wait_for(|s| *s).await;
        });
    let mut http_stop = stop_rx;
    let http = axum::serve::ListenerExt::tap_io(http, |tcp| {
        let _ = tcp.set_nodelay(true);
    });
    let http_server =
        axum::serve(http, http::router(gw.clone())).with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        });
    let servers = async {
        tokio::try_join!(async { grpc_server.await.map_err(RunError::from) }, async {
            http_server.await.map_err(RunError::from)
        })
    };
    tokio::pin!(servers);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut servers => { refresher.abort(); return r.map(|_| ()); }
        () = &mut shutdown => {}
    }
    tracing::info!("draining");
    refresher.abort();
    probes::set_ready::<ChatServer<grpc::ChatService>>(&health, false).await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(drain, &mut servers).await {
        Ok(r) => r.map(|_| ()),
        Err(_) => {
            tracing::warn!("drain timeout reached; stopping with requests still in flight");
            Ok(())
        }
    }
}
