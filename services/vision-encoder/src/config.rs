//! Command-line flags (each with an environment fallback) and the validated config `run` takes.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dsvl_core::{ClusterSecret, DeviceSpec, ImageLimits, WeightDType};

/// `dsvl-vision`: the DeepSeek-VL vision-encoder service.
#[derive(Parser, Debug, Clone)]
#[command(name = "dsvl-vision", version, about)]
pub struct Args {
    /// gRPC listen address.
    #[arg(long, env = "DSVL_VISION_LISTEN", default_value = "127.0.0.1:50061")]
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address (off when empty).
    #[arg(long, env = "DSVL_VISION_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Internal port: plain-text grpc.health.v1 and reflection for probes (kubelet's gRPC probes present no client certificate); the main port keeps them too.
    #[arg(long, env = "DSVL_VISION_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint directory (Hugging Face layout); the bundled tiny model when absent.
    #[arg(long, env = "DSVL_MODEL")]
    pub model: Option<PathBuf>,
    /// Working dtype of the encoder and of stored embeddings.
    #[arg(long, env = "DSVL_DTYPE", default_value = "f32")]
    pub dtype: WeightDType,
    /// Device: cpu or cuda:N.
    #[arg(long, env = "DSVL_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Shared cache: `redis://host:port` or `redis+cluster://h1:p1,h2:p2`. Without it only the
    /// in-process cache is used and embeddings are returned inline.
    #[arg(long, env = "DSVL_REDIS_URL")]
    pub redis: Option<String>,
    /// Lifetime of cache entries, in seconds.
    #[arg(long, env = "DSVL_CACHE_TTL_SECS", default_value_t = 86_400)]
    pub cache_ttl_secs: u64,
    /// Size of the in-process cache in MiB.
    #[arg(long, env = "DSVL_LOCAL_CACHE_MIB", default_value_t = 1024)]
    pub local_cache_mib: usize,
    /// Redis connect and response timeout, in milliseconds.
    #[arg(long, env = "DSVL_REDIS_TIMEOUT_MS", default_value_t = 500)]
    pub redis_timeout_ms: u64,
    /// How long one replica may hold the encode lease of an image, in milliseconds; others wait
    /// at most this long for its result before encoding themselves.
    #[arg(long, env = "DSVL_LEASE_MS", default_value_t = 30_000)]
    pub lease_ms: u64,
    /// Largest batch the model thread runs.
    #[arg(long, env = "DSVL_MAX_BATCH", default_value_t = 8)]
    pub max_batch: usize,
    /// How long the batcher waits to fill a batch, in milliseconds.
    #[arg(long, env = "DSVL_MAX_WAIT_MS", default_value_t = 5)]
    pub max_wait_ms: u64,
    /// Images that may wait for the model; beyond it requests get RESOURCE_EXHAUSTED.
    #[arg(long, env = "DSVL_QUEUE_CAPACITY", default_value_t = 64)]
    pub queue_capacity: usize,
    /// Most images in one request.
    #[arg(long, env = "DSVL_MAX_IMAGES_PER_REQUEST", default_value_t = 16)]
    pub max_images_per_request: usize,
    /// Largest encoded image, in MiB.
    #[arg(long, env = "DSVL_MAX_IMAGE_MIB", default_value_t = 16)]
    pub max_image_mib: usize,
    /// Largest image side in pixels.
    #[arg(long, env = "DSVL_MAX_IMAGE_SIDE", default_value_t = 16_384)]
    pub max_image_side: u32,
    /// Most pixels (width x height) per image, checked from the header before decoding
    /// (default: Pillow's MAX_IMAGE_PIXELS).
    #[arg(long, env = "DSVL_MAX_IMAGE_PIXELS", default_value_t = dsvl_core::PILLOW_MAX_IMAGE_PIXELS)]
    pub max_image_pixels: u64,
    /// Images decoded and preprocessed at once (each may take up to `--max-image-pixels` x 4
    /// bytes while decoding); more wait, within their deadline, before anything is decoded.
    #[arg(long, env = "DSVL_MAX_CONCURRENT_DECODES", default_value_t = 4)]
    pub max_concurrent_decodes: usize,
    /// Largest gRPC message, in MiB (requests carry images, responses may carry embeddings).
    #[arg(long, env = "DSVL_MAX_MESSAGE_MIB", default_value_t = 128)]
    pub max_message_mib: usize,
    /// Longest a graceful shutdown waits for in-flight requests, in seconds.
    #[arg(long, env = "DSVL_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// The `liveness` health status fails when the model thread has been inside one batch or
    /// step longer than this, in seconds (a hung GPU or a deadlock; an idle thread is alive).
    #[arg(long, env = "DSVL_LIVENESS_STALL_SECS", default_value_t = 600)]
    pub liveness_stall_secs: u64,
    /// The cluster secret (at least 32 bytes): seals the embeddings this replica writes to the
    /// shared cache and verifies those it reads. Required with `--redis` unless `--insecure`.
    #[arg(long, env = "DSVL_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Run internal links without their protection: plain-text gRPC and Redis, no cluster
    /// secret with a shared cache.
    #[arg(long, env = "DSVL_INSECURE")]
    pub insecure: bool,
    /// Mutual TLS on the gRPC port (clients need a certificate from --tls-client-ca-file);
    /// required unless `--insecure`.
    #[command(flatten)]
    pub tls: dsvl_tls::ServerTlsArgs,
    /// TLS to Redis (`rediss://`).
    #[command(flatten)]
    pub redis_tls: dsvl_tls::RedisTlsArgs,
    /// OTLP/gRPC endpoint for traces (also OTEL_EXPORTER_OTLP_ENDPOINT).
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `--log-format text|json` (`DSVL_LOG_FORMAT`).
    #[command(flatten)]
    pub logs: dsvl_telemetry::LogArgs,
}

