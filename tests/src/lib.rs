//! Harness of the cross-service tests: starts the real service binaries (built next to the test
//! executable: `cargo build --workspace --bins`, which `scripts/test` runs first) and a real
//! `redis-server`, all on loopback with free ports; plus small gRPC/HTTP client helpers.
#![deny(missing_docs)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_testkit::{free_port, golden_dir, http_get, metric_sum, RedisServer, ServiceProcess};
use serde_json::Value;
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// A service binary of this workspace, next to the test executable's `target/<profile>/deps`.
pub fn binary(name: &str) -> Result<PathBuf> {
    // Test executables live in target/<profile>/deps, binaries (benchmarks) in target/<profile>.
    let exe = std::env::current_exe()?;
    let dir = exe.parent().context("unexpected executable location")?;
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    candidates
        .into_iter()
        .find(|p| p.is_file())
        .with_context(|| format!("{name} is missing next to {}: build the services first (`cargo build --workspace --bins`; scripts/test does)", exe.display()))
}

/// A lazily connected gRPC channel to `addr`, over TLS with `tls`.
pub fn channel(addr: &str, tls: Option<&dsvl_tls::ClientFiles>) -> Result<Channel> {
    Ok(dsvl_tls::channel_to(addr, tls, Duration::from_secs(2))?)
}

/// Whether services started from now on write their logs to a file ([`Options::capture_logs`])
/// instead of the test's stderr.
static CAPTURE_LOGS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Starts `program args`, under `prlimit --data` when `data_limit` is set, capturing its log
/// when [`CAPTURE_LOGS`] is set.
fn launch(program: &str, args: &[String], data_limit: Option<u64>) -> Result<ServiceProcess> {
    let (program, args) = match data_limit {
        Some(limit) => ServiceProcess::limited(program, args, limit),
        None => (program.to_string(), args.to_vec()),
    };
    if CAPTURE_LOGS.load(std::sync::atomic::Ordering::Relaxed) {
        ServiceProcess::spawn_capturing_logs(&program, &args)
    } else {
        ServiceProcess::spawn(&program, &args)
    }
}

/// One running service.
pub struct Svc {
    /// The process (SIGTERM, then SIGKILL, on drop).
    pub proc: ServiceProcess,
    /// How to reach it over mutual TLS (`None`: plain text).
    pub tls: Option<dsvl_tls::ClientFiles>,
    /// Its internal health port (`--health-listen`), when it has one.
    pub health: Option<String>,
    /// gRPC address.
    pub addr: String,
    /// Prometheus address.
    pub metrics: String,
    /// The process's data-segment limit in bytes (`prlimit --data`), kept across respawns.
    pub data_limit: Option<u64>,
    /// The program and its arguments, for [`Svc::restart`].
    command: (String, Vec<String>),
}

impl Svc {
    fn spawn(bin: &str, listen_flag: &str, extra: Vec<String>) -> Result<Self> {
        Self::spawn_limited(bin, listen_flag, extra, None)
    }

    /// Starts `bin`, under `prlimit --data=LIMIT` when `data_limit` is set: a regression that
    /// lets an attack grow the service's memory kills the service, not the test machine.
    fn spawn_limited(
        bin: &str,
        listen_flag: &str,
        mut extra: Vec<String>,
        data_limit: Option<u64>,
    ) -> Result<Self> {
        // `--health-listen auto`: a free port of its own.
        if let Some(i) = extra.iter().position(|a| a == "--health-listen") {
            if extra.get(i + 1).is_some_and(|v| v == "auto") {
                extra[i + 1] = format!("127.0.0.1:{}", free_port());
            }
        }
        let (addr, metrics) =
            (format!("127.0.0.1:{}", free_port()), format!("127.0.0.1:{}", free_port()));
        let mut args =
            vec![listen_flag.to_string(), addr.clone(), "--metrics-listen".into(), metrics.clone()];
        args.extend(extra.iter().cloned());
        let program = binary(bin)?.to_str().context("path")?.to_string();
        let proc = launch(&program, &args, data_limit)?;
        let health = extra
            .iter()
            .position(|a| a == "--health-listen")
            .and_then(|i| extra.get(i + 1).cloned());
        Ok(Self { proc, addr, metrics, tls: None, health, data_limit, command: (program, args) })
    }

