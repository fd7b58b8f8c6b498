//! Starting dsvl service binaries as child processes (the local cluster and the demo): find
//! the binary next to `dsvl`, pick free ports, wait for grpc.health.v1 SERVING, and stop them
//! (SIGTERM, then SIGKILL) when the guard drops.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use tonic::transport::Channel;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

/// Path of a sibling binary (`dsvl-vision`, ...).
pub fn sibling_binary(name: &str) -> Result<PathBuf> {
    let me = std::env::current_exe().context("cannot locate the dsvl executable")?;
    let path = me.with_file_name(name);
    if !path.exists() {
        bail!(
            "{} not found next to {} (build everything with `cargo build --workspace --bins`)",
            name,
            me.display()
        );
    }
    Ok(path)
}

/// A port nobody listens on right now.
pub fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A started service; terminated on drop.
pub struct Service {
    /// Name for messages.
    pub name: String,
    /// gRPC address.
    pub addr: String,
    /// How to reach it over mutual TLS (`None`: plain text).
    pub tls: Option<dsvl_tls::ClientFiles>,
    child: Child,
    binary: PathBuf,
    args: Vec<String>,
}

impl Service {
    /// Starts `binary args` (stderr inherited so its logs show).
    pub fn spawn(name: &str, binary: &PathBuf, addr: String, args: &[String]) -> Result<Self> {
        let child = Self::start(binary, args)?;
        Ok(Self {
            name: name.into(),
            addr,
            tls: None,
            child,
            binary: binary.clone(),
            args: args.to_vec(),
        })
    }

    fn start(binary: &PathBuf, args: &[String]) -> Result<Child> {
        let mut cmd = Command::new(binary);
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: the closure only calls prctl(2), which is async-signal-safe. If `dsvl` is
            // killed without cleaning up, its services get SIGTERM and drain instead of lingering.
            unsafe {
                cmd.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong);
                    Ok(())
                });
            }
        }
        cmd.args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            // The services share this terminal: progress as log lines, not rival bars.
            .env(dsvl_telemetry::progress::PROGRESS_ENV, "log")
            // Warnings, and the progress of loading the model.
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG")
                    .unwrap_or_else(|_| "warn,dsvl_telemetry::progress=info".into()),
            )
            .spawn()
            .with_context(|| format!("cannot start {}", binary.display()))
    }

    /// Stops the process if it still runs (SIGTERM, SIGKILL after `grace`) and starts it again
    /// with the same arguments, as an orchestrator restarts a failed container.
    pub fn restart(&mut self, grace: Duration) -> Result<()> {
        self.stop(grace);
        self.child = Self::start(&self.binary, &self.args)?;
        Ok(())
    }

    /// Whether health says SERVING for `service` now (`None`: no answer within 2 s).
    pub async fn serving(&self, service: &str) -> Option<bool> {
        let mut client = HealthClient::new(self.channel().ok()?);
        let req = client.check(HealthCheckRequest { service: service.into() });
        let r = tokio::time::timeout(Duration::from_secs(2), req).await.ok()?;
        Some(r.is_ok_and(|r| r.into_inner().status == 1))
    }

    /// Waits until health `service` reports SERVING (or the process exits, or `limit` passes).
    pub async fn wait_serving(&mut self, service: &str, limit: Duration) -> Result<()> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait()? {
                bail!("{} exited during start-up ({status})", self.name);
            }
            let r = HealthClient::new(self.channel()?)
                .check(HealthCheckRequest { service: service.into() })
                .await;
            if r.is_ok_and(|r| r.into_inner().status == 1) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("{} did not become ready within {limit:?}", self.name);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A lazily connected channel to the service (over mutual TLS when it speaks it).
    pub fn channel(&self) -> Result<Channel> {
        Ok(dsvl_tls::channel_to(&self.addr, self.tls.as_ref(), Duration::from_secs(2))?)
    }

    /// Whether the process has exited (and how).
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        if matches!(self.child.try_wait(), Ok(None)) {
            #[cfg(unix)]
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM);
            }
            let deadline = Instant::now() + grace;
            while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.stop(Duration::from_secs(10));
    }
}
