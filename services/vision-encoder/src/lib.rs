//! The vision-encoder tier as a library: [`run`] serves `dsvl.internal.v1.VisionEncoder` on a listener
//! until a shutdown future resolves; `main.rs` only parses flags, sets up telemetry and calls it.
//!
//! Layout: [`config`] (flags and validation), [`batcher`] (queue + model thread), [`encode`]
//! (cache tiers, single flight, leases), [`memory`] (decoded images handed back to the OS),
//! [`service`] (gRPC handlers and status mapping).
#![deny(missing_docs)]

pub mod batcher;
pub mod config;
pub mod encode;
pub mod error;
pub mod memory;
pub mod service;

use std::future::Future;
use std::sync::{Arc, OnceLock};

use dsvl_cache::{BreakerConfig, MemoryCache, RedisCache, RedisConfig, SingleFlight};
use dsvl_checkpoint::{Fingerprint, ServedFacts};
use dsvl_core::codec::EmbeddingDType;
use dsvl_core::EmbeddingSeal;
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::preprocess::{Preprocessor, RgbImage};
use dsvl_models::vision::VisionEncoder;
use dsvl_proto::internal::vision_encoder_server::VisionEncoderServer;
use dsvl_telemetry::probes::{self, Watchdog};
use dsvl_telemetry::server::GrpcBase;
use tokio::net::TcpListener;

pub use config::{Args, VisionConfig};

use batcher::{Batcher, BatcherConfig};
use encode::{Expected, Pipeline};
use service::VisionService;

