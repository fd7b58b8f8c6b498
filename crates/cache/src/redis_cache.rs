//! Redis as the shared tier: one node through a `ConnectionManager` (reconnects in the
//! background) or a Redis Cluster (`redis+cluster://host:port[,host:port...]`), each with
//! connect and response timeouts, behind a [`CircuitBreaker`]. Connecting is lazy, so a
//! service starts (and serves, uncached) while Redis is down.
//!
//! Round trips:
//! * Callers that hold several keys at once batch them: [`RedisCache::get_many`] is one `MGET`
//!   (split per slot by the cluster client), [`RedisCache::exists_many`] one pipeline of
//!   `EXISTS` on a single node (per-key commands on a cluster, where a pipeline may not cross
//!   slots). Either is one breaker call: one failure, one timeout, however many keys.
//! * Single-key calls from concurrent tasks share one multiplexed connection (the
//!   `ConnectionManager` or the cluster connection), which writes commands as they arrive
//!   without waiting for earlier replies: concurrent requests are pipelined on the wire.
//!
//! Time bounds: a call never waits more than `connect_timeout` to get a connection (including
//! waiting behind another task that is connecting) plus `response_timeout` for the reply, so a
//! stalled (not just dead) Redis costs a caller at most those timeouts, never a hang.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::link::RedisTls;
use crate::outage::{OutageLog, OUTAGE_LOG_EVERY};
use crate::{CacheError, EmbeddingCache};

/// How often the TLS files are checked for rotation.
const TLS_POLL: Duration = Duration::from_secs(2);

/// The TLS files as they were when the current connection was made, and when they were last
/// compared with the disk.
struct TlsSeen {
    signature: Vec<Option<(std::time::SystemTime, u64)>>,
    checked: std::time::Instant,
}

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, or `redis+cluster://host:port[,host:port...]` for a cluster;
    /// `rediss://` and `rediss+cluster://` over TLS.
    pub url: String,
    /// Certificate authority and client certificate for a TLS URL.
    pub tls: RedisTls,
    /// Deadline for establishing a connection.
    pub connect_timeout: Duration,
    /// Deadline for any single command.
    pub response_timeout: Duration,
    /// Breaker tuning.
    pub breaker: BreakerConfig,
}

impl RedisConfig {
    /// Defaults suited to a cache on the request path: fail fast, recover in seconds.
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            tls: RedisTls::default(),
            connect_timeout: Duration::from_millis(500),
            response_timeout: Duration::from_millis(500),
            breaker: BreakerConfig::default(),
        }
    }
}

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

impl Conn {
    async fn query<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        match self {
            Self::Single(c) => cmd.query_async(&mut c.clone()).await,
            Self::Cluster(c) => cmd.query_async(&mut c.clone()).await,
        }
    }

    /// Whether several key commands may travel as one pipeline (a cluster pipeline must stay
    /// within one slot).
    fn pipelines_across_keys(&self) -> bool {
        matches!(self, Self::Single(_))
    }

    async fn query_pipe<T: redis::FromRedisValue>(
        &self,
        pipe: &redis::Pipeline,
    ) -> redis::RedisResult<T> {
        match self {
            Self::Single(c) => pipe.query_async(&mut c.clone()).await,
            Self::Cluster(c) => pipe.query_async(&mut c.clone()).await,
        }
    }
}

fn timed_out(what: &str) -> CacheError {
    CacheError::Redis(redis::RedisError::from(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        what.to_string(),
    )))
}

/// The Redis tier.
pub struct RedisCache {
    config: RedisConfig,
    conn: Mutex<Option<Conn>>,
    breaker: Arc<CircuitBreaker>,
    tls_seen: std::sync::Mutex<TlsSeen>,
    outage: OutageLog,
}

