//! Flags (with environment fallbacks, including the LeaderWorkerSet variables) and the
//! validated config.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use dsvl_core::{DeviceSpec, WeightDType};

/// `dsvl-decoder`: one tensor-parallel group of the DeepSeek LLM decoder.
#[derive(Parser, Debug, Clone)]
#[command(name = "dsvl-decoder", version, about)]
pub struct Args {
    /// gRPC listen address (rank 0 only).
    #[arg(long, env = "DSVL_DECODER_LISTEN", default_value = "127.0.0.1:50071")]
    pub listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "DSVL_DECODER_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Internal port: plain-text grpc.health.v1 and reflection for probes (kubelet's gRPC probes present no client certificate); the main port keeps them too.
    #[arg(long, env = "DSVL_DECODER_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint directory; the bundled tiny model when absent.
    #[arg(long, env = "DSVL_MODEL")]
    pub model: Option<PathBuf>,
    /// Name the model is served under, the `model_name` label of every metric (default: the
    /// checkpoint directory's name, as the gateway's).
    #[arg(long, env = "DSVL_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Working dtype.
    #[arg(long, env = "DSVL_DTYPE", default_value = "f32")]
    pub dtype: WeightDType,
    /// Device of rank 0 (`cuda:N`: rank r uses `cuda:N+r` on its node).
    #[arg(long, env = "DSVL_DEVICE", default_value = "cpu")]
    pub device: DeviceSpec,
    /// Tensor-parallel degree (ranks in the group).
    #[arg(long, alias = "world-size", env = "DSVL_TP", default_value_t = 1)]
    pub tp: usize,
    /// Nodes (pods) the group spans; ranks are split evenly (LeaderWorkerSet group size).
    #[arg(long, env = "LWS_GROUP_SIZE", default_value_t = 1)]
    pub nodes: usize,
    /// This node's index; 0 is the leader node (LeaderWorkerSet worker index).
    #[arg(long, env = "LWS_WORKER_INDEX", default_value_t = 0)]
    pub node_index: usize,
    /// Host of the leader node's rendezvous (LeaderWorkerSet leader address).
    #[arg(long, env = "LWS_LEADER_ADDRESS", default_value = "127.0.0.1")]
    pub leader_host: String,
    /// Rendezvous port on the leader (0 picks a free port when the group is all local).
    #[arg(long, env = "DSVL_RENDEZVOUS_PORT", default_value_t = 29500)]
    pub rendezvous_port: u16,
    /// Shared cache for embedding references from the vision tier.
    #[arg(long, env = "DSVL_REDIS_URL")]
    pub redis: Option<String>,
    /// KV cache blocks per rank; overrides the sizing from memory (`--kv-cache-gib`).
    #[arg(long, env = "DSVL_KV_BLOCKS")]
    pub kv_blocks: Option<usize>,
    /// KV cache budget per rank, in GiB (CPU; the pool's pages are only touched as it fills).
    #[arg(long, env = "DSVL_KV_CACHE_GIB", default_value_t = 4.0)]
    pub kv_cache_gib: f64,
    /// Tokens per KV block (a multiple of 32 for the CUDA paged-attention kernel).
    #[arg(long, env = "DSVL_BLOCK_SIZE", default_value_t = 32)]
    pub block_size: usize,
    /// Most sequences in a batch.
    #[arg(long, env = "DSVL_MAX_NUM_SEQS", default_value_t = 64)]
    pub max_num_seqs: usize,
    /// Turn off prefix caching (on by default: KV blocks of finished requests stay cached,
    /// keyed by tenant, tokens and images, and later prompts that start the same way reuse
    /// them instead of prefilling them again).
    #[arg(long, env = "DSVL_NO_PREFIX_CACHE")]
    pub no_prefix_cache: bool,
    /// Token budget of one step: running decodes first, then prompts, prefilled in chunks of
    /// what is left (chunked prefill: a long prompt never stalls the running streams). Default:
    /// 2048 on GPUs, 512 on the CPU.
    #[arg(long, env = "DSVL_MAX_BATCHED_TOKENS")]
    pub max_batched_tokens: Option<usize>,
    /// While streams decode, size prefill chunks so a step costs at most this multiple of a
    /// decode-only step (measured as it runs): prompts over 256 tokens are chunked to fit,
    /// shorter ones run whole, one a step beyond the fit. Default: 1.3 on the CPU, off on GPUs
    /// (0: off).
    #[arg(long, env = "DSVL_MAX_STEP_STRETCH")]
    pub max_step_stretch: Option<f64>,
    /// Most requests waiting for admission; beyond it RESOURCE_EXHAUSTED.
    #[arg(long, env = "DSVL_MAX_WAITING", default_value_t = 256)]
    pub max_waiting: usize,
    /// Deadline of any collective, in seconds (a hung rank fails the group after this).
    #[arg(long, env = "DSVL_COLLECTIVE_TIMEOUT_SECS", default_value_t = 5)]
    pub collective_timeout_secs: u64,
    /// Longest a graceful shutdown waits for in-flight streams, in seconds.
    #[arg(long, env = "DSVL_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// The `liveness` health status fails when the model thread has been inside one batch or
    /// step longer than this, in seconds (a hung GPU or a deadlock; an idle thread is alive).
    #[arg(long, env = "DSVL_LIVENESS_STALL_SECS", default_value_t = 600)]
    pub liveness_stall_secs: u64,
    /// Largest gRPC message in MiB (inline embeddings are 4.5 MiB per image for VL-7B bf16).
    #[arg(long, env = "DSVL_MAX_MESSAGE_MIB", default_value_t = 64)]
    pub max_message_mib: usize,
    /// OTLP/gRPC endpoint for traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `--log-format text|json` (`DSVL_LOG_FORMAT`).
    #[command(flatten)]
    pub logs: dsvl_telemetry::LogArgs,
    /// The cluster secret (at least 32 bytes): verifies the embeddings read from the shared
    /// cache and authenticates the ranks of a group. Required with `--redis` or `--nodes` > 1
    /// unless `--insecure` (a group on one node makes a throwaway key for its ranks).
    #[arg(long, env = "DSVL_CLUSTER_SECRET_FILE")]
    pub cluster_secret_file: Option<PathBuf>,
    /// Run internal links without their protection: plain-text gRPC and Redis, no cluster
    /// secret with a shared cache or a group spanning nodes.
    #[arg(long, env = "DSVL_INSECURE")]
    pub insecure: bool,
    /// Mutual TLS on the gRPC port (clients need a certificate from --tls-client-ca-file);
    /// required on rank 0 unless `--insecure`.
    #[command(flatten)]
    pub tls: dsvl_tls::ServerTlsArgs,
    /// TLS to Redis (`rediss://`).
    #[command(flatten)]
    pub redis_tls: dsvl_tls::RedisTlsArgs,
    /// Internal: run as worker rank `--rank` of a group led at `--leader`.
    #[arg(long, hide = true)]
    pub worker: bool,
    /// Internal (worker): rank.
    #[arg(long, hide = true, default_value_t = 0)]
    pub rank: usize,
    /// Internal (worker): rank on this node; the device is `--device` + this
    /// (`dsvl_engine::group::RankLaunch`).
    #[arg(long, hide = true, default_value_t = 0)]
    pub local_rank: usize,
    /// Internal (worker): leader rendezvous address.
    #[arg(long, hide = true)]
    pub leader: Option<String>,
    /// Internal (worker): exit with the parent.
    #[arg(long, hide = true)]
    pub die_with_parent: bool,
}

