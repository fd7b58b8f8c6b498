//! Container arguments, read by the services' own parsers.
//!
//! A container runs a dsvl service when its command names one of the three binaries. Its
//! argv is built the way the kubelet builds it (`$(VAR)` expanded from the pod's environment,
//! LeaderWorkerSet variables included), environment variables the binary reads through clap's
//! `env` fallback are turned into flags (a flag on the command line wins, as in clap), and
//! the result goes through the service's `Args::try_parse_from` and config validation. So the
//! manifests can only use real flags with valid values, and what the checks need (drain
//! time, ports, device, tensor-parallel layout) is read exactly as the binary reads it.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;

use clap::{CommandFactory, Parser};
use k8s_openapi::api::core::v1::Container;

use crate::pods::{expand, PodView};

/// The three service binaries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Binary {
    /// `dsvl-gateway`.
    Gateway,
    /// `dsvl-vision`.
    Vision,
    /// `dsvl-decoder`.
    Decoder,
}

impl Binary {
    /// The executable's file name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Gateway => "dsvl-gateway",
            Self::Vision => "dsvl-vision",
            Self::Decoder => "dsvl-decoder",
        }
    }

    /// The key of the `dsvl-redis` Secret holding this tier's Redis URL: each tier logs in as
    /// its own least-privilege ACL user (`dsvl_cache::acl`).
    pub fn redis_user_key(self) -> &'static str {
        match self {
            Self::Gateway => "gateway-url",
            Self::Vision => "vision-url",
            Self::Decoder => "decoder-url",
        }
    }

    /// The gRPC API service whose health status is the service's readiness.
    pub fn api_service(self) -> &'static str {
        match self {
            Self::Gateway => "dsvl.v1.Chat",
            Self::Vision => "dsvl.internal.v1.VisionEncoder",
            Self::Decoder => "dsvl.internal.v1.Decoder",
        }
    }

    /// The service a container runs: the first word of its command and args (past an init
    /// such as `tini --`) that names a dsvl binary.
    pub fn of(container: &Container) -> Option<Self> {
        container.command.iter().flatten().chain(container.args.iter().flatten()).find_map(|word| {
            let file = word.rsplit('/').next().unwrap_or(word);
            [Self::Gateway, Self::Vision, Self::Decoder].into_iter().find(|b| b.name() == file)
        })
    }

    fn command(self) -> clap::Command {
        match self {
            Self::Gateway => dsvl_gateway::Args::command(),
            Self::Vision => dsvl_vision::Args::command(),
            Self::Decoder => dsvl_decoder::Args::command(),
        }
    }

    /// Environment variables the binary reads (clap `env` fallbacks).
    pub fn env_names(self) -> BTreeSet<String> {
        self.command()
            .get_arguments()
            .filter_map(|a| a.get_env())
            .map(|e| e.to_string_lossy().into_owned())
            .collect()
    }
}

impl fmt::Display for Binary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An upstream a gateway connects to (`--vision`, `--decoder`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    /// The flag.
    pub flag: &'static str,
    /// Host (a Service name).
    pub host: String,
    /// Port.
    pub port: u16,
}

/// What the checks need to know about a service container, as its binary parses it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Which service.
    pub binary: Binary,
    /// Whether it serves gRPC (decoder worker ranks do not).
    pub serves: bool,
    /// Port of its gRPC listener.
    pub grpc_port: u16,
    /// Longest graceful drain after SIGTERM, in seconds (0 when it does not drain).
    pub drain_secs: u64,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// GPUs the container uses: the highest device index it opens, plus one.
    pub gpus: u32,
    /// Tensor-parallel layout (decoder): degree, nodes, and the flags every rank must share.
    pub group: Option<GroupFlags>,
    /// Gateway upstreams.
    pub upstreams: Vec<Upstream>,
    /// Files the binary reads secrets from (`--api-keys-file`, `--cluster-secret-file`, the
    /// TLS certificates and keys): each must come from a Secret volume.
    pub secret_files: Vec<PathBuf>,
    /// Whether a Redis URL is configured.
    pub redis: bool,
    /// The plain-text health port (`--health-listen`), where kubelet's probes go.
    pub health_port: Option<u16>,
    /// How its links use TLS.
    pub tls: TlsUse,
}

/// The gateway's link to the vision and decoder tiers.
pub const UPSTREAM_LINK: &str = "vision and decoder tiers";

/// The TLS side of a service container's links.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsUse {
    /// The certificate its gRPC (and, for the gateway, HTTP) listener serves.
    pub serves: Option<PathBuf>,
    /// Certificates it presents as a client, with the link each is for.
    pub presents: Vec<(&'static str, PathBuf)>,
    /// Links that would run in plain text.
    pub plain: Vec<&'static str>,
    /// Names a client certificate must carry (`--tls-client-names`; empty: any client of the
    /// authority).
    pub client_names: Vec<String>,
}