const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl RedisCache {
    /// A cache for `config` (no connection is made yet).
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(config: RedisConfig) -> Result<Self, CacheError> {
        if !["redis://", "rediss://", "redis+cluster://", "rediss+cluster://"]
            .iter()
            .any(|scheme| config.url.starts_with(scheme))
        {
            return Err(CacheError::Config(format!("unsupported Redis URL `{}`", config.url)));
        }
        if config.tls.has_files() && !crate::link::is_tls_url(&config.url) {
            return Err(CacheError::Config("TLS files given for a plain-text Redis URL".into()));
        }
        // Unreadable or unparsable files are a configuration error now, not a miss on every
        // request (the client parses the PEM when it is built).
        if config.tls.has_files() {
            let certs = config.tls.certificates()?;
            match config.url.strip_prefix("rediss+cluster://") {
                Some(nodes) => {
                    let nodes: Vec<String> =
                        nodes.split(',').map(|n| format!("rediss://{n}")).collect();
                    redis::cluster::ClusterClientBuilder::new(nodes).certs(certs).build()?;
                }
                None => {
                    redis::Client::build_with_tls(config.url.as_str(), certs)?;
                }
            }
        }
        if !crate::link::is_tls_url(&config.url) {
            tracing::warn!(
                "Redis in plain text ({}); use rediss:// for TLS",
                config.url.split('@').next_back().unwrap_or_default()
            );
        }
        let breaker = Arc::new(CircuitBreaker::new(config.breaker));
        let tls_seen = std::sync::Mutex::new(TlsSeen {
            signature: config.tls.signature(),
            checked: std::time::Instant::now(),
        });
        let outage = OutageLog::new("Redis", OUTAGE_LOG_EVERY);
        Ok(Self { config, conn: Mutex::new(None), breaker, tls_seen, outage })
    }

    /// The breaker (for health and metrics).
    pub fn breaker(&self) -> &Arc<CircuitBreaker> {
        &self.breaker
    }

    /// Whether `key` is present (one `EXISTS`, no value transfer): lets a caller skip work
    /// whose result is already cached.
    ///
    /// # Errors
    /// Redis unreachable, timed out, or the breaker is open.
    pub async fn exists(&self, key: &str) -> Result<bool, CacheError> {
        let cmd = redis::cmd("EXISTS").arg(key).clone();
        let n: u64 = self.run("exists", |c| async move { c.query(&cmd).await }).await?;
        Ok(n > 0)
    }

    /// Whether each of `keys` is present, in order, in one round trip (a pipeline of `EXISTS`
    /// on a single node; concurrent per-key `EXISTS` on a cluster). No value is transferred.
    ///
    /// # Errors
    /// Redis unreachable, timed out, or the breaker is open (for all keys at once).
    pub async fn exists_many<K: AsRef<str>>(&self, keys: &[K]) -> Result<Vec<bool>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let keys: Vec<&str> = keys.iter().map(AsRef::as_ref).collect();
        let counts: Vec<u64> = self
            .run("exists", |c| async move {
                if c.pipelines_across_keys() {
                    let mut pipe = redis::pipe();
                    for k in &keys {
                        pipe.cmd("EXISTS").arg(*k);
                    }
                    c.query_pipe(&pipe).await
                } else {
                    let cmds: Vec<redis::Cmd> =
                        keys.iter().map(|k| redis::cmd("EXISTS").arg(*k).clone()).collect();
                    futures::future::try_join_all(cmds.iter().map(|cmd| c.query::<u64>(cmd))).await
                }
            })
            .await?;
        Ok(counts.into_iter().map(|n| n > 0).collect())
    }

    /// The values of `keys`, in order, in one `MGET` (on a cluster the client splits it per
    /// slot and reassembles the replies).
    ///
    /// # Errors
    /// Redis unreachable, timed out, or the breaker is open (for all keys at once).
    pub async fn get_many<K: AsRef<str>>(
        &self,
        keys: &[K],
    ) -> Result<Vec<Option<Bytes>>, CacheError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        let mut cmd = redis::cmd("MGET");
        for k in keys {
            cmd.arg(k.as_ref());
        }
        let values: Vec<Option<Vec<u8>>> =
            self.run("get", |c| async move { c.query(&cmd).await }).await?;
        if values.len() != keys.len() {
            return Err(CacheError::Redis(redis::RedisError::from((
                redis::ErrorKind::Client,
                "MGET answered a different number of values",
                format!("{} for {} keys", values.len(), keys.len()),
            ))));
        }
        Ok(values.into_iter().map(|v| v.map(Bytes::from)).collect())
    }

    /// Runs the Lua `script` atomically on `keys` (which must share a hash slot on a cluster:
    /// give them one `{hash tag}`) with `args` (`EVAL`; the scripts are small).
    ///
    /// # Errors
    /// Redis unreachable, timed out, the script failed, or the breaker is open.
    pub async fn eval<T: redis::FromRedisValue + Send + 'static>(
        &self,
        script: &str,
        keys: &[String],
        args: &[String],
    ) -> Result<T, CacheError> {
        let cmd = redis::cmd("EVAL").arg(script).arg(keys.len()).arg(keys).arg(args).clone();
        self.run("eval", |c| async move { c.query(&cmd).await }).await
    }

    async fn connect(&self) -> Result<Conn, CacheError> {
        let c = &self.config;
        // Read now, so a rotated certificate is what the new connection presents.
        let certs = if c.tls.has_files() {
            let signature = c.tls.signature();
            let certs = c.tls.certificates()?;
            self.tls_seen.lock().expect("tls lock").signature = signature;
            Some(certs)
        } else {
            None
        };
        let cluster = [("redis+cluster://", "redis://"), ("rediss+cluster://", "rediss://")]
            .into_iter()
            .find_map(|(scheme, node)| Some((c.url.strip_prefix(scheme)?, node)));
        if let Some((nodes, node_scheme)) = cluster {
            let nodes: Vec<String> =
                nodes.split(',').map(|n| format!("{node_scheme}{n}")).collect();
            let mut builder = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(c.connect_timeout)
                .response_timeout(c.response_timeout);
            if let Some(certs) = certs {
                builder = builder.certs(certs);
            }
            let client = builder.build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = match certs {
                Some(certs) => redis::Client::build_with_tls(c.url.as_str(), certs)?,
                None => redis::Client::open(c.url.as_str())?,
            };
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(c.connect_timeout))
                .set_response_timeout(Some(c.response_timeout))
                .set_number_of_retries(1);
            Ok(Conn::Single(ConnectionManager::new_with_config(client, cfg).await?))
        }
    }

    /// Whether the TLS files changed since the current connection was made (checked at most
    /// every [`TLS_POLL`]).
    fn tls_rotated(&self) -> bool {
        if !self.config.tls.has_files() {
            return false;
        }
        let mut seen = self.tls_seen.lock().expect("tls lock");
        if seen.checked.elapsed() < TLS_POLL {
            return false;
        }
        seen.checked = std::time::Instant::now();
        let now = self.config.tls.signature();
        now != seen.signature && now.iter().all(Option::is_some)
    }

    /// A connection, connecting first if there is none. Waiting behind another task that is
    /// connecting counts against the same `connect_timeout`.
    async fn connection(&self) -> Result<Conn, CacheError> {
        let attempt = async {
            let mut guard = self.conn.lock().await;
            let rotated = self.tls_rotated();
            if rotated {
                tracing::info!("Redis TLS files changed: reconnecting with them");
                *guard = None;
            }
            if let Some(c) = guard.as_ref() {
                return Ok(c.clone());
            }
            let connected = self.connect().await;
            if rotated {
                let outcome = if connected.is_ok() { "ok" } else { "error" };
                metrics::counter!("dsvl_tls_reloads_total", "outcome" => outcome).increment(1);
                if let Err(e) = &connected {
                    tracing::warn!(error = %e, "Redis refused the connection with the new TLS files");
                }
            }
            let c = connected?;
            *guard = Some(c.clone());
            Ok(c)
        };
        tokio::time::timeout(self.config.connect_timeout, attempt)
            .await
            .unwrap_or_else(|_| Err(timed_out("connect timed out")))
    }

    /// Runs `op` (named `name` in metrics and logs) on a connection through the breaker: at
    /// most `connect_timeout` to get the connection, then at most `response_timeout` for `op`
    /// (the clients enforce the same response timeout per command; this bounds the whole
    /// operation, reconnects included). Failures are counted in `dsvl_cache_errors_total`
    /// and reported by the outage log ([`crate::outage`]).
    async fn run<T, F, Fut>(&self, name: &'static str, op: F) -> Result<T, CacheError>
    where
        F: FnOnce(Conn) -> Fut,
        Fut: std::future::Future<Output = redis::RedisResult<T>>,
    {
        if !self.breaker.allow() {
            metrics::gauge!("dsvl_cache_breaker_state").set(self.breaker.state().as_gauge());
            let e = CacheError::BreakerOpen;
            metrics::counter!("dsvl_cache_errors_total", "op" => name, "kind" => e.kind())
                .increment(1);
            self.outage.failure(name, &"the circuit breaker is open after repeated failures");
            return Err(e);
        }
        let result = match self.connection().await {
            Ok(c) => match tokio::time::timeout(self.config.response_timeout, op(c)).await {
                Ok(r) => r.map_err(CacheError::Redis),
                Err(_) => Err(timed_out("response timed out")),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => {
                self.breaker.success();
                self.outage.success();
            }
            Err(e) => {
                tracing::debug!(op = name, error = %e, "redis call failed");
                metrics::counter!("dsvl_cache_errors_total", "op" => name, "kind" => e.kind())
                    .increment(1);
                self.outage.failure(name, e);
                self.breaker.failure();
            }
        }
        metrics::gauge!("dsvl_cache_breaker_state").set(self.breaker.state().as_gauge());
        result
    }
}

impl EmbeddingCache for RedisCache {
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>> {
        Box::pin(async move {
            let cmd = redis::cmd("GET").arg(key).clone();
            let v: Option<Vec<u8>> =
                self.run("get", |c| async move { c.query(&cmd).await }).await?;
            Ok(v.map(Bytes::from))
        })
    }

    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            let cmd = redis::cmd("SET").arg(key).arg(value.as_ref()).arg("PX").arg(ms).clone();
            let _: () = self.run("put", |c| async move { c.query(&cmd).await }).await?;
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn try_lease<'a>(
        &'a self,
        lease: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            let cmd = redis::cmd("SET").arg(lease).arg(token).arg("NX").arg("PX").arg(ms).clone();
            let r: Option<String> =
                self.run("lease", |c| async move { c.query(&cmd).await }).await?;
            Ok(r.is_some())
        })
    }

    fn release_lease<'a>(
        &'a self,
        lease: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let cmd = redis::cmd("EVAL").arg(RELEASE_SCRIPT).arg(1).arg(lease).arg(token).clone();
            let _: i64 = self.run("release", |c| async move { c.query(&cmd).await }).await?;
            Ok(())
        })
    }
}