    /// Kills the process if it still runs (and its children: a decoder's worker ranks), then
    /// starts it again with the same arguments and ports, as an orchestrator restarts a
    /// failed container. Does not wait for it to serve.
    pub fn restart(&mut self) -> Result<()> {
        let children = dsvl_testkit::child_pids(self.proc.pid());
        self.proc.kill();
        for pid in children {
            let _ = signal(pid, "KILL");
        }
        let (program, args) = &self.command;
        self.proc = launch(program, args, self.data_limit)?;
        Ok(())
    }

    /// A gRPC channel to the service (over mutual TLS when it speaks it), connected lazily.
    pub fn channel(&self) -> Result<Channel> {
        channel(&self.addr, self.tls.as_ref())
    }

    /// Waits until `service` is SERVING; when the process exited during start-up (most often a
    /// port that `free_port` handed out was taken by another test before the service bound
    /// it), starts it again on fresh ports with `extra` arguments, up to three times in all.
    pub async fn serving_or_respawn(
        &mut self,
        bin: &str,
        listen_flag: &str,
        extra: impl Fn() -> Vec<String>,
        service: &str,
        limit: Duration,
    ) -> Result<()> {
        for attempt in 1.. {
            match self.wait_serving(service, limit).await {
                Ok(()) => return Ok(()),
                Err(e) if attempt < 3 && self.proc.try_wait()?.is_some() => {
                    eprintln!(
                        "{bin} exited during start-up ({e}); starting it again on fresh ports"
                    );
                    let tls = self.tls.take();
                    *self = Self::spawn_limited(bin, listen_flag, extra(), self.data_limit)?;
                    self.tls = tls;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the loop returns")
    }

    /// Waits for grpc.health.v1 SERVING on `service`.
    pub async fn wait_serving(&mut self, service: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(st) = self.proc.try_wait()? {
                bail!("{} exited during start-up: {st}", self.addr);
            }
            // The internal health port when there is one (plain text, as kubelet probes it).
            let channel = match &self.health {
                Some(addr) => channel(addr, None)?,
                None => self.channel()?,
            };
            let r = HealthClient::new(channel)
                .check(HealthCheckRequest { service: service.into() })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return Ok(());
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "{} ({service}) never became SERVING",
                self.addr
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Peak resident memory of the process so far (`VmHWM`), in bytes.
    pub fn peak_rss(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.proc.pid()))?;
        let line = status.lines().find(|l| l.starts_with("VmHWM:")).context("VmHWM")?;
        let kib: u64 = line.split_whitespace().nth(1).context("VmHWM value")?.parse()?;
        Ok(kib << 10)
    }

    /// Sum of a metric's samples matching `labels`.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(metric_sum(&http_get(&self.metrics, "/metrics")?, name, labels))
    }
}

/// Sends `SIG<name>` (`STOP`, `CONT`, `TERM`, `KILL`) to `pid`.
pub fn signal(pid: u32, name: &str) -> Result<()> {
    let ok = std::process::Command::new("kill")
        .args([format!("-{name}"), pid.to_string()])
        .status()?
        .success();
    anyhow::ensure!(ok, "kill -{name} {pid}");
    Ok(())
}

/// What to start.
#[derive(Debug, Clone)]
pub struct Options {
    /// Vision-encoder replicas.
    pub vision_replicas: usize,
    /// Decoder tensor-parallel ranks.
    pub tp: usize,
    /// Whether to run a shared Redis.
    pub redis: bool,
    /// Extra gateway flags.
    pub gateway_args: Vec<String>,
    /// Decoder groups (each of `tp` ranks).
    pub decoder_groups: usize,
    /// Gateway replicas (the same flags, their own ports).
    pub gateway_replicas: usize,
    /// Mutual TLS on every internal hop and TLS on the gateway's public listeners, with
    /// certificates from a throwaway authority ([`Pki`]).
    pub tls: bool,
    /// Each tier logs in to Redis as its own least-privilege user ([`dsvl_cache::acl`]).
    pub redis_acl: bool,
    /// Every service gets an internal health port (`--health-listen`, [`Svc::health`]), as in
    /// Kubernetes; the gateway's public gRPC port then serves only the Chat API.
    pub health_ports: bool,
    /// The gateway runs under `prlimit --data` with this many bytes.
    pub gateway_data_limit: Option<u64>,
    /// Every service's log goes to a file ([`dsvl_testkit::ServiceProcess::logs`]) instead of
    /// the test's stderr. Process-wide from the start of the cluster on: a test binary that
    /// sets it should hold clusters that all set it.
    pub capture_logs: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            vision_replicas: 2,
            tp: 2,
            redis: true,
            gateway_args: Vec::new(),
            decoder_groups: 1,
            gateway_replicas: 1,
            tls: false,
            health_ports: false,
            redis_acl: false,
            gateway_data_limit: None,
            capture_logs: false,
        }
    }
}