/// Validated configuration of one vision-encoder replica.
#[derive(Debug, Clone)]
pub struct VisionConfig {
    /// Internal health and reflection port (`--health-listen`).
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint directory, or the bundled model.
    pub model: Option<PathBuf>,
    /// Working dtype.
    pub dtype: WeightDType,
    /// Device.
    pub device: DeviceSpec,
    /// Shared cache URL.
    pub redis: Option<String>,
    /// TLS material for Redis.
    pub redis_tls: dsvl_cache::RedisTls,
    /// Entry lifetime.
    pub cache_ttl: Duration,
    /// In-process cache size in bytes.
    pub local_cache_bytes: usize,
    /// Redis connect/response timeout.
    pub redis_timeout: Duration,
    /// Cross-replica lease lifetime.
    pub lease: Duration,
    /// Batcher: largest batch.
    pub max_batch: usize,
    /// Batcher: fill wait.
    pub max_wait: Duration,
    /// Batcher: queue capacity in images.
    pub queue_capacity: usize,
    /// Most images per request.
    pub max_images_per_request: usize,
    /// Limits on each image.
    pub image_limits: ImageLimits,
    /// Images decoded at once.
    pub max_concurrent_decodes: usize,
    /// Largest gRPC message in bytes.
    pub max_message_bytes: usize,
    /// Drain bound.
    pub drain: Duration,
    /// Longest one unit of model work may take before `liveness` fails.
    pub liveness_stall: Duration,
    /// The cluster secret (sealing shared-cache values); `None` only without a shared cache
    /// or with `--insecure`.
    pub secret: Option<ClusterSecret>,
    /// Mutual TLS on the gRPC port (`None`: plain text).
    pub tls: Option<dsvl_tls::ServerFiles>,
}

pub use dsvl_core::ConfigError;

impl TryFrom<&Args> for VisionConfig {
    type Error = ConfigError;

    fn try_from(a: &Args) -> Result<Self, ConfigError> {
        let positive = |field: &'static str, v: usize| {
            if v == 0 {
                Err(ConfigError { field, reason: "must be at least 1".into() })
            } else {
                Ok(v)
            }
        };
        positive("max-batch", a.max_batch)?;
        positive("queue-capacity", a.queue_capacity)?;
        positive("max-images-per-request", a.max_images_per_request)?;
        positive("max-image-mib", a.max_image_mib)?;
        positive("max-concurrent-decodes", a.max_concurrent_decodes)?;
        let max_image_bytes = a.max_image_mib << 20;
        let max_message_bytes = a.max_message_mib << 20;
        if max_message_bytes < max_image_bytes {
            return Err(ConfigError {
                field: "max-message-mib",
                reason: "smaller than one image".into(),
            });
        }
        let (ca, identity) = a.redis_tls.files();
        let (redis, redis_tls) =
            dsvl_cache::redis_link(a.redis.as_deref(), ca, identity, a.insecure)
                .map_err(|e| ConfigError { field: "redis", reason: e.to_string() })?;
        let secret = dsvl_core::secret::cluster_secret(
            a.cluster_secret_file.as_deref(),
            a.insecure,
            redis.is_some().then_some("the shared cache (--redis)"),
        )?;
        let tls = a
            .tls
            .internal(a.insecure)
            .map_err(|reason| ConfigError { field: "tls-cert-file", reason })?;
        Ok(Self {
            redis_tls,
            health_listen: a.health_listen,
            tls,
            secret,
            model: a.model.clone(),
            dtype: a.dtype,
            device: a.device,
            redis,
            cache_ttl: Duration::from_secs(a.cache_ttl_secs.max(1)),
            local_cache_bytes: a.local_cache_mib << 20,
            redis_timeout: Duration::from_millis(a.redis_timeout_ms.max(1)),
            lease: Duration::from_millis(a.lease_ms.max(10)),
            max_batch: a.max_batch,
            max_wait: Duration::from_millis(a.max_wait_ms),
            queue_capacity: a.queue_capacity,
            max_images_per_request: a.max_images_per_request,
            max_concurrent_decodes: a.max_concurrent_decodes,
            image_limits: ImageLimits {
                max_input_bytes: max_image_bytes,
                max_width: a.max_image_side,
                max_height: a.max_image_side,
                max_alloc: a.max_image_pixels.min(u64::from(a.max_image_side).pow(2)) * 4
                    + (64 << 20),
                max_pixels: a.max_image_pixels,
            },
            max_message_bytes,
            drain: Duration::from_secs(a.drain_secs),
            liveness_stall: Duration::from_secs(a.liveness_stall_secs),
        })
    }
}
