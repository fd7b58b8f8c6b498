//! Real processes for tests: a `redis-server` on a free loopback port, service binaries that
//! are stopped (SIGTERM, then SIGKILL) when dropped, and a tiny HTTP GET for `/metrics`.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

/// A port nobody listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("bind an ephemeral port")
}

/// The cluster secret every service started by this test process shares (a fresh random one
/// per process, in a file that lives as long as the process), so services that share a Redis
/// or form a group across "nodes" trust each other as in a real cluster.
pub fn cluster_secret_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let mut f = tempfile::NamedTempFile::new().expect("temporary secret file");
        let secret = dsvl_core::ClusterSecret::random().to_file_contents();
        f.write_all(secret.as_bytes()).expect("write the secret");
        f.into_temp_path()
    })
}

/// A `redis-server` child process (installed by `scripts/setup`), no persistence.
pub struct RedisServer {
    child: Option<Child>,
    /// Its port on 127.0.0.1 (plain text: the tests' own admin connection).
    pub port: u16,
    /// Its TLS port on 127.0.0.1 ([`RedisServer::start_tls`]).
    pub tls_port: Option<u16>,
    extra: Vec<String>,
}

/// A stalled `redis-server` ([`RedisServer::freeze`]); SIGCONT when dropped.
pub struct Frozen(u32);

impl Drop for Frozen {
    fn drop(&mut self) {
        let _ = Command::new("kill").args(["-CONT", &self.0.to_string()]).status();
    }
}

impl RedisServer {
    /// Starts a server on a free port and waits until it answers PING.
    pub fn start() -> Result<Self> {
        Self::start_with(&[])
    }

    /// The same, with extra `redis-server` arguments.
    pub fn start_with(extra: &[String]) -> Result<Self> {
        let mut me = Self { child: None, port: free_port(), tls_port: None, extra: extra.to_vec() };
        me.spawn()?;
        Ok(me)
    }