/// Validated decoder configuration.
#[derive(Debug, Clone)]
pub struct DecoderConfig {
    /// Internal health and reflection port (`--health-listen`).
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint.
    pub model: Option<PathBuf>,
    /// Working dtype.
    pub dtype: WeightDType,
    /// Device of rank 0.
    pub device: DeviceSpec,
    /// TP degree.
    pub tp: usize,
    /// Nodes the group spans.
    pub nodes: usize,
    /// Rendezvous address the leader binds (`host:port`).
    pub rendezvous_bind: String,
    /// Shared cache URL.
    pub redis: Option<String>,
    /// TLS material for Redis.
    pub redis_tls: dsvl_cache::RedisTls,
    /// KV pool size per rank.
    pub kv: KvSizing,
    /// Tokens per block.
    pub block_size: usize,
    /// Batch limits.
    pub max_num_seqs: usize,
    /// Prefix caching on.
    pub prefix_cache: bool,
    /// Step token budget.
    pub max_batched_tokens: usize,
    /// Pace guard of running streams during prefill (`None`: off).
    pub max_step_stretch: Option<f64>,
    /// Admission queue bound.
    pub max_waiting: usize,
    /// Collective deadline.
    pub collective_timeout: Duration,
    /// Drain bound.
    pub drain: Duration,
    /// Largest gRPC message.
    pub max_message_bytes: usize,
    /// Longest one engine step may take before `liveness` fails.
    pub liveness_stall: Duration,
    /// The cluster secret; `None` only where nothing needs it or with `--insecure`.
    pub secret: Option<dsvl_core::ClusterSecret>,
    /// Mutual TLS on the gRPC port (`None`: plain text).
    pub tls: Option<dsvl_tls::ServerFiles>,
}

