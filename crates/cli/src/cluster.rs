//! A local cluster as real processes: vision-encoder, decoder group (rank 0 plus `--tp - 1`
//! worker ranks it starts itself) and gateway, wired together on loopback; used by `dsvl up`
//! and `dsvl demo`. Services start in dependency order and each must report SERVING before
//! the next one starts; dropping the [`Cluster`] stops them gateway first.
//!
//! The vision-encoder and the decoder share a cluster secret (sealing shared-cache embeddings,
//! authenticating the decoder's ranks): `DSVL_CLUSTER_SECRET_FILE` when set, else a throwaway
//! one made for this cluster, readable only by its owner, removed when the cluster stops.
//!
//! Every internal hop uses mutual TLS: a throwaway certificate authority made for this cluster
//! ([`dsvl_tls::DevCa`], in a private temporary directory removed when the cluster stops)
//! issues one certificate per tier; the vision-encoder and the decoder require a client
//! certificate from it, and the gateway presents its own. The gateway's public listeners stay
//! plain text on loopback unless given a certificate (`--tls-cert-file`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::procs::{free_port, sibling_binary, Service};

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterSpec {
    /// Checkpoint directory (None: the bundled tiny model).
    pub model: Option<PathBuf>,
    /// Decoder tensor-parallel ranks.
    pub tp: usize,
    /// Weight dtype of the vision-encoder and the decoder.
    pub dtype: dsvl_core::WeightDType,
    /// Device of the vision-encoder and of decoder rank 0 (ranks take consecutive GPUs).
    pub device: dsvl_core::DeviceSpec,
    /// Shared cache (None: each service's in-process cache; embeddings travel inline).
    pub redis: Option<String>,
    /// Gateway gRPC address.
    pub grpc_addr: SocketAddr,
    /// Gateway HTTP address.
    pub http_addr: SocketAddr,
    /// Extra gateway flags (API keys, limits).
    pub gateway_args: Vec<String>,
    /// Observability of every process started.
    pub observe: Observe,
}

/// Where each process's Prometheus endpoint listens.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum MetricsPorts {
    /// No metrics endpoints.
    #[default]
    Off,
    /// A free loopback port each.
    Auto,
    /// Consecutive ports from this one: gateway, vision-encoder, decoder.
    From(u16),
}

/// Metrics, tracing and log format for the processes a cluster starts.
#[derive(Debug, Clone, Default)]
pub struct Observe {
    /// Prometheus endpoints.
    pub metrics: MetricsPorts,
    /// OTLP/gRPC collector for traces (every process, the decoder's worker ranks included).
    pub otlp_endpoint: Option<String>,
    /// Log line format of every process.
    pub log_format: dsvl_telemetry::LogFormat,
}

impl Observe {
    /// The metrics address of the `i`-th process (0 gateway, 1 vision-encoder, 2 decoder).
    fn metrics_addr(&self, i: u16) -> Result<Option<SocketAddr>> {
        Ok(match self.metrics {
            MetricsPorts::Off => None,
            MetricsPorts::Auto => Some(SocketAddr::from(([127, 0, 0, 1], free_port()?))),
            MetricsPorts::From(base) => {
                let port = base.checked_add(i).ok_or_else(|| {
                    anyhow::anyhow!("--metrics-port {base}: the ports run past 65535")
                })?;
                Some(SocketAddr::from(([127, 0, 0, 1], port)))
            }
        })
    }

    /// Flags for one process: `--log-format`, `--otlp-endpoint` when set, and
    /// `--metrics-listen` at `metrics`.
    fn flags(&self, metrics: Option<SocketAddr>) -> Vec<String> {
        let mut flags = vec!["--log-format".to_string(), self.log_format.as_str().to_string()];
        if let Some(endpoint) = &self.otlp_endpoint {
            flags.extend(["--otlp-endpoint".to_string(), endpoint.clone()]);
        }
        if let Some(addr) = metrics {
            flags.extend(["--metrics-listen".to_string(), addr.to_string()]);
        }
        flags
    }
}