/// Why the service stopped.
#[derive(Debug, thiserror::Error)]
pub enum VisionError {
    /// The TLS files are unusable.
    #[error("TLS: {0}")]
    Tls(#[from] dsvl_tls::TlsError),
    /// The model could not be loaded or warmed up.
    #[error("model: {0}")]
    Model(#[from] dsvl_models::ModelError),
    /// The cache could not be configured.
    #[error("cache: {0}")]
    Cache(#[from] dsvl_cache::CacheError),
    /// The gRPC server failed.
    #[error("server: {0}")]
    Transport(#[from] tonic::transport::Error),
    /// Reflection setup failed.
    #[error("reflection: {0}")]
    Reflection(String),
    /// The loading task panicked.
    #[error("model loading task failed: {0}")]
    Join(String),
}

fn load_pipeline(cfg: &VisionConfig, watchdog: Arc<Watchdog>) -> Result<Pipeline, VisionError> {
    let source = cfg.model.clone().map_or(ModelSource::Bundled, ModelSource::Dir);
    let ckpt = Checkpoint::open(&source).map_err(dsvl_models::ModelError::from)?;
    let device = open_device(cfg.device)?;
    // Tests: a load that takes as long as they need (health must stay NOT_SERVING meanwhile).
    while dsvl_core::failpoint::hit(dsvl_core::failpoint::VISION_LOAD_HOLD) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let t = std::time::Instant::now();
    let encoder = dsvl_telemetry::progress::loading("loading vision tower", |p| {
        VisionEncoder::load(&ckpt, candle_dtype(cfg.dtype), &device, Some(p))
    })?;
    // The served facts, the same reader as the gateway's and the decoder's: the fingerprint
    // goes into every cache key, and the tower must give what the language model takes.
    let facts =
        ServedFacts::read(&ckpt, Fingerprint::Compute).map_err(dsvl_models::ModelError::from)?;
    let vision = facts.vision.as_ref().expect("VisionEncoder::load refuses text-only models");
    if (encoder.num_tokens(), encoder.hidden_size()) != (vision.image_tokens, facts.llm.hidden_size)
    {
        return Err(VisionError::Model(dsvl_models::ModelError::config(
            "config.json",
            format!(
                "the vision tower gives {} x {} embeddings, but processor_config.json and the \
                 language model take {} x {}",
                encoder.num_tokens(),
                encoder.hidden_size(),
                vision.image_tokens,
                facts.llm.hidden_size
            ),
        )));
    }
    let fingerprint = vision.fingerprint.clone().unwrap_or_default();
    let preprocessor = Preprocessor::new(encoder.preprocess_config().clone(), cfg.image_limits);
    // Warm-up: one forward pass, so the first request does not pay for lazy initialisation and
    // health only turns SERVING once the model demonstrably works.
    let blank = preprocessor.preprocess_rgb(&RgbImage { width: 1, height: 1, data: vec![0; 3] });
    let emb = encoder.forward(&encoder.batch_pixels(&[&blank])?)?;
    let shape = vec![emb.dims()[1] as u32, emb.dims()[2] as u32];
    tracing::info!(model = %source, fingerprint, load_s = t.elapsed().as_secs_f64(), ?shape, "vision model ready");
    let dtype = match cfg.dtype {
        dsvl_core::WeightDType::F32 => EmbeddingDType::F32,
        dsvl_core::WeightDType::F16 => EmbeddingDType::F16,
        dsvl_core::WeightDType::BF16 => EmbeddingDType::BF16,
    };
    if cfg.redis.is_some() && cfg.secret.is_none() {
        tracing::warn!("--insecure: shared-cache values are sealed without the cluster secret; anyone who can write to Redis can forge embeddings");
    }
    let shared = match &cfg.redis {
        Some(url) => Some(Arc::new(RedisCache::new(RedisConfig {
            url: url.clone(),
            tls: cfg.redis_tls.clone(),
            connect_timeout: cfg.redis_timeout,
            response_timeout: cfg.redis_timeout,
            breaker: BreakerConfig::default(),
        })?)),
        None => None,
    };
    Ok(Pipeline {
        batcher: Arc::new(Batcher::start(
            encoder,
            BatcherConfig {
                max_batch: cfg.max_batch,
                max_wait: cfg.max_wait,
                capacity: cfg.queue_capacity,
            },
            watchdog,
        )),
        preprocessor,
        expected: Expected { fingerprint, dtype, shape },
        seal: EmbeddingSeal::from_secret(cfg.secret.as_ref()),
        local: Arc::new(MemoryCache::new(cfg.local_cache_bytes)),
        shared,
        flights: SingleFlight::new(),
        ttl: cfg.cache_ttl,
        lease: cfg.lease,
        decode_slots: Arc::new(tokio::sync::Semaphore::new(cfg.max_concurrent_decodes)),
    })
}

/// Serves the vision encoder on `listener` until `shutdown` resolves, then drains: health goes
/// NOT_SERVING, new requests get UNAVAILABLE, in-flight ones finish within `config.drain`.
///
/// Health (`grpc.health.v1`, service `dsvl.internal.v1.VisionEncoder` and `""`) is NOT_SERVING until the
/// model is loaded and a warm-up forward pass has run; `startup` and `liveness` serve the
/// Kubernetes probes ([`dsvl_telemetry::probes`]).
///
/// # Errors
/// The model cannot be loaded, or the server fails.
pub async fn run(
    config: VisionConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), VisionError> {
    let base = GrpcBase::new::<VisionEncoderServer<VisionService>>(&[
        dsvl_proto::internal::FILE_DESCRIPTOR_SET,
    ])
    .await
    .map_err(|e| VisionError::Reflection(e.to_string()))?;
    let GrpcBase { health, drain, router, internal } = base;
    let watchdog = Watchdog::new("vision-model");
    let _liveness =
        probes::spawn_liveness(health.clone(), vec![watchdog.clone()], config.liveness_stall);
    let pipeline = Arc::new(OnceLock::new());
    let svc = VisionService {
        pipeline: pipeline.clone(),
        max_images: config.max_images_per_request,
        drain: drain.clone(),
    };
    let tls =
        config.tls.clone().map(|f| dsvl_tls::watch_server(f, &[dsvl_tls::ALPN_H2])).transpose()?;
    if tls.is_none() {
        tracing::warn!("--insecure: gRPC in plain text; callers are not authenticated");
    }
    let server_svc = VisionEncoderServer::new(svc)
        .max_decoding_message_size(config.max_message_bytes)
        .max_encoding_message_size(config.max_message_bytes);
    let main = router.add_service(server_svc).serve_with_incoming_shutdown(
        dsvl_tls::connections(listener, tls, dsvl_tls::ConnectionLimits::INTERNAL),
        drain.stopped(),
    );
    let internal =
        dsvl_telemetry::server::serve_internal(internal, config.health_listen, drain.stopped());
    let server = async {
        tokio::try_join!(async { main.await.map_err(VisionError::from) }, async {
            internal.await.map_err(|e| VisionError::Reflection(e.to_string()))
        })
        .map(|_| ())
    };
    tokio::pin!(server);

    let load_cfg = config.clone();
    let model_thread = watchdog.clone();
    let mut loading = tokio::task::spawn_blocking(move || load_pipeline(&load_cfg, watchdog));
    let mut loaded = false;
    let mut dead = false;
    let mut check = tokio::time::interval(std::time::Duration::from_millis(250));
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = check.tick(), if loaded && !dead => {
                // A dead model thread cannot encode: stop taking traffic (the gateway's health
                // poll sees it) as liveness asks for a restart.
                if model_thread.is_dead() {
                    dead = true;
                    tracing::error!("the model thread died: NOT_SERVING until restarted");
                    probes::set_ready::<VisionEncoderServer<VisionService>>(&health, false).await;
                }
            }
            r = &mut server => return r,
            r = &mut loading, if !loaded => {
                loaded = true;
                match r {
                    Ok(Ok(p)) => {
                        let _ = pipeline.set(Arc::new(p));
                        probes::set_ready::<VisionEncoderServer<VisionService>>(&health, true).await;
                        probes::started(&health).await;
                    }
                    Ok(Err(e)) => return Err(e),
                    Err(e) => return Err(VisionError::Join(e.to_string())),
                }
            }
            () = &mut shutdown => break,
        }
    }
    match drain
        .drain::<VisionEncoderServer<VisionService>, _, _>(&health, server.as_mut(), config.drain)
        .await
    {
        Some(r) => r,
        None => Ok(()),
    }
}