/// Waits (up to 5 s) until the decoder at `addr` reports `running` sequences. The decoder
/// publishes its load after each step, while a step's tokens leave during it: a client that
/// has just read a token may still see the report from before that step.
pub async fn wait_for_running(addr: &str, running: u32) -> Result<()> {
    use dsvl_proto::internal::decoder_client::DecoderClient;
    use dsvl_proto::internal::LoadRequest;
    let mut load = DecoderClient::connect(format!("http://{addr}")).await?;
    let t = Instant::now();
    loop {
        let l = load.load(LoadRequest {}).await?.into_inner();
        if l.running == running {
            return Ok(());
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(5),
            "the decoder reports {} running sequences, not {running}",
            l.running
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Gateway + vision replicas + decoder groups (+ Redis).
pub struct Cluster {
    /// The gateway (gRPC at `addr`).
    pub gateway: Svc,
    /// Gateway HTTP address.
    pub http: String,
    /// Vision replicas.
    pub vision: Vec<Svc>,
    /// Decoder rank 0 (of the first group).
    pub decoder: Svc,
    /// Rank 0 of the other decoder groups.
    pub more_decoders: Vec<Svc>,
    /// The other gateway replicas, each with its HTTP address.
    pub more_gateways: Vec<(Svc, String)>,
    /// Shared cache, when asked for.
    pub redis: Option<RedisServer>,
    /// The certificates, with [`Options::tls`].
    pub pki: Option<Pki>,
}

/// The name the internal tiers accept from their callers (`--tls-client-names`).
pub const GATEWAY_NAME: &str = "dsvl-gateway";

/// A throwaway certificate authority and one leaf per tier (all valid for 127.0.0.1), in a
/// temporary directory removed on drop.
pub struct Pki {
    /// The directory.
    pub dir: tempfile::TempDir,
    /// The vision replicas' certificate.
    pub vision: dsvl_tls::dev_ca::LeafFiles,
    /// The decoder groups' certificate.
    pub decoder: dsvl_tls::dev_ca::LeafFiles,
    /// The gateway's certificate (public listeners and calls to the tiers).
    pub gateway: dsvl_tls::dev_ca::LeafFiles,
    /// A client's certificate (tests calling the tiers directly).
    pub client: dsvl_tls::dev_ca::LeafFiles,
    /// Redis's certificate (its TLS port).
    pub redis: dsvl_tls::dev_ca::LeafFiles,
}

impl Pki {
    /// A new authority and its leaves.
    pub fn new() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let ca = dsvl_tls::DevCa::new("dsvl test CA")?;
        // Every leaf is valid for loopback; the gateway's (and the test client's, which calls
        // the tiers as the gateway would) also for `dsvl-gateway`, the one client name the
        // internal tiers accept.
        let leaf = |name: &str, client: bool| {
            let mut names = vec!["127.0.0.1", "localhost"];
            if client {
                names.push(GATEWAY_NAME);
            }
            ca.write_leaf(dir.path(), name, &names)
        };
        Ok(Self {
            vision: leaf("vision", false)?,
            decoder: leaf("decoder", false)?,
            gateway: leaf("gateway", true)?,
            client: leaf("client", true)?,
            redis: leaf("redis", false)?,
            dir,
        })
    }

    /// An internal tier's flags for `leaf`: mutual TLS, callers must be the gateway.
    pub fn server_flags(leaf: &dsvl_tls::dev_ca::LeafFiles) -> Vec<String> {
        [
            "--tls-cert-file",
            &leaf.cert.display().to_string(),
            "--tls-key-file",
            &leaf.key.display().to_string(),
            "--tls-client-ca-file",
            &leaf.ca.display().to_string(),
            "--tls-client-names",
            GATEWAY_NAME,
        ]
        .map(String::from)
        .to_vec()
    }

    /// A tier's flags for Redis over TLS, presenting `leaf`.
    pub fn redis_flags(leaf: &dsvl_tls::dev_ca::LeafFiles) -> Vec<String> {
        [
            "--redis-ca-file",
            &leaf.ca.display().to_string(),
            "--redis-cert-file",
            &leaf.cert.display().to_string(),
            "--redis-key-file",
            &leaf.key.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }

    /// The gateway's flags: TLS on its listeners (no client certificates), mutual TLS upstream.
    pub fn gateway_flags(&self) -> Vec<String> {
        let g = &self.gateway;
        [
            "--tls-cert-file",
            &g.cert.display().to_string(),
            "--tls-key-file",
            &g.key.display().to_string(),
            "--upstream-ca-file",
            &g.ca.display().to_string(),
            "--upstream-cert-file",
            &g.cert.display().to_string(),
            "--upstream-key-file",
            &g.key.display().to_string(),
        ]
        .map(String::from)
        .to_vec()
    }
}

impl Cluster {
    /// Starts everything on the bundled tiny model and waits until the gateway serves.
    pub async fn start(opts: Options) -> Result<Self> {
        if opts.capture_logs {
            CAPTURE_LOGS.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        let pki = if opts.tls { Some(Pki::new()?) } else { None };
        // With TLS, the tiers reach Redis on its TLS port (the plain one stays for the
        // test's own admin commands); without, every service runs `--insecure` on purpose.
        let redis = match (opts.redis, &pki) {
            (false, _) => None,
            (true, Some(p)) => {
                Some(RedisServer::start_tls(&p.redis.cert, &p.redis.key, &p.redis.ca)?)
            }
            (true, None) => Some(RedisServer::start()?),
        };
        let insecure: Vec<String> =
            if pki.is_none() { vec!["--insecure".into()] } else { Vec::new() };
        // With `redis_acl`, each tier logs in as its own least-privilege user.
        if let (Some(r), true) = (&redis, opts.redis_acl) {
            for tier in dsvl_cache::acl::TierUser::ALL {
                let line = tier.acl_line(&format!("pw-{}", tier.name()));
                let reply = r.command(&line.replacen("user ", "ACL SETUSER ", 1))?;
                anyhow::ensure!(reply.starts_with("+OK"), "{line}: {reply}");
            }
        }
        let redis_url = |tier: dsvl_cache::acl::TierUser| -> Vec<String> {
            let Some(r) = &redis else { return Vec::new() };
            let url = r.tls_url().unwrap_or_else(|| r.url());
            let url = if opts.redis_acl {
                let (scheme, rest) = url.split_once("://").expect("a URL");
                format!("{scheme}://{}:pw-{}@{rest}", tier.name(), tier.name())
            } else {
                url
            };
            let leaf = pki.as_ref().map(|p| match tier {
                dsvl_cache::acl::TierUser::Gateway => &p.gateway,
                dsvl_cache::acl::TierUser::Vision => &p.vision,
                dsvl_cache::acl::TierUser::Decoder => &p.decoder,
            });
            let mut flags = vec!["--redis".to_string(), url];
            flags.extend(leaf.into_iter().flat_map(Pki::redis_flags));
            flags
        };
        let client_tls = pki.as_ref().map(|p| p.client.client());
        let health_flags: Vec<String> = if opts.health_ports {
            vec!["--health-listen".into(), "auto".into()]
        } else {
            Vec::new()
        };
        let mut vision_flags = redis_url(dsvl_cache::acl::TierUser::Vision);
        vision_flags.extend(insecure.iter().cloned());
        vision_flags.extend(health_flags.iter().cloned());
        vision_flags.extend(pki.iter().flat_map(|p| Pki::server_flags(&p.vision)));
        let mut vision = Vec::new();
        for _ in 0..opts.vision_replicas {
            let mut v = Svc::spawn("dsvl-vision", "--listen", vision_flags.clone())?;
            v.tls = client_tls.clone();
            vision.push(v);
        }
        let dec_args = || {
            let mut a = vec![
                "--tp".to_string(),
                opts.tp.to_string(),
                "--rendezvous-port".into(),
                free_port().to_string(),
            ];
            a.extend(redis_url(dsvl_cache::acl::TierUser::Decoder));
            a.extend(insecure.iter().cloned());
            a.extend(pki.iter().flat_map(|p| Pki::server_flags(&p.decoder)));
            a.extend(health_flags.iter().cloned());
            a
        };
        let mut decoders = Vec::new();
        for _ in 0..opts.decoder_groups.max(1) {
            let mut d = Svc::spawn("dsvl-decoder", "--listen", dec_args())?;
            d.tls = client_tls.clone();
            decoders.push(d);
        }
        let limit = Duration::from_secs(120);
        for v in &mut vision {
            let (bin, api) = ("dsvl-vision", "dsvl.internal.v1.VisionEncoder");
            v.serving_or_respawn(bin, "--listen", || vision_flags.clone(), api, limit).await?;
        }
        for d in &mut decoders {
            let (bin, api) = ("dsvl-decoder", "dsvl.internal.v1.Decoder");
            d.serving_or_respawn(bin, "--listen", dec_args, api, limit).await?;
        }
        let decoder_addrs = decoders.iter().map(|d| d.addr.clone()).collect::<Vec<_>>().join(",");
        let decoder = decoders.remove(0);
        let mut args = vec![
            "--http-listen".to_string(),
            format!("127.0.0.1:{}", free_port()),
            "--decoder".into(),
            decoder_addrs,
            "--refresh-secs".into(),
            "1".into(),
        ];
        if !vision.is_empty() {
            args.extend([
                "--vision".to_string(),
                vision.iter().map(|v| v.addr.clone()).collect::<Vec<_>>().join(","),
            ]);
        }
        args.extend(redis_url(dsvl_cache::acl::TierUser::Gateway));
        args.extend(insecure.iter().cloned());
        args.extend(pki.iter().flat_map(Pki::gateway_flags));
        args.extend(health_flags.iter().cloned());
        // The gateway fails closed: tests without keys serve the public tenant on purpose.
        if !opts.gateway_args.iter().any(|a| a.starts_with("--api-keys")) {
            args.push("--allow-unauthenticated".into());
        }
        args.extend(opts.gateway_args);
        // A fresh HTTP port on every start (args[1] is --http-listen's value).
        let http_port = std::sync::Mutex::new(args[1].clone());
        let gateway_args = || {
            let mut a = args.clone();
            a[1] = format!("127.0.0.1:{}", free_port());
            *http_port.lock().expect("lock") = a[1].clone();
            a
        };
        // Callers of the public listeners only need the authority (no client certificate).
        let public_tls =
            pki.as_ref().map(|p| dsvl_tls::ClientFiles { ca: p.client.ca.clone(), identity: None });
        let mut gateway = Svc::spawn_limited(
            "dsvl-gateway",
            "--grpc-listen",
            args.clone(),
            opts.gateway_data_limit,
        )?;
        gateway.tls = public_tls.clone();
        let (bin, api) = ("dsvl-gateway", "dsvl.v1.Chat");
        gateway
            .serving_or_respawn(bin, "--grpc-listen", gateway_args, api, Duration::from_secs(60))
            .await?;
        let http = http_port.lock().expect("lock").clone();
        let mut more_gateways = Vec::new();
        for _ in 1..opts.gateway_replicas.max(1) {
            let mut g = Svc::spawn_limited(
                "dsvl-gateway",
                "--grpc-listen",
                gateway_args(),
                opts.gateway_data_limit,
            )?;
            g.tls = public_tls.clone();
            g.serving_or_respawn(bin, "--grpc-listen", gateway_args, api, Duration::from_secs(60))
                .await?;
            more_gateways.push((g, http_port.lock().expect("lock").clone()));
        }
        Ok(Self {
            gateway,
            http,
            vision,
            decoder,
            more_decoders: decoders,
            redis,
            more_gateways,
            pki,
        })
    }

    /// A gRPC Chat client (over TLS with [`Options::tls`]).
    pub async fn chat(&self) -> Result<ChatClient<Channel>> {
        Ok(ChatClient::new(self.gateway.channel()?).max_encoding_message_size(64 << 20))
    }

    /// Images encoded by the vision tier so far (all replicas that still answer).
    pub fn images_encoded(&self) -> f64 {
        self.vision
            .iter()
            .filter_map(|v| v.metric("dsvl_vision_images_encoded_total", &[]).ok())
            .sum()
    }
}

/// An HTTP response.
#[derive(Debug)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Raw header block.
    pub headers: String,
    /// Body.
    pub body: String,
}

impl HttpResponse {
    /// The body as JSON.
    pub fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }

    /// A header's value (case-insensitive name).
    pub fn header(&self, name: &str) -> Option<String> {
        self.headers.lines().find_map(|l| {
            let (k, v) = l.split_once(':')?;
            k.trim().eq_ignore_ascii_case(name).then(|| v.trim().to_string())
        })
    }

    /// `data:` payloads of a server-sent-event body, in order.
    pub fn sse_data(&self) -> Vec<String> {
        self.body
            .split("\n\n")
            .filter_map(|ev| {
                ev.lines()
                    .find_map(|l| l.strip_prefix("data: ").or_else(|| l.strip_prefix("data:")))
            })
            .map(str::to_string)
            .collect()
    }
}

/// Sends `head` (request line and headers, without the blank line; `Host` is added) and `body`
/// as one HTTP/1.0 request and reads the response to the end (the server closes the connection,
/// so a streamed body arrives whole). The server may answer before the body is sent and close
/// (a 413, a 401): a failed write is not an error, the answer is what counts.
pub fn http_exchange(addr: &str, head: &str, body: &[u8]) -> Result<HttpResponse> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(120)))?;
    s.write_all(format!("{head}\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    if let Err(e) = s.read_to_end(&mut raw) {
        anyhow::ensure!(!raw.is_empty(), "no answer from {addr}: {e}");
    }
    let text = String::from_utf8(raw)?;
    let (head, body) = text.split_once("\r\n\r\n").context("no header end")?;
    let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
    Ok(HttpResponse { status, headers: head.to_string(), body: body.to_string() })
}