    /// A server that also listens with TLS on [`RedisServer::tls_url`], presenting `cert`
    /// (PEM, with `key`) and requiring clients to present a certificate from `ca`; the plain
    /// port stays open on loopback for the test's own admin commands.
    pub fn start_tls(
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Result<Self> {
        let tls_port = free_port();
        let path = |p: &std::path::Path| p.display().to_string();
        let extra = vec![
            "--tls-port".to_string(),
            tls_port.to_string(),
            "--tls-cert-file".into(),
            path(cert),
            "--tls-key-file".into(),
            path(key),
            "--tls-ca-cert-file".into(),
            path(ca),
            "--tls-auth-clients".into(),
            "yes".into(),
        ];
        let mut me = Self { child: None, port: free_port(), tls_port: Some(tls_port), extra };
        me.spawn()?;
        Ok(me)
    }

    /// `rediss://127.0.0.1:TLS_PORT` (servers from [`RedisServer::start_tls`]).
    pub fn tls_url(&self) -> Option<String> {
        self.tls_port.map(|p| format!("rediss://127.0.0.1:{p}"))
    }

    fn spawn(&mut self) -> Result<()> {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .args(&self.extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("cannot start redis-server (run scripts/setup)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.command("PING").is_ok_and(|r| r.starts_with("+PONG")) {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        bail!("redis-server on port {} did not answer", self.port)
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's pid, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// Kills the server (abruptly, as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port (empty).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        self.spawn()
    }

    /// Stalls the server (SIGSTOP: connections stay open, nothing is answered) until the
    /// returned guard drops (SIGCONT), so a failing test never leaves it frozen.
    pub fn freeze(&self) -> Result<Frozen> {
        let pid = self.child.as_ref().context("the server is not running")?.id();
        anyhow::ensure!(
            Command::new("kill").args(["-STOP", &pid.to_string()]).status()?.success(),
            "SIGSTOP {pid}"
        );
        Ok(Frozen(pid))
    }

    /// Sends one inline command and returns the raw reply.
    pub fn command(&self, cmd: &str) -> Result<String> {
        let mut s = TcpStream::connect(("127.0.0.1", self.port))?;
        s.set_read_timeout(Some(Duration::from_secs(2)))?;
        s.write_all(format!("{cmd}\r\n").as_bytes())?;
        let mut buf = [0u8; 4096];
        let n = s.read(&mut buf)?;
        Ok(String::from_utf8_lossy(&buf[..n]).into_owned())
    }

    /// Number of keys (DBSIZE).
    pub fn dbsize(&self) -> Result<u64> {
        let r = self.command("DBSIZE")?;
        r.trim().trim_start_matches(':').parse().with_context(|| format!("DBSIZE reply {r:?}"))
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A service binary under test; SIGTERM then SIGKILL on drop.
pub struct ServiceProcess {
    child: Child,
    /// Its stderr, when captured ([`ServiceProcess::spawn_capturing_logs`]).
    log: Option<tempfile::NamedTempFile>,
}

impl ServiceProcess {
    /// Spawns `program args`, logs to the test's stderr.
    pub fn spawn(program: &str, args: &[String]) -> Result<Self> {
        Self::start(program, args, false)
    }

    /// Spawns `program args` with its stderr (the service's log) written to a file that
    /// [`ServiceProcess::logs`] reads; a failing test prints it.
    pub fn spawn_capturing_logs(program: &str, args: &[String]) -> Result<Self> {
        Self::start(program, args, true)
    }

    fn start(program: &str, args: &[String], capture: bool) -> Result<Self> {
        let log = capture.then(tempfile::NamedTempFile::new).transpose()?;
        let stderr = match &log {
            Some(f) => Stdio::from(f.reopen()?),
            None => Stdio::inherit(),
        };
        let child = Command::new(program)
            .args(args)
            .env("DSVL_CLUSTER_SECRET_FILE", cluster_secret_file())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {program}"))?;
        Ok(Self { child, log })
    }

    /// Spawns `program args` under `prlimit --data=DATA_LIMIT` (bytes): a regression that lets
    /// a test's attack grow the service's memory kills the service, not the test machine.
    /// prlimit execs the program, so [`ServiceProcess::pid`] is the service's.
    pub fn spawn_limited(program: &str, args: &[String], data_limit: u64) -> Result<Self> {
        let (program, args) = Self::limited(program, args, data_limit);
        Self::spawn(&program, &args)
    }

    /// The `prlimit` command line of [`ServiceProcess::spawn_limited`].
    pub fn limited(program: &str, args: &[String], data_limit: u64) -> (String, Vec<String>) {
        let mut wrapped = vec![format!("--data={data_limit}"), "--".into(), program.into()];
        wrapped.extend(args.iter().cloned());
        ("prlimit".into(), wrapped)
    }

    /// What the service has logged so far (empty unless spawned capturing its logs).
    pub fn logs(&self) -> String {
        self.log
            .as_ref()
            .and_then(|f| std::fs::read(f.path()).ok())
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    }

    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits up to `grace` for the exit status.
    pub fn terminate(&mut self, grace: Duration) -> Result<std::process::ExitStatus> {
        Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status()?;
        let deadline = Instant::now() + grace;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(s);
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                bail!("process {} did not exit within {grace:?} of SIGTERM", self.child.id());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Whether it has exited.
    pub fn try_wait(&mut self) -> Result<Option<std::process::ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Kills it at once (SIGKILL).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.terminate(Duration::from_secs(5));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() && self.log.is_some() {
            eprintln!("--- log of process {} ---\n{}", self.child.id(), self.logs());
        }
    }
}

/// `GET path` over HTTP/1.0; returns the body.
pub fn http_get(addr: &str, path: &str) -> Result<String> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    Ok(out.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(out))
}

/// Sum of every sample of metric `name` whose labels contain all of `labels` (`k="v"` pairs),
/// from Prometheus text; 0 when absent.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, rest) = series.split_once('{').map_or((series, ""), |(n, r)| (n, r));
            if n != name {
                return None;
            }
            let ok = labels.iter().all(|(k, v)| rest.contains(&format!("{k}=\"{v}\"")));
            ok.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// A three-master Redis Cluster on loopback (no replicas), formed with `redis-cli --cluster`.
pub struct RedisCluster {
    /// The nodes.
    pub nodes: Vec<RedisServer>,
    _dir: tempfile::TempDir,
}

impl RedisCluster {
    /// Starts three cluster-enabled nodes and joins them into one cluster.
    pub fn start() -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut nodes = Vec::new();
        for i in 0..3 {
            let conf = dir.path().join(format!("nodes-{i}.conf"));
            nodes.push(RedisServer::start_with(&[
                "--cluster-enabled".into(),
                "yes".into(),
                "--cluster-config-file".into(),
                conf.display().to_string(),
                "--dir".into(),
                dir.path().display().to_string(),
            ])?);
        }
        let addrs: Vec<String> = nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        let out = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        if !out.status.success() {
            bail!("redis-cli --cluster create failed: {}", String::from_utf8_lossy(&out.stdout));
        }
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes
            .iter()
            .all(|n| n.command("CLUSTER INFO").is_ok_and(|r| r.contains("cluster_state:ok")))
        {
            if Instant::now() > deadline {
                bail!("cluster never reached state ok");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(Self { nodes, _dir: dir })
    }

    /// `redis+cluster://127.0.0.1:P1,127.0.0.1:P2,127.0.0.1:P3`.
    pub fn url(&self) -> String {
        let nodes: Vec<String> =
            self.nodes.iter().map(|n| format!("127.0.0.1:{}", n.port)).collect();
        format!("redis+cluster://{}", nodes.join(","))
    }
}

/// Pids whose parent is `pid` (Linux /proc).
pub fn child_pids(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else { continue };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else { continue };
        // The field after the parenthesised command name is the state, then the parent pid.
        let after = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        if after.split_whitespace().nth(1).and_then(|p| p.parse::<u32>().ok()) == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Whether `pid` exists and is not a zombie.
pub fn pid_alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
}
