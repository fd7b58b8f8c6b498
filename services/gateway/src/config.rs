//! Flags (with environment fallbacks) and the validated gateway configuration.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// `dsvl-gateway`: the public gRPC and OpenAI-compatible HTTP front door.
#[derive(Parser, Debug, Clone)]
#[command(name = "dsvl-gateway", version, about)]
pub struct Args {
    /// gRPC (dsvl.v1.Chat) listen address.
    #[arg(long, env = "DSVL_GATEWAY_GRPC_LISTEN", default_value = "127.0.0.1:50051")]
    pub grpc_listen: SocketAddr,
    /// HTTP (OpenAI-compatible) listen address.
    #[arg(long, env = "DSVL_GATEWAY_HTTP_LISTEN", default_value = "127.0.0.1:8080")]
    pub http_listen: SocketAddr,
    /// Prometheus `/metrics` listen address.
    #[arg(long, env = "DSVL_GATEWAY_METRICS_LISTEN")]
    pub metrics_listen: Option<SocketAddr>,
    /// Internal port: grpc.health.v1 and reflection move here, off the public gRPC port (which then serves only dsvl.v1.Chat).
    #[arg(long, env = "DSVL_GATEWAY_HEALTH_LISTEN")]
    pub health_listen: Option<SocketAddr>,
    /// Checkpoint directory for the tokenizer and chat template (the decoder's model); the
    /// bundled tiny model when absent.
    #[arg(long, env = "DSVL_MODEL")]
    pub model: Option<PathBuf>,
    /// Name the model is served under (default: the checkpoint directory's name).
    #[arg(long, env = "DSVL_MODEL_NAME")]
    pub model_name: Option<String>,
    /// Vision-encoder endpoints, comma-separated `host:port` (host names are re-resolved,
    /// each address becomes a replica, e.g. a Kubernetes headless service).
    #[arg(long, env = "DSVL_VISION", value_delimiter = ',')]
    pub vision: Vec<String>,
    /// Decoder group endpoints (rank-0 gRPC), comma-separated `host:port`.
    #[arg(long, env = "DSVL_DECODER", value_delimiter = ',', required = true)]
    pub decoder: Vec<String>,
    /// Shared embedding cache: when set, images whose key is already present skip the vision
    /// call.
    #[arg(long, env = "DSVL_REDIS_URL")]
    pub redis: Option<String>,
    /// API keys file: one `key tenant` pair per line (`#` comments). Requests without a valid
    /// key are refused when keys are configured (here or in DSVL_API_KEYS).
    #[arg(long, env = "DSVL_API_KEYS_FILE")]
    pub api_keys_file: Option<PathBuf>,
    /// API keys inline: `key=tenant,key2=tenant2`.
    #[arg(long, env = "DSVL_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    /// Serve without API keys (everyone is the `public` tenant). Without keys and without this
    /// flag the gateway refuses to start: an empty or missing key file never means open access.
    #[arg(long, env = "DSVL_ALLOW_UNAUTHENTICATED")]
    pub allow_unauthenticated: bool,
    /// TLS on the public gRPC and HTTP listeners (--tls-client-ca-file: clients need a
    /// certificate too).
    #[command(flatten)]
    pub tls: dsvl_tls::ServerTlsArgs,
    /// Mutual TLS to the vision and decoder tiers (required unless `--insecure`).
    #[command(flatten)]
    pub upstream_tls: dsvl_tls::UpstreamTlsArgs,
    /// TLS to Redis (`rediss://`).
    #[command(flatten)]
    pub redis_tls: dsvl_tls::RedisTlsArgs,
    /// Reach the internal tiers and Redis in plain text (without this, the gateway refuses to
    /// start unless its upstream and Redis links use TLS).
    #[arg(long, env = "DSVL_INSECURE")]
    pub insecure: bool,
    /// Requests per minute per tenant (0: unlimited).
    #[arg(long, env = "DSVL_TENANT_RPM", default_value_t = 0)]
    pub tenant_requests_per_minute: u32,
    /// Images per minute per tenant (0: unlimited).
    #[arg(long, env = "DSVL_TENANT_IMAGES_PER_MINUTE", default_value_t = 0)]
    pub tenant_images_per_minute: u32,
    /// Tokens (prompt + max new) per minute per tenant (0: unlimited).
    #[arg(long, env = "DSVL_TENANT_TOKENS_PER_MINUTE", default_value_t = 0)]
    pub tenant_tokens_per_minute: u32,
    /// Seconds in-flight requests get to finish on shutdown.
    #[arg(long, env = "DSVL_DRAIN_SECS", default_value_t = 30)]
    pub drain_secs: u64,
    /// Most images in one request.
    #[arg(long, env = "DSVL_MAX_IMAGES", default_value_t = 4)]
    pub max_images: usize,
    /// Largest image, in MiB.
    #[arg(long, env = "DSVL_MAX_IMAGE_MIB", default_value_t = 16)]
    pub max_image_mib: usize,
    /// Most prompt tokens (after image expansion; 0: the model's limit).
    #[arg(long, env = "DSVL_MAX_PROMPT_TOKENS", default_value_t = 0)]
    pub max_prompt_tokens: usize,
    /// Most new tokens a request may ask for, and the default when it asks for none.
    #[arg(long, env = "DSVL_MAX_NEW_TOKENS", default_value_t = 1024)]
    pub max_new_tokens: u32,
    /// Most requests in flight in this gateway; more are refused (HTTP 429 /
    /// RESOURCE_EXHAUSTED) at once instead of queueing without bound.
    #[arg(long, env = "DSVL_MAX_IN_FLIGHT", default_value_t = 1024)]
    pub max_in_flight: usize,
    /// Most requests in flight per tenant (0: no cap below --max-in-flight).
    #[arg(long, env = "DSVL_TENANT_MAX_CONCURRENCY", default_value_t = 256)]
    pub tenant_max_concurrency: usize,
    /// Tenants with their own quotas: `tenant:rpm=N:ipm=N:tpm=N` entries separated by commas
    /// (a limit left out keeps the default; 0: unlimited). With `--redis` every quota is shared
    /// by all gateway replicas.
    #[arg(long, env = "DSVL_TENANT_QUOTAS", default_value = "")]
    pub tenant_quotas: String,
    /// Longest an HTTP connection may take to send a request's headers, in seconds.
    #[arg(long, env = "DSVL_HTTP_HEADER_TIMEOUT_SECS", default_value_t = 10)]
    pub http_header_timeout_secs: u64,
    /// Most open connections on the public gRPC port (each has 10 s to send its first bytes);
    /// beyond it new ones wait in the listen backlog.
    #[arg(long, env = "DSVL_GRPC_MAX_CONNECTIONS", default_value_t = 4096)]
    pub grpc_max_connections: usize,
    /// Oldest a public gRPC connection may get, in seconds, before the gateway asks the client
    /// to reconnect (GOAWAY; streams then open finish first); 0: no limit.
    #[arg(long, env = "DSVL_GRPC_MAX_CONNECTION_AGE_SECS", default_value_t = 600)]
    pub grpc_max_connection_age_secs: u64,
    /// Most open HTTP connections; beyond it new ones wait in the listen backlog.
    #[arg(long, env = "DSVL_HTTP_MAX_CONNECTIONS", default_value_t = 4096)]
    pub http_max_connections: usize,
    /// Longest an HTTP request body may pause between chunks, in seconds.
    #[arg(long, env = "DSVL_HTTP_BODY_IDLE_SECS", default_value_t = 30)]
    pub http_body_idle_secs: u64,
    /// Most choices (`n`) one request may ask for; they share the prompt's prefill.
    #[arg(long, env = "DSVL_MAX_N", default_value_t = 8)]
    pub max_n: u32,
    /// Most prompts one `POST /v1/completions` request may carry in a list; each runs as a
    /// request of its own against the in-flight caps and quotas.
    #[arg(long, env = "DSVL_MAX_PROMPTS", default_value_t = 64)]
    pub max_prompts: u32,
    /// Hosts from which `image_url` http(s) URLs may be fetched: exact names (compared without
    /// case or a trailing dot) or `*.suffix` for subdomains. Empty: only `data:` URLs.
    #[arg(long, env = "DSVL_IMAGE_URL_ALLOW", value_delimiter = ',')]
    pub image_url_allow: Vec<String>,
    /// Let image URLs reach internal addresses (loopback, private, link-local, ...): only for
    /// image servers inside a trusted network.
    #[arg(long, env = "DSVL_IMAGE_URL_ALLOW_INTERNAL")]
    pub image_url_allow_internal: bool,
    /// Ports image URLs may use.
    #[arg(long, env = "DSVL_IMAGE_URL_PORTS", value_delimiter = ',', default_values_t = [80, 443])]
    pub image_url_ports: Vec<u16>,
    /// PEM file of extra certificate authorities trusted for https image URLs (besides the
    /// system's).
    #[arg(long, env = "DSVL_IMAGE_URL_CA_FILE")]
    pub image_url_ca_file: Option<std::path::PathBuf>,
    /// Longest fetch of one image URL, in seconds (the request's deadline also bounds it).
    #[arg(long, env = "DSVL_IMAGE_URL_TIMEOUT_SECS", default_value_t = 10)]
    pub image_url_timeout_secs: u64,
    /// Deadline of a request without one, in seconds.
    #[arg(long, env = "DSVL_REQUEST_TIMEOUT_SECS", default_value_t = 300)]
    pub request_timeout_secs: u64,
    /// How requests pick a decoder group: `prefix` (the group most likely to hold the prompt's
    /// KV blocks in its prefix cache, unless it is much busier) or `least-work`.
    #[arg(long, env = "DSVL_DECODER_ROUTING", default_value = "prefix", value_parser = ["prefix", "least-work"])]
    pub decoder_routing: String,
    /// With prefix routing, the group holding the longest prefix is skipped for the least
    /// loaded one when it has more than this many more sequences outstanding.
    #[arg(long, env = "DSVL_PREFIX_ROUTING_MAX_IMBALANCE", default_value_t = 8)]
    pub prefix_routing_max_imbalance: usize,
    /// Seconds between endpoint re-resolution and load polls.
    #[arg(long, env = "DSVL_REFRESH_SECS", default_value_t = 2)]
    pub refresh_secs: u64,
    /// OTLP/gRPC endpoint for traces.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// `--log-format text|json` (`DSVL_LOG_FORMAT`).
    #[command(flatten)]
    pub logs: dsvl_telemetry::LogArgs,
}