impl TlsUse {
    /// A listener's side from its flags; a serving one without a certificate is the plain
    /// `link`.
    fn listener(args: &dsvl_tls::ServerTlsArgs, serves: bool, link: &'static str) -> Self {
        let mut tls = Self {
            serves: args.tls_cert_file.clone(),
            client_names: args.tls_client_names.clone(),
            ..Self::default()
        };
        if serves && tls.serves.is_none() {
            tls.plain.push(link);
        }
        tls
    }
}

/// The files a listener's and a Redis link's TLS flags name (each must come from a Secret
/// volume).
fn tls_paths(tls: &dsvl_tls::ServerTlsArgs, redis: &dsvl_tls::RedisTlsArgs) -> Vec<PathBuf> {
    [
        &tls.tls_cert_file,
        &tls.tls_key_file,
        &tls.tls_client_ca_file,
        &redis.redis_ca_file,
        &redis.redis_cert_file,
        &redis.redis_key_file,
    ]
    .into_iter()
    .flatten()
    .cloned()
    .collect()
}

/// The Redis side of a container: a URL read from a Secret (`PLACEHOLDER` here) is taken as a
/// `rediss://` URL, since only the files can be checked offline; without a client certificate
/// the link counts as plain text (the manifests' Redis demands client certificates).
fn redis_tls(redis: &mut Option<String>, args: &dsvl_tls::RedisTlsArgs, tls: &mut TlsUse) {
    if redis.as_deref() == Some(crate::pods::PLACEHOLDER) {
        *redis = Some("rediss://from-reference:6379".into());
    }
    if redis.is_none() {
        return;
    }
    match &args.redis_cert_file {
        Some(cert) => tls.presents.push(("Redis", cert.clone())),
        None => tls.plain.push("Redis"),
    }
}

/// The decoder flags that must agree across the ranks of a group.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupFlags {
    /// `--tp`.
    pub tp: usize,
    /// `--nodes`.
    pub nodes: usize,
    /// `--model`.
    pub model: Option<PathBuf>,
    /// `--dtype`.
    pub dtype: String,
    /// `--device` (of the pod's first rank).
    pub device: String,
    /// `--rendezvous-port` on the leader (multi-pod groups).
    pub rendezvous_port: u16,
}

/// The argv the container's binary will see: args (and any command words after the
/// binary), expanded, plus flags for the binary's environment variables set in the pod.
pub fn argv(view: &PodView<'_>, container: &Container, binary: Binary) -> Vec<String> {
    let env = view.env(container);
    let words: Vec<&String> =
        container.command.iter().flatten().chain(container.args.iter().flatten()).collect();
    let start =
        words.iter().position(|w| w.rsplit('/').next() == Some(binary.name())).map_or(0, |i| i + 1);
    let mut argv = vec![binary.name().to_string()];
    argv.extend(words[start..].iter().map(|w| expand(w, &env)));
    let declared: BTreeMap<String, (String, bool)> = binary
        .command()
        .get_arguments()
        .filter_map(|a| {
            Some((
                a.get_env()?.to_string_lossy().into_owned(),
                (a.get_long()?.to_string(), a.get_action().takes_values()),
            ))
        })
        .collect();
    for var in container.env.iter().flatten() {
        let Some((long, takes_value)) = declared.get(&var.name) else { continue };
        let given =
            argv.iter().any(|a| a == &format!("--{long}") || a.starts_with(&format!("--{long}=")));
        if given {
            continue;
        }
        let value = &env[&var.name];
        if *takes_value {
            argv.push(format!("--{long}={value}"));
        } else if !matches!(value.as_str(), "" | "0" | "false") {
            argv.push(format!("--{long}"));
        }
    }
    argv
}

fn gpus(device: &str, ranks: usize) -> u32 {
    match device.strip_prefix("cuda:").and_then(|n| n.parse::<u32>().ok()) {
        Some(first) => first + ranks as u32,
        None => 0,
    }
}

fn upstreams(flag: &'static str, endpoints: &[String]) -> Result<Vec<Upstream>, String> {
    endpoints
        .iter()
        .filter(|e| !e.trim().is_empty())
        .map(|e| {
            let (host, port) =
                e.rsplit_once(':').ok_or_else(|| format!("--{flag} {e}: expected host:port"))?;
            let port = port.parse().map_err(|_| format!("--{flag} {e}: bad port"))?;
            Ok(Upstream { flag, host: host.to_string(), port })
        })
        .collect()
}

/// Takes `--cluster-secret-file` out of the flags (a mounted Secret, not readable here) so the
/// rest validates as if the secret were there; refuses `--insecure`.
fn without_secret_file(
    file: &mut Option<PathBuf>,
    insecure: &mut bool,
) -> Result<Option<PathBuf>, String> {
    if *insecure {
        return Err("--insecure: internal links must be protected by the cluster secret".into());
    }
    let taken = file.take();
    // With the file present the binary has its secret: validate as if it did.
    *insecure = taken.is_some();
    Ok(taken)
}

