//! The gateway as a library: [`run`] serves `dsvl.v1.Chat` (gRPC) and the OpenAI-compatible
//! HTTP API until a shutdown future resolves; `main.rs` parses flags and sets up telemetry.
//!
//! Layout: [`config`] (flags), [`tenancy`] (keys, quotas, cache salt), [`upstream`] (replica
//! pools, health, least-work and rendezvous routing, retry budget), [`prefix_route`]
//! (prefix-aware decoder routing), [`prepare`] (validation, template, tokenization),
//! [`images`] (vision stage), [`chat`] (decoder stage and streaming), [`stops`], [`fetch`]
//! (image URLs), [`grpc`] and [`http`] (the two front ends), [`openai_fields`] (what each
//! OpenAI request field does here), [`error`] (status mappings).
#![deny(missing_docs)]

pub mod address_policy;
pub mod chat;
pub mod config;
pub mod error;
pub mod fetch;
pub mod grpc;
pub mod http;
pub mod http_completions;
mod http_errors;
pub mod http_reply;
pub mod http_server;
mod http_tokenize;
pub mod images;
pub mod openai_fields;
pub mod prefix_route;
pub mod prepare;
pub mod quota;
pub mod served;
pub mod stops;
mod structured;
pub mod tenancy;
pub mod tools;
pub mod untrusted;
pub mod upstream;
mod vllm_extras;

use dsvl_telemetry::probes;
use dsvl_telemetry::server::GrpcBase;
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
    /// Quotas shared by every replica (with `--redis`).
    pub quotas: Option<quota::SharedBuckets>,
    /// The vision tier's model info (fingerprint, dtype, shape), refreshed in the background.
    pub vision_info: RwLock<Option<InfoResponse>>,
    /// Retry budget of vision calls.
    pub vision_retries: RetryBudget,
    /// Retry budget of decoder calls (before the first token only).
    pub decoder_retries: RetryBudget,
    /// Draining state (new requests are refused while draining; shared with both listeners).
    pub drain: Arc<dsvl_telemetry::server::Drain>,
    /// Requests in flight (capped by `max_in_flight`).
    pub in_flight: std::sync::atomic::AtomicUsize,
    /// Fetches remote `image_url`s.
    pub fetcher: fetch::ImageFetcher,
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
    /// The TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(#[from] dsvl_tls::TlsError),
    /// The image-URL trust roots could not be read.
    #[error("image URLs: {0}")]
    ImageFetch(String),
}