/// Where remote `image_url`s may be fetched from (see [`crate::fetch`]).
#[derive(Debug, Clone)]
pub struct ImageUrlPolicy {
    /// Allowed hosts: exact names, or `*.suffix` for subdomains (empty: no remote URLs).
    pub allow: Vec<String>,
    /// Whether internal addresses may be reached.
    pub allow_internal: bool,
    /// Allowed ports.
    pub ports: Vec<u16>,
    /// Extra trusted certificate authorities (PEM).
    pub ca_file: Option<std::path::PathBuf>,
    /// Longest fetch of one URL.
    pub timeout: Duration,
}

/// Validated configuration.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// Most open connections on the public gRPC port.
    pub grpc_max_connections: usize,
    /// Connection limits of the public gRPC port.
    pub grpc_limits: dsvl_telemetry::server::ServerLimits,
    /// Internal health and reflection port (`--health-listen`).
    pub health_listen: Option<SocketAddr>,
    /// Tokenizer/template checkpoint.
    pub model: Option<PathBuf>,
    /// Served model name.
    pub model_name: String,
    /// Vision endpoints.
    pub vision: Vec<String>,
    /// Decoder endpoints.
    pub decoder: Vec<String>,
    /// Shared cache.
    pub redis: Option<String>,
    /// TLS material for Redis.
    pub redis_tls: dsvl_cache::RedisTls,
    /// API key → tenant at start (the file's and the inline ones; empty only with
    /// `allow_unauthenticated`).
    pub api_keys: HashMap<String, String>,
    /// The keys file, re-read when it changes (keys rotate without a restart).
    pub api_keys_file: Option<PathBuf>,
    /// The inline keys (kept across reloads of the file).
    pub api_keys_inline: HashMap<String, String>,
    /// Serve everyone as `public` while no key is configured.
    pub allow_unauthenticated: bool,
    /// TLS on the public listeners (`None`: plain text).
    pub tls: Option<dsvl_tls::ServerFiles>,
    /// Mutual TLS to the internal tiers (`None`: plain text).
    pub upstream_tls: Option<dsvl_tls::ClientFiles>,
    /// Per-tenant request rate.
    pub tenant_rpm: u32,
    /// Per-tenant image rate.
    pub tenant_ipm: u32,
    /// Per-tenant token rate.
    pub tenant_tpm: u32,
    /// Tenants with their own limits.
    pub tenant_quotas: HashMap<String, crate::tenancy::Limits>,
    /// Slow-client bounds of the HTTP listener.
    pub http_timeouts: crate::http_server::HttpTimeouts,
    /// Drain time on shutdown.
    pub drain: Duration,
    /// Most images per request.
    pub max_images: usize,
    /// Largest image in bytes.
    pub max_image_bytes: usize,
    /// Most prompt tokens (0: model limit).
    pub max_prompt_tokens: usize,
    /// Most new tokens.
    pub max_new_tokens: u32,
    /// Most choices per request.
    pub max_n: u32,
    /// Most prompts per `/v1/completions` request.
    pub max_prompts: u32,
    /// Most requests in flight.
    pub max_in_flight: usize,
    /// Most requests in flight per tenant (0: no cap).
    pub tenant_max_concurrency: usize,
    /// Prefix-aware decoder routing and its imbalance threshold (`None`: least work).
    pub prefix_routing: Option<usize>,
    /// Where remote image URLs may be fetched from.
    pub image_urls: ImageUrlPolicy,
    /// Default deadline.
    pub request_timeout: Duration,
    /// Endpoint refresh period.
    pub refresh: Duration,
}