/// `POST path` with a JSON body over HTTP/1.0.
pub fn http_post(
    addr: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &Value,
) -> Result<HttpResponse> {
    let body = serde_json::to_vec(body)?;
    let mut head = format!(
        "POST {path} HTTP/1.0\r\nContent-Type: application/json\r\nContent-Length: {}",
        body.len()
    );
    for (k, v) in headers {
        head.push_str(&format!("\r\n{k}: {v}"));
    }
    http_exchange(addr, &head, &body)
}

/// `GET path` over HTTP/1.0, with the status.
pub fn http_get_response(addr: &str, path: &str) -> Result<HttpResponse> {
    http_exchange(addr, &format!("GET {path} HTTP/1.0"), &[])
}

/// One kept-alive HTTP/1.1 connection: requests go one after another on the same socket, so a
/// test can show that the server still serves a connection after a hostile request. Bodies
/// must come with a `Content-Length` (non-streaming responses).
pub struct HttpConn {
    stream: std::io::BufReader<TcpStream>,
    addr: String,
}

impl HttpConn {
    /// Connects to `addr`.
    pub fn connect(addr: &str) -> Result<Self> {
        let s = TcpStream::connect(addr)?;
        s.set_read_timeout(Some(Duration::from_secs(120)))?;
        Ok(Self { stream: std::io::BufReader::new(s), addr: addr.to_string() })
    }