impl Gateway {
    /// Builds the state: reads the model's tokenizer, sets up pools (not yet resolved).
    ///
    /// # Errors
    /// The model directory or the Redis URL is unusable.
    pub fn new(
        config: GatewayConfig,
        drain: Arc<dsvl_telemetry::server::Drain>,
    ) -> Result<Self, RunError> {
        let model = ServedModel::load(config.model.as_deref(), config.model_name.clone())?;
        let redis = match &config.redis {
            Some(url) => Some(Arc::new(RedisCache::new(RedisConfig {
                url: url.clone(),
                tls: config.redis_tls.clone(),
                connect_timeout: Duration::from_millis(500),
                response_timeout: Duration::from_millis(500),
                breaker: BreakerConfig::default(),
            })?)),
            None => None,
        };
        let fetcher = fetch::ImageFetcher::new(&config).map_err(RunError::ImageFetch)?;
        if config.upstream_tls.is_none() {
            tracing::warn!("--insecure: the vision and decoder tiers are called in plain text");
        }
        let upstream_tls = config
            .upstream_tls
            .clone()
            .map(|f| dsvl_tls::watch_client(f, &[dsvl_tls::ALPN_H2]))
            .transpose()?;
        Ok(Self {
            fetcher,
            tenancy: Tenancy::new(
                &config.api_keys,
                config.allow_unauthenticated,
                config.tenant_rpm,
                config.tenant_ipm,
                config.tenant_tpm,
            )
            .with_max_concurrency(config.tenant_max_concurrency)
            .with_tenant_limits(config.tenant_quotas.clone()),
            quotas: redis.clone().map(quota::SharedBuckets::new),
            in_flight: std::sync::atomic::AtomicUsize::new(0),
            vision: Pool::with_tls(Tier::Vision, config.vision.clone(), upstream_tls.clone()),
            decoder: Pool::with_tls(Tier::Decoder, config.decoder.clone(), upstream_tls),
            redis,
            vision_info: RwLock::new(None),
            vision_retries: RetryBudget::new(0.2, 10.0),
            decoder_retries: RetryBudget::new(0.2, 10.0),
            drain,
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
    let drain_time = config.drain;
    let refresh_every = config.refresh;
    let health_listen = config.health_listen;
    if health_listen.is_none() {
        tracing::warn!("health and reflection are served on the public gRPC port; give --health-listen to move them to an internal one");
    }
    let GrpcBase { health, drain, router, internal } =
        GrpcBase::with_limits::<ChatServer<grpc::ChatService>>(
            &[dsvl_proto::v1::FILE_DESCRIPTOR_SET],
            config.grpc_limits,
            health_listen.is_none(),
        )
        .await
        .map_err(|e| RunError::Reflection(e.to_string()))?;
    let gw_drain = drain.clone();
    let gw = Arc::new(
        tokio::task::spawn_blocking(move || Gateway::new(config, gw_drain))
            .await
            .map_err(|e| RunError::Reflection(e.to_string()))??,
    );
    // No model to load: started at once, alive while the runtime answers (`probes`); readiness
    // (`""`) follows the upstreams.
    probes::started(&health).await;

    // Background: re-resolve endpoints, poll health and load, follow readiness.
    let refresher = {
        let gw = gw.clone();
        let health = health.clone();
        tokio::spawn(async move {
            loop {
                gw.refresh().await;
                if !gw.drain.is_draining() {
                    let ready = gw.readiness().0;
                    probes::set_ready::<ChatServer<grpc::ChatService>>(&health, ready).await;
                }
                tokio::time::sleep(refresh_every).await;
            }
        })
    };

    let key_reload = gw
        .config
        .api_keys_file
        .clone()
        .map(|file| tokio::spawn(watch_keys(gw.clone(), file, KEY_RELOAD_PERIOD)));

    let (grpc_tls, http_tls) = match gw.config.tls.clone() {
        Some(files) => (
            Some(dsvl_tls::watch_server(files.clone(), &[dsvl_tls::ALPN_H2])?),
            Some(dsvl_tls::watch_server(files, &[dsvl_tls::ALPN_HTTP1])?),
        ),
        None => (None, None),
    };
    let max_message = gw.config.max_images.max(1) * gw.config.max_image_bytes + (4 << 20);
    let chat = ChatServer::new(grpc::ChatService { gateway: gw.clone() })
        .max_decoding_message_size(max_message)
        .max_encoding_message_size(max_message);
    let chat =
        tonic::service::interceptor::InterceptedService::new(chat, grpc::authenticate(gw.clone()));
    let grpc_server = router.add_service(chat).serve_with_incoming_shutdown(
        dsvl_tls::connections(
            grpc,
            grpc_tls,
            dsvl_tls::ConnectionLimits {
                max_connections: gw.config.grpc_max_connections,
                ..dsvl_tls::ConnectionLimits::PUBLIC
            },
        ),
        drain.stopped(),
    );
    let http_server = http_server::serve(
        http,
        http::router(gw.clone()),
        gw.config.http_timeouts,
        http_tls,
        drain.stopped(),
    );
    let internal = dsvl_telemetry::server::serve_internal(internal, health_listen, drain.stopped());
    let servers = async {
        tokio::try_join!(
            async { grpc_server.await.map_err(RunError::from) },
            async { http_server.await.map_err(RunError::from) },
            async { internal.await.map_err(|e| RunError::Reflection(e.to_string())) },
        )
        .map(|_| ())
    };
    tokio::pin!(servers);
    tokio::pin!(shutdown);
    tokio::select! {
        r = &mut servers => {
            refresher.abort();
            key_reload.iter().for_each(tokio::task::JoinHandle::abort);
            return r;
        }
        () = &mut shutdown => {}
    }
    let result = drain
        .drain::<ChatServer<grpc::ChatService>, _, _>(&health, servers.as_mut(), drain_time)
        .await;
    refresher.abort();
    key_reload.iter().for_each(tokio::task::JoinHandle::abort);
    result.unwrap_or(Ok(()))
}

/// How often the keys file is checked for changes.
const KEY_RELOAD_PERIOD: Duration = Duration::from_secs(2);

/// Re-reads the keys file whenever its modification time or size changes (a rotated Secret:
/// Kubernetes swaps the mounted file atomically) and swaps the key table. A file that cannot
/// be read or parsed keeps the current keys and is logged; an emptied file refuses everyone
/// (unless `--allow-unauthenticated`).
pub fn watch_keys(
    gw: Arc<Gateway>,
    file: std::path::PathBuf,
    period: Duration,
) -> impl Future<Output = ()> + Send + 'static {
    let stamp =
        |p: &std::path::Path| std::fs::metadata(p).ok().map(|m| (m.modified().ok(), m.len()));
    // Taken now, not when the task first runs: any change from here on is seen.
    let mut last = stamp(&file);
    async move {
        loop {
            tokio::time::sleep(period).await;
            let now = stamp(&file);
            if now == last {
                continue;
            }
            last = now;
            match config::read_keys(Some(&file), &gw.config.api_keys_inline) {
                Ok(keys) => {
                    gw.tenancy.replace_keys(&keys);
                    tracing::info!(keys = keys.len(), file = %file.display(), "API keys reloaded");
                }
                Err(e) => {
                    tracing::warn!(error = %e, "API keys file unusable; keeping the current keys")
                }
            }
        }
    }
}

#[cfg(test)]
mod key_reload_tests {
    use super::*;

    #[tokio::test]
    async fn a_rotated_keys_file_applies_without_a_restart() {
        use clap::Parser;
        let file = std::env::temp_dir().join(format!("dsvl-keys-{}", std::process::id()));
        std::fs::write(&file, "sk-old acme\n").unwrap();
        let args = Args::parse_from([
            "dsvl-gateway",
            "--decoder",
            "127.0.0.1:1",
            "--api-keys-file",
            file.to_str().unwrap(),
            "--api-keys",
            "sk-inline=globex",
            "--insecure",
        ]);
        let config = GatewayConfig::try_from(&args).unwrap();
        let gw = Arc::new(Gateway::new(config, dsvl_telemetry::server::Drain::new()).unwrap());
        let auth = |k: &str| gw.tenancy.authenticate(Some(&format!("Bearer {k}"))).map(|t| t.id);
        assert_eq!(auth("sk-old").unwrap(), "acme");
        let watcher = tokio::spawn(watch_keys(gw.clone(), file.clone(), Duration::from_millis(20)));
        std::fs::write(&file, "sk-new acme\nsk-more initech\n").unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while auth("sk-new").is_err() {
            assert!(std::time::Instant::now() < deadline, "the new key never applied");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(auth("sk-old").is_err(), "the rotated-out key is refused");
        assert_eq!(auth("sk-more").unwrap(), "initech");
        assert_eq!(auth("sk-inline").unwrap(), "globex", "inline keys stay");
        // A broken file keeps the current keys.
        std::fs::write(&file, "not a valid line at all\n").unwrap();
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(auth("sk-new").unwrap(), "acme");
        watcher.abort();
        std::fs::remove_file(&file).unwrap();
    }
}