/// The running services (stopped on drop, gateway first).
pub struct Cluster {
    /// Gateway, decoder, vision: the drop order.
    services: Vec<Service>,
    /// Restart bookkeeping, one per service.
    restarts: Vec<crate::heal::Restarts>,
    /// The throwaway cluster secret (removed on drop, after the services).
    _secret: Option<tempfile::TempPath>,
    /// The throwaway certificate authority and certificates (removed on drop).
    _pki: tempfile::TempDir,
    /// Gateway gRPC endpoint (`http://host:port`).
    pub grpc_url: String,
    /// Gateway HTTP endpoint.
    pub http_url: String,
    /// Vision-encoder address.
    pub vision_addr: String,
    /// Decoder rank-0 address.
    pub decoder_addr: String,
    /// The decoder group's rendezvous port (its ranks join there).
    pub rendezvous_port: u16,
    /// Prometheus endpoints: (process, address).
    pub metrics: Vec<(&'static str, SocketAddr)>,
}

/// Loading a real checkpoint can take minutes; the tiny one takes about a second.
const START_LIMIT: Duration = Duration::from_secs(1800);

/// The name of the gateway's certificate: the one client the internal tiers accept.
const GATEWAY_NAME: &str = "dsvl-gateway";

/// An internal tier's mutual-TLS flags for `leaf`; only the gateway may call it.
fn server_tls_flags(leaf: &dsvl_tls::dev_ca::LeafFiles) -> Vec<String> {
    let mut flags: Vec<String> = [
        ("--tls-cert-file", &leaf.cert),
        ("--tls-key-file", &leaf.key),
        ("--tls-client-ca-file", &leaf.ca),
    ]
    .into_iter()
    .flat_map(|(flag, path)| [flag.to_string(), path.display().to_string()])
    .collect();
    flags.extend(["--tls-client-names".to_string(), GATEWAY_NAME.to_string()]);
    flags
}

fn model_flags(spec: &ClusterSpec) -> Vec<String> {
    spec.model.iter().flat_map(|m| ["--model".to_string(), m.display().to_string()]).collect()
}

/// `--dtype` and `--device` for the services that load model weights.
fn device_flags(spec: &ClusterSpec) -> Vec<String> {
    vec!["--dtype".into(), spec.dtype.as_str().into(), "--device".into(), spec.device.to_string()]
}

/// `--redis URL`, plus `--insecure` when the URL is plain text: the services refuse a
/// plain-text Redis unless told (a `rediss://` URL takes its files from `DSVL_REDIS_*_FILE`).
fn redis_flags(spec: &ClusterSpec) -> Vec<String> {
    let mut flags: Vec<String> =
        spec.redis.iter().flat_map(|r| ["--redis".to_string(), r.clone()]).collect();
    if spec.redis.as_deref().is_some_and(|r| !dsvl_cache::link::is_tls_url(r)) {
        flags.push("--insecure".into());
    }
    flags
}

/// A fresh cluster secret in a file only this user can read (unless the environment names
/// one, which the services then read themselves).
fn throwaway_secret() -> Result<Option<tempfile::TempPath>> {
    use std::io::Write;
    if std::env::var_os("DSVL_CLUSTER_SECRET_FILE").is_some() {
        return Ok(None);
    }
    let mut f = tempfile::Builder::new().prefix("dsvl-cluster-secret-").tempfile()?;
    f.write_all(dsvl_core::ClusterSecret::random().to_file_contents().as_bytes())?;
    Ok(Some(f.into_temp_path()))
}

impl Cluster {
    /// Starts everything and waits until the gateway is SERVING.
    ///
    /// # Errors
    /// A binary is missing, a service exits during start-up or does not become ready.
    pub async fn start(spec: &ClusterSpec) -> Result<Self> {
        let t = Instant::now();
        if spec.redis.as_deref().is_some_and(|r| !dsvl_cache::link::is_tls_url(r)) {
            eprintln!("warning: plain-text Redis URL: the services run with --insecure for it (use rediss:// and DSVL_REDIS_CA_FILE for TLS)");
        }
        let secret = throwaway_secret()?;
        let secret_flags: Vec<String> = secret
            .iter()
            .flat_map(|p| ["--cluster-secret-file".to_string(), p.display().to_string()])
            .collect();
        let pki = tempfile::Builder::new().prefix("dsvl-pki-").tempdir()?;
        let ca = dsvl_tls::DevCa::new("dsvl local cluster CA")?;
        let names = ["127.0.0.1", "localhost"];
        let vision_tls = ca.write_leaf(pki.path(), "vision", &names)?;
        let decoder_tls = ca.write_leaf(pki.path(), "decoder", &names)?;
        let gateway_tls =
            ca.write_leaf(pki.path(), "gateway", &["127.0.0.1", "localhost", GATEWAY_NAME])?;
        let observe = &spec.observe;
        let metrics: Vec<Option<SocketAddr>> =
            (0..3).map(|i| observe.metrics_addr(i)).collect::<Result<_>>()?;
        let vision_addr = format!("127.0.0.1:{}", free_port()?);
        let mut args = vec!["--listen".to_string(), vision_addr.clone()];
        args.extend(observe.flags(metrics[1]));
        args.extend(model_flags(spec));
        args.extend(device_flags(spec));
        args.extend(redis_flags(spec));
        args.extend(secret_flags.iter().cloned());
        args.extend(server_tls_flags(&vision_tls));
        let mut vision = Service::spawn(
            "vision-encoder",
            &sibling_binary("dsvl-vision")?,
            vision_addr.clone(),
            &args,
        )?;
        vision.tls = Some(gateway_tls.client());

        let decoder_addr = format!("127.0.0.1:{}", free_port()?);
        let rendezvous_port = free_port()?;
        let mut args = vec![
            "--listen".to_string(),
            decoder_addr.clone(),
            "--tp".into(),
            spec.tp.to_string(),
            "--rendezvous-port".into(),
            rendezvous_port.to_string(),
        ];
        args.extend(observe.flags(metrics[2]));
        args.extend(model_flags(spec));
        args.extend(device_flags(spec));
        args.extend(redis_flags(spec));
        args.extend(secret_flags.iter().cloned());
        args.extend(server_tls_flags(&decoder_tls));
        let mut decoder = Service::spawn(
            "decoder",
            &sibling_binary("dsvl-decoder")?,
            decoder_addr.clone(),
            &args,
        )?;
        decoder.tls = Some(gateway_tls.client());

        eprintln!("waiting for the vision-encoder ({vision_addr}) and the decoder ({decoder_addr}, tp {}) to load the model…", spec.tp);
        vision.wait_serving("dsvl.internal.v1.VisionEncoder", START_LIMIT).await?;
        decoder.wait_serving("dsvl.internal.v1.Decoder", START_LIMIT).await?;

        let mut args = vec![
            "--grpc-listen".to_string(),
            spec.grpc_addr.to_string(),
            "--http-listen".into(),
            spec.http_addr.to_string(),
            "--vision".into(),
            vision_addr.clone(),
            "--decoder".into(),
            decoder_addr.clone(),
            "--refresh-secs".into(),
            "1".into(),
        ];
        args.extend(observe.flags(metrics[0]));
        args.extend(model_flags(spec));
        args.extend(redis_flags(spec));
        for (flag, path) in [
            ("--upstream-ca-file", &gateway_tls.ca),
            ("--upstream-cert-file", &gateway_tls.cert),
            ("--upstream-key-file", &gateway_tls.key),
        ] {
            args.extend([flag.to_string(), path.display().to_string()]);
        }
        // Without keys the local cluster serves everyone as `public`, on purpose (loopback).
        if !spec.gateway_args.iter().any(|a| a.starts_with("--api-keys")) {
            args.push("--allow-unauthenticated".into());
        }
        args.extend(spec.gateway_args.iter().cloned());
        let mut gateway = Service::spawn(
            "gateway",
            &sibling_binary("dsvl-gateway")?,
            spec.grpc_addr.to_string(),
            &args,
        )?;
        gateway.wait_serving("dsvl.v1.Chat", Duration::from_secs(120)).await?;
        eprintln!("cluster ready in {:.1}s", t.elapsed().as_secs_f64());
        Ok(Self {
            services: vec![gateway, decoder, vision],
            restarts: (0..3).map(|_| Default::default()).collect(),
            _secret: secret,
            _pki: pki,
            grpc_url: format!("http://{}", spec.grpc_addr),
            http_url: format!("http://{}", spec.http_addr),
            vision_addr,
            decoder_addr,
            rendezvous_port,
            metrics: ["gateway", "vision-encoder", "decoder"]
                .into_iter()
                .zip(metrics)
                .filter_map(|(name, addr)| Some((name, addr?)))
                .collect(),
        })
    }

    /// Whether the gateway exited on its own (and how): then the cluster stops.
    pub fn gateway_exited(&mut self) -> Option<String> {
        let g = &mut self.services[0];
        g.exited().map(|st| format!("{} exited ({st})", g.name))
    }

    /// Restarts a decoder group or vision-encoder that exited or failed liveness
    /// ([`crate::heal`]); returns what it did.
    pub async fn heal(&mut self) -> Vec<String> {
        let mut done = Vec::new();
        for (svc, restarts) in self.services.iter_mut().zip(&mut self.restarts).skip(1) {
            done.extend(crate::heal::heal(svc, restarts).await);
        }
        done
    }

    /// Stops everything, gateway first, each with a drain grace period.
    pub fn stop(&mut self) {
        for s in &mut self.services {
            s.stop(Duration::from_secs(15));
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop();
    }
}