    /// `POST path` with a JSON body; reads exactly one response.
    pub fn post(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
        body: &Value,
    ) -> Result<HttpResponse> {
        use std::io::BufRead;
        let body = serde_json::to_vec(body)?;
        let mut req = format!("POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n", self.addr, body.len());
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let s = self.stream.get_mut();
        s.write_all(req.as_bytes())?;
        s.write_all(&body)?;
        let mut head = String::new();
        loop {
            let mut line = String::new();
            ensure_read(self.stream.read_line(&mut line)?)?;
            if line == "\r\n" {
                break;
            }
            head.push_str(&line);
        }
        let status = head.split_whitespace().nth(1).context("no status")?.parse()?;
        let resp = HttpResponse { status, headers: head, body: String::new() };
        let len: usize = resp.header("content-length").context("no content-length")?.parse()?;
        let mut buf = vec![0; len];
        self.stream.read_exact(&mut buf)?;
        Ok(HttpResponse { body: String::from_utf8(buf)?, ..resp })
    }
}

fn ensure_read(n: usize) -> Result<()> {
    anyhow::ensure!(n > 0, "the server closed the connection");
    Ok(())
}

/// The services a gRPC server lists on reflection (v1).
pub async fn reflection_services(addr: &str) -> Result<Vec<String>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    reflection_services_on(channel, addr).await
}