pub use dsvl_core::ConfigError;

/// How big the KV pool of each rank is.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KvSizing {
    /// Exactly this many blocks (`--kv-blocks`).
    Blocks(usize),
    /// As many blocks as fit in this many bytes (`--kv-cache-gib`).
    Bytes(u64),
}

impl TryFrom<&Args> for DecoderConfig {
    type Error = ConfigError;

    fn try_from(a: &Args) -> Result<Self, ConfigError> {
        let bad = |field, reason: &str| Err(ConfigError { field, reason: reason.into() });
        for (field, v) in [
            ("tp", a.tp),
            ("nodes", a.nodes),
            ("kv-blocks", a.kv_blocks.unwrap_or(1)),
            ("block-size", a.block_size),
            ("max-num-seqs", a.max_num_seqs),
            ("max-batched-tokens", a.max_batched_tokens.unwrap_or(1)),
        ] {
            if v == 0 {
                return bad(field, "must be at least 1");
            }
        }
        if !(a.kv_cache_gib > 0.0 && a.kv_cache_gib.is_finite()) {
            return bad("kv-cache-gib", "must be a positive number of GiB");
        }
        if a.max_step_stretch.is_some_and(|x| !(x == 0.0 || (x > 1.0 && x.is_finite()))) {
            return bad("max-step-stretch", "must be above 1 (or 0 to turn it off)");
        }
        if !a.tp.is_multiple_of(a.nodes) {
            return bad("nodes", "the tensor-parallel degree must split evenly over the nodes");
        }
        // Worker ranks serve no gRPC and use no Redis (their links to the leader are
        // authenticated by the group key).
        let serves = !(a.worker || a.node_index > 0);
        let (ca, identity) = a.redis_tls.files();
        let (redis, redis_tls) =
            dsvl_cache::redis_link(a.redis.as_deref(), ca, identity, a.insecure || !serves)
                .map_err(|e| ConfigError { field: "redis", reason: e.to_string() })?;
        let needs = if redis.is_some() {
            Some("the shared cache (--redis)")
        } else if a.nodes > 1 {
            Some("a group spanning nodes (--nodes)")
        } else {
            None
        };
        let secret =
            dsvl_core::secret::cluster_secret(a.cluster_secret_file.as_deref(), a.insecure, needs)?;
        let tls = a
            .tls
            .internal(a.insecure || !serves)
            .map_err(|reason| ConfigError { field: "tls-cert-file", reason })?;
        Ok(Self {
            redis_tls,
            health_listen: a.health_listen,
            tls,
            secret,
            model: a.model.clone(),
            dtype: a.dtype,
            device: a.device,
            tp: a.tp,
            nodes: a.nodes,
            rendezvous_bind: if a.nodes == 1 {
                "127.0.0.1:0".into()
            } else {
                format!("0.0.0.0:{}", a.rendezvous_port)
            },
            redis,
            kv: match a.kv_blocks {
                Some(n) => KvSizing::Blocks(n),
                None => KvSizing::Bytes((a.kv_cache_gib * f64::from(1u32 << 30)) as u64),
            },
            block_size: a.block_size,
            max_num_seqs: a.max_num_seqs,
            prefix_cache: !a.no_prefix_cache,
            max_batched_tokens: a.max_batched_tokens.unwrap_or(match a.device {
                DeviceSpec::Cpu => dsvl_engine::scheduler::DEFAULT_MAX_BATCHED_TOKENS_CPU,
                _ => dsvl_engine::scheduler::DEFAULT_MAX_BATCHED_TOKENS_GPU,
            }),
            max_step_stretch: match (a.max_step_stretch, a.device) {
                (Some(x), _) => Some(x).filter(|&x| x > 0.0),
                (None, DeviceSpec::Cpu) => {
                    Some(dsvl_engine::scheduler::DEFAULT_MAX_STEP_STRETCH_CPU)
                }
                (None, _) => None,
            },
            max_waiting: a.max_waiting,
            collective_timeout: Duration::from_secs(a.collective_timeout_secs.max(1)),
            drain: Duration::from_secs(a.drain_secs),
            liveness_stall: Duration::from_secs(a.liveness_stall_secs),
            max_message_bytes: a.max_message_mib << 20,
        })
    }
}

impl Args {
    /// The served model name (`--model-name`, else the gateway's default rule).
    pub fn served_model_name(&self) -> String {
        self.model_name
            .clone()
            .unwrap_or_else(|| dsvl_checkpoint::default_model_name(self.model.as_deref()))
    }
}