/// Parses `argv` with the binary's own flag parser and config validation.
///
/// # Errors
/// The parser's or the validation's message when the binary would refuse to start.
pub fn parse(binary: Binary, argv: &[String]) -> Result<Settings, String> {
    match binary {
        Binary::Gateway => {
            let mut a = dsvl_gateway::Args::try_parse_from(argv).map_err(|e| e.to_string())?;
            let api_keys_file = a.api_keys_file.take(); // a mounted Secret: not readable here
                                                        // The real binary reads the keys from it; validate the rest as if they were there.
            let open = std::mem::replace(&mut a.allow_unauthenticated, api_keys_file.is_some());
            if open {
                return Err("--allow-unauthenticated: the gateway must require API keys".into());
            }
            if a.insecure {
                return Err("--insecure: the links to the tiers and Redis must use TLS".into());
            }
            let mut tls = TlsUse::listener(&a.tls, true, "public listeners");
            match &a.upstream_tls.upstream_cert_file {
                Some(cert) => tls.presents.push((UPSTREAM_LINK, cert.clone())),
                None => tls.plain.push(UPSTREAM_LINK),
            }
            redis_tls(&mut a.redis, &a.redis_tls, &mut tls);
            // Validate the rest as the binary would once the links above are fixed.
            a.insecure = !tls.plain.is_empty();
            dsvl_gateway::GatewayConfig::try_from(&a).map_err(|e| e.to_string())?;
            let mut secret_files: Vec<PathBuf> = api_keys_file.into_iter().collect();
            secret_files.extend(tls_paths(&a.tls, &a.redis_tls));
            let u = &a.upstream_tls;
            secret_files.extend(
                [&u.upstream_ca_file, &u.upstream_cert_file, &u.upstream_key_file]
                    .into_iter()
                    .flatten()
                    .cloned(),
            );
            let mut ups = upstreams("vision", &a.vision)?;
            ups.extend(upstreams("decoder", &a.decoder)?);
            Ok(Settings {
                binary,
                serves: true,
                grpc_port: a.grpc_listen.port(),
                drain_secs: a.drain_secs,
                device: "cpu".into(),
                gpus: 0,
                group: None,
                upstreams: ups,
                secret_files,
                redis: a.redis.is_some(),
                health_port: a.health_listen.map(|h| h.port()),
                tls,
            })
        }
        Binary::Vision => {
            let mut a = dsvl_vision::Args::try_parse_from(argv).map_err(|e| e.to_string())?;
            let secret = without_secret_file(&mut a.cluster_secret_file, &mut a.insecure)?;
            let mut tls = TlsUse::listener(&a.tls, true, "gRPC listener");
            redis_tls(&mut a.redis, &a.redis_tls, &mut tls);
            dsvl_vision::VisionConfig::try_from(&a).map_err(|e| e.to_string())?;
            let mut secret_files: Vec<PathBuf> = secret.into_iter().collect();
            secret_files.extend(tls_paths(&a.tls, &a.redis_tls));
            let device = a.device.to_string();
            Ok(Settings {
                binary,
                serves: true,
                grpc_port: a.listen.port(),
                drain_secs: a.drain_secs,
                gpus: gpus(&device, 1),
                device,
                group: None,
                upstreams: Vec::new(),
                secret_files,
                redis: a.redis.is_some(),
                health_port: a.health_listen.map(|h| h.port()),
                tls,
            })
        }
        Binary::Decoder => {
            let mut a = dsvl_decoder::Args::try_parse_from(argv).map_err(|e| e.to_string())?;
            let secret = without_secret_file(&mut a.cluster_secret_file, &mut a.insecure)?;
            let serves = !(a.worker || a.node_index > 0);
            let mut tls = TlsUse::listener(&a.tls, serves, "gRPC listener");
            if serves {
                redis_tls(&mut a.redis, &a.redis_tls, &mut tls);
            }
            dsvl_decoder::DecoderConfig::try_from(&a).map_err(|e| e.to_string())?;
            let mut secret_files: Vec<PathBuf> = secret.into_iter().collect();
            secret_files.extend(tls_paths(&a.tls, &a.redis_tls));
            let device = a.device.to_string();
            let group = GroupFlags {
                tp: a.tp,
                nodes: a.nodes,
                model: a.model.clone(),
                dtype: a.dtype.as_str().to_string(),
                device: device.clone(),
                rendezvous_port: a.rendezvous_port,
            };
            Ok(Settings {
                binary,
                serves,
                grpc_port: a.listen.port(),
                drain_secs: if serves { a.drain_secs } else { 0 },
                gpus: gpus(&device, a.tp / a.nodes),
                device,
                group: Some(group),
                upstreams: Vec::new(),
                secret_files,
                redis: a.redis.is_some(),
                health_port: a.health_listen.map(|h| h.port()),
                tls,
            })
        }
    }
}