/// Asks a reflection service of version `$v` (`v1`, `v1alpha`) on `$channel` for its list.
macro_rules! list_services {
    ($v:ident, $channel:expr, $label:expr) => {{
        use tonic_reflection::pb::$v::server_reflection_client::ServerReflectionClient;
        use tonic_reflection::pb::$v::server_reflection_request::MessageRequest;
        use tonic_reflection::pb::$v::server_reflection_response::MessageResponse;
        use tonic_reflection::pb::$v::ServerReflectionRequest;
        let mut client = ServerReflectionClient::new($channel);
        let req = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut resp = client.server_reflection_info(tokio_stream::iter([req])).await?.into_inner();
        match resp.message().await?.and_then(|m| m.message_response) {
            Some(MessageResponse::ListServicesResponse(l)) => {
                Ok(l.service.into_iter().map(|s| s.name).collect())
            }
            other => {
                bail!("{} reflection on {}: unexpected answer {other:?}", stringify!($v), $label)
            }
        }
    }};
}

/// [`reflection_services`] on an existing channel (`label` names it in errors).
pub async fn reflection_services_on(channel: Channel, label: &str) -> Result<Vec<String>> {
    list_services!(v1, channel, label)
}

/// [`reflection_services`] through `grpc.reflection.v1alpha`, the version Python's
/// `grpcio-reflection` and older tools ask for.
pub async fn reflection_services_v1alpha(addr: &str) -> Result<Vec<String>> {
    let channel = Channel::from_shared(format!("http://{addr}"))?.connect().await?;
    list_services!(v1alpha, channel, addr)
}