pub use dsvl_core::ConfigError;

/// The key table: the file's keys (when a file is given) and the inline ones.
///
/// # Errors
/// The file cannot be read or has a malformed line.
pub fn read_keys(
    file: Option<&std::path::Path>,
    inline: &HashMap<String, String>,
) -> Result<HashMap<String, String>, ConfigError> {
    let mut keys = HashMap::new();
    if let Some(path) = file {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ConfigError { field: "api-keys-file", reason: e.to_string() })?;
        keys.extend(parse_keys_file(&text)?);
    }
    keys.extend(inline.iter().map(|(k, t)| (k.clone(), t.clone())));
    Ok(keys)
}

fn parse_keys_file(text: &str) -> Result<Vec<(String, String)>, ConfigError> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| {
            let mut it = l.split_whitespace();
            match (it.next(), it.next(), it.next()) {
                (Some(k), Some(t), None) => Ok((k.to_string(), t.to_string())),
                _ => Err(ConfigError {
                    field: "api-keys-file",
                    reason: format!("expected `key tenant`, got `{l}`"),
                }),
            }
        })
        .collect()
}

impl TryFrom<&Args> for GatewayConfig {
    type Error = ConfigError;

    fn try_from(a: &Args) -> Result<Self, ConfigError> {
        let mut api_keys_inline = HashMap::new();
        if let Some(inline) = &a.api_keys {
            for pair in inline.split(',').filter(|p| !p.trim().is_empty()) {
                let (k, t) = pair.split_once('=').ok_or_else(|| ConfigError {
                    field: "api-keys",
                    reason: "expected key=tenant pairs".into(),
                })?;
                api_keys_inline.insert(k.trim().to_string(), t.trim().to_string());
            }
        }
        let api_keys = read_keys(a.api_keys_file.as_deref(), &api_keys_inline)?;
        if api_keys.is_empty() && !a.allow_unauthenticated {
            return Err(ConfigError {
                field: "api-keys",
                reason: "no API keys configured (--api-keys-file, --api-keys): refusing to serve everyone; pass --allow-unauthenticated to do so on purpose".into(),
            });
        }
        if a.decoder.iter().all(|d| d.trim().is_empty()) {
            return Err(ConfigError {
                field: "decoder",
                reason: "at least one decoder endpoint is needed".into(),
            });
        }
        let max_timeout = dsvl_telemetry::MAX_DEADLINE.as_secs();
        if !(1..=max_timeout).contains(&a.request_timeout_secs) {
            return Err(ConfigError {
                field: "request-timeout-secs",
                reason: format!("must be in [1, {max_timeout}], got {}", a.request_timeout_secs),
            });
        }
        let model_name = a
            .model_name
            .clone()
            .unwrap_or_else(|| dsvl_checkpoint::default_model_name(a.model.as_deref()));
        let (ca, identity) = a.redis_tls.files();
        let (redis, redis_tls) =
            dsvl_cache::redis_link(a.redis.as_deref(), ca, identity, a.insecure)
                .map_err(|e| ConfigError { field: "redis", reason: e.to_string() })?;
        let upstream_tls = a.upstream_tls.files();
        match &upstream_tls {
            Some(f) if f.identity.is_none() => return Err(ConfigError {
                field: "upstream-cert-file",
                reason: "the internal tiers authenticate the gateway: give --upstream-cert-file and --upstream-key-file (mutual TLS)".into(),
            }),
            None if !a.insecure => return Err(ConfigError {
                field: "upstream-ca-file",
                reason: "the links to the vision and decoder tiers use mutual TLS: give --upstream-ca-file, --upstream-cert-file and --upstream-key-file, or pass --insecure to use plain text".into(),
            }),
            _ => {}
        }
        Ok(Self {
            redis_tls,
            grpc_max_connections: a.grpc_max_connections.max(1),
            grpc_limits: dsvl_telemetry::server::ServerLimits {
                max_connection_age: Some(Duration::from_secs(a.grpc_max_connection_age_secs))
                    .filter(|d| !d.is_zero()),
                ..dsvl_telemetry::server::ServerLimits::PUBLIC
            },
            health_listen: a.health_listen,
            model: a.model.clone(),
            model_name,
            vision: a.vision.iter().filter(|v| !v.trim().is_empty()).cloned().collect(),
            decoder: a.decoder.iter().filter(|v| !v.trim().is_empty()).cloned().collect(),
            redis,
            api_keys,
            api_keys_file: a.api_keys_file.clone(),
            api_keys_inline,
            allow_unauthenticated: a.allow_unauthenticated,
            tls: a.tls.files(),
            upstream_tls,
            tenant_rpm: a.tenant_requests_per_minute,
            tenant_ipm: a.tenant_images_per_minute,
            tenant_tpm: a.tenant_tokens_per_minute,
            http_timeouts: crate::http_server::HttpTimeouts {
                header_read: Duration::from_secs(a.http_header_timeout_secs.max(1)),
                body_idle: Duration::from_secs(a.http_body_idle_secs.max(1)),
                max_connections: a.http_max_connections.max(1),
            },
            tenant_quotas: crate::tenancy::Limits::parse_overrides(
                &a.tenant_quotas,
                crate::tenancy::Limits {
                    rpm: a.tenant_requests_per_minute,
                    ipm: a.tenant_images_per_minute,
                    tpm: a.tenant_tokens_per_minute,
                },
            )
            .map_err(|reason| ConfigError { field: "tenant-quotas", reason })?,
            drain: Duration::from_secs(a.drain_secs),
            max_images: a.max_images,
            max_image_bytes: a.max_image_mib << 20,
            max_prompt_tokens: a.max_prompt_tokens,
            max_new_tokens: a.max_new_tokens.max(1),
            max_n: a.max_n.max(1),
            max_prompts: a.max_prompts.max(1),
            max_in_flight: a.max_in_flight.max(1),
            tenant_max_concurrency: a.tenant_max_concurrency,
            prefix_routing: (a.decoder_routing == "prefix")
                .then_some(a.prefix_routing_max_imbalance),
            image_urls: ImageUrlPolicy {
                allow: a.image_url_allow.iter().filter(|h| !h.is_empty()).cloned().collect(),
                allow_internal: a.image_url_allow_internal,
                ports: a.image_url_ports.clone(),
                ca_file: a.image_url_ca_file.clone(),
                timeout: Duration::from_secs(a.image_url_timeout_secs.max(1)),
            },
            request_timeout: Duration::from_secs(a.request_timeout_secs),
            refresh: Duration::from_secs(a.refresh_secs.max(1)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_key_files() {
        let keys = parse_keys_file("# comment\nsk-1 acme\n\nsk-2 globex\n").unwrap();
        assert_eq!(keys, vec![("sk-1".into(), "acme".into()), ("sk-2".into(), "globex".into())]);
        assert!(parse_keys_file("just-a-key\n").is_err());
    }

    fn config(extra: &[&str]) -> Result<GatewayConfig, ConfigError> {
        secure_config(&[&["--insecure"], extra].concat())
    }

    fn secure_config(extra: &[&str]) -> Result<GatewayConfig, ConfigError> {
        use clap::Parser;
        let mut argv = vec!["dsvl-gateway", "--decoder", "127.0.0.1:1"];
        argv.extend(extra);
        GatewayConfig::try_from(&Args::parse_from(argv))
    }

    #[test]
    fn plain_text_internal_links_need_insecure() {
        let open = ["--allow-unauthenticated"];
        let e = secure_config(&open).unwrap_err();
        assert_eq!(e.field, "upstream-ca-file");
        assert!(e.reason.contains("--insecure"), "{e}");
        let tls = [
            "--upstream-ca-file",
            "/ca.pem",
            "--upstream-cert-file",
            "/gw.pem",
            "--upstream-key-file",
            "/gw.key",
        ];
        assert!(secure_config(&[&open[..], &tls].concat()).is_ok());
        let e = secure_config(&[&open[..], &tls[..2]].concat()).unwrap_err();
        assert_eq!(e.field, "upstream-cert-file", "the tiers authenticate the gateway");
        let plain_redis = ["--redis", "redis://r:6379"];
        let e = secure_config(&[&open[..], &tls, &plain_redis].concat()).unwrap_err();
        assert_eq!(e.field, "redis");
        assert!(e.reason.contains("rediss://"), "{e}");
        assert!(secure_config(&[&open[..], &tls, &["--redis", "rediss://r:6379"]].concat()).is_ok());
        assert!(config(&[&open[..], &plain_redis].concat()).is_ok(), "--insecure allows both");
    }

    #[test]
    fn no_keys_refuses_to_start_unless_asked() {
        let e = config(&[]).unwrap_err();
        assert_eq!(e.field, "api-keys");
        assert!(e.reason.contains("--allow-unauthenticated"), "{e}");
        let empty = std::env::temp_dir().join(format!("dsvl-empty-keys-{}", std::process::id()));
        std::fs::write(&empty, "# nobody yet\n").unwrap();
        let e = config(&["--api-keys-file", empty.to_str().unwrap()]).unwrap_err();
        assert_eq!(e.field, "api-keys", "an empty file is not open access");
        std::fs::remove_file(&empty).unwrap();
        assert!(config(&["--allow-unauthenticated"]).unwrap().api_keys.is_empty());
        assert_eq!(config(&["--api-keys", "sk-1=acme"]).unwrap().api_keys.len(), 1);
    }
}