/// A golden conversation as gRPC messages (parts split at the placeholders).
pub fn grpc_messages(conv: &Value) -> Result<Vec<dsvl_proto::v1::ChatMessage>> {
    let mut out = Vec::new();
    for m in conv.as_array().context("conversation")? {
        let images: Vec<&str> = m["images"]
            .as_array()
            .map(|a| a.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        let mut content = Vec::new();
        for (i, text) in
            m["content"].as_str().unwrap_or("").split("<image_placeholder>").enumerate()
        {
            if i > 0 {
                content.push(dsvl_proto::v1::ContentPart {
                    part: Some(dsvl_proto::v1::content_part::Part::Image(
                        golden_image(images[i - 1])?.into(),
                    )),
                });
            }
            if !text.is_empty() {
                content.push(dsvl_proto::v1::ContentPart {
                    part: Some(dsvl_proto::v1::content_part::Part::Text(text.into())),
                });
            }
        }
        out.push(dsvl_proto::v1::ChatMessage {
            role: m["role"].as_str().unwrap_or("").to_lowercase(),
            content,
        });
    }
    Ok(out)
}

/// A golden case of `chat.json`.
pub fn golden_case(name: &str) -> Result<Value> {
    let chat: Value = serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    chat["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .context("no such case")
}

/// The reference's greedy ids for `prefix` (`image` or `text`).
pub fn golden_generated(prefix: &str) -> Result<Vec<u32>> {
    let lm = candle_core::safetensors::load(
        golden_dir().join("lm.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    Ok(lm[&format!("{prefix}.generated_ids")]
        .flatten_all()?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as u32)
        .collect())
}

/// Bytes of a golden fixture image.
pub fn golden_image(name: &str) -> Result<Vec<u8>> {
    Ok(std::fs::read(golden_dir().join(name))?)
}

/// A `/v1/completions` body that scores the golden text prompt followed by the reference's
/// greedy reply to it (`echo`, `logprobs: 1`, nothing generated).
pub fn golden_scoring_body() -> Result<Value> {
    let prompt: Vec<u32> = serde_json::from_value(golden_case("text_only")?["input_ids"].clone())?;
    let ids: Vec<u32> = prompt.into_iter().chain(golden_generated("text")?).collect();
    Ok(serde_json::json!({"prompt": ids, "echo": true, "logprobs": 1, "max_tokens": 0}))
}

/// Checks the reply to [`golden_scoring_body`]: each prompt token's log-probability is the
/// log-softmax of the reference's prompt logits at that token within 2e-3 (logits within the
/// golden 1e-3 move a log-softmax by at most twice that), and each reply token is the most
/// likely at its position (its figure the largest of its alternatives: the reply is greedy),
/// as lm-evaluation-harness's `is_greedy` checks it.
pub fn check_golden_scoring(reply: &Value) -> Result<()> {
    let lm = candle_core::safetensors::load(
        golden_dir().join("lm.safetensors"),
        &candle_core::Device::Cpu,
    )?;
    let golden: Vec<Vec<f32>> =
        lm["text.logits"].squeeze(0)?.to_dtype(candle_core::DType::F32)?.to_vec2()?;
    let prompt: Vec<u32> = serde_json::from_value(golden_case("text_only")?["input_ids"].clone())?;
    let lp = &reply["choices"][0]["logprobs"];
    let figures = lp["token_logprobs"].as_array().context("token_logprobs")?;
    let tops = lp["top_logprobs"].as_array().context("top_logprobs")?;
    let total = prompt.len() + golden_generated("text")?.len();
    anyhow::ensure!(figures.len() == total && tops.len() == total, "one entry per token: {lp}");
    anyhow::ensure!(figures[0].is_null(), "the first token has no figure");
    let mut worst = 0f64;
    for p in 1..total {
        let got = figures[p].as_f64().with_context(|| format!("position {p}"))?;
        if p < prompt.len() {
            let row = &golden[p - 1];
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let lse = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln();
            let want = f64::from(row[prompt[p] as usize] - max) - lse;
            worst = worst.max((got - want).abs());
        } else {
            let best = tops[p]
                .as_object()
                .context("alternatives")?
                .values()
                .filter_map(Value::as_f64)
                .fold(f64::MIN, f64::max);
            anyhow::ensure!(
                got == best,
                "position {p}: the greedy token at {got}, {best} likelier"
            );
        }
    }
    anyhow::ensure!(worst <= 2e-3, "prompt log-probabilities off the reference by {worst:.2e}");
    Ok(())
}
