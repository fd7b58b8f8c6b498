//! Redis as the shared tier: one node through a `ConnectionManager` (reconnects in the
//! background) or a Redis Cluster (`redis+cluster://host:port[,host:port...]`), each with
//! connect and response timeouts, behind a [`CircuitBreaker`]. Connecting is lazy, so a
//! service starts (and serves, uncached) while Redis is down.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use tokio::sync::Mutex;

use crate::breaker::{BreakerConfig, CircuitBreaker};
use crate::{CacheError, EmbeddingCache};

/// Connection settings.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://host:port[/db]`, or `redis+cluster://host:port[,host:port...]` for a cluster.
    pub url: String,
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
}

/// The Redis tier.
pub struct RedisCache {
    config: RedisConfig,
    conn: Mutex<Option<Conn>>,
    breaker: Arc<CircuitBreaker>,
}

const RELEASE_SCRIPT: &str = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) else return 0 end";

impl RedisCache {
    /// A cache for `config` (no connection is made yet).
    ///
    /// # Errors
    /// A malformed URL.
    pub fn new(config: RedisConfig) -> Result<Self, CacheError> {
        if !(config.url.starts_with("redis://") || config.url.starts_with("rediss://") || config.url.starts_with("redis+cluster://")) {
            return Err(CacheError::Config(format!("unsupported Redis URL `{}`", config.url)));
        }
        let breaker = Arc::new(CircuitBreaker::new(config.breaker));
        Ok(Self { config, conn: Mutex::new(None), breaker })
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
        let n: u64 = self.run(redis::cmd("EXISTS").arg(key).clone()).await?;
        Ok(n > 0)
    }

    async fn connect(&self) -> redis::RedisResult<Conn> {
        let c = &self.config;
        if let Some(nodes) = c.url.strip_prefix("redis+cluster://") {
            let nodes: Vec<String> = nodes.split(',').map(|n| format!("redis://{n}")).collect();
            let client = redis::cluster::ClusterClientBuilder::new(nodes)
                .connection_timeout(c.connect_timeout)
                .response_timeout(c.response_timeout)
                .build()?;
            Ok(Conn::Cluster(client.get_async_connection().await?))
        } else {
            let client = redis::Client::open(c.url.as_str())?;
            let cfg = ConnectionManagerConfig::new()
                .set_connection_timeout(Some(c.connect_timeout))
                .set_response_timeout(Some(c.response_timeout))
                .set_number_of_retries(1);
            Ok(Conn::Single(ConnectionManager::new_with_config(client, cfg).await?))
        }
    }

    /// Runs `cmd` through the breaker, connecting first if needed.
    async fn run<T: redis::FromRedisValue>(&self, cmd: redis::Cmd) -> Result<T, CacheError> {
        if !self.breaker.allow() {
            metrics::gauge!("dsvl_cache_breaker_state").set(self.breaker.state().as_gauge());
            return Err(CacheError::BreakerOpen);
        }
        let conn = {
            let mut guard = self.conn.lock().await;
            match guard.as_ref() {
                Some(c) => Ok(c.clone()),
                None => match tokio::time::timeout(self.config.connect_timeout * 2, self.connect()).await {
                    Ok(Ok(c)) => {
                        *guard = Some(c.clone());
                        Ok(c)
                    }
                    Ok(Err(e)) => Err(CacheError::Redis(e)),
                    Err(_) => Err(CacheError::Redis(redis::RedisError::from(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        "connect timed out",
                    )))),
                },
            }
        };
        let result = match conn {
            Ok(c) => match tokio::time::timeout(self.config.response_timeout * 2, c.query::<T>(&cmd)).await {
                Ok(r) => r.map_err(CacheError::Redis),
                Err(_) => Err(CacheError::Redis(redis::RedisError::from(std::io::Error::new(std::io::ErrorKind::TimedOut, "response timed out")))),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(_) => self.breaker.success(),
            Err(e) => {
                tracing::debug!(error = %e, "redis call failed");
                metrics::counter!("dsvl_cache_errors_total", "kind" => e.kind()).increment(1);
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
            let v: Option<Vec<u8>> = self.run(redis::cmd("GET").arg(key).clone()).await?;
            Ok(v.map(Bytes::from))
        })
    }

    fn put<'a>(&'a self, key: &'a str, value: Bytes, ttl: Duration) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            let _: () = self.run(redis::cmd("SET").arg(key).arg(value.as_ref()).arg("PX").arg(ms).clone()).await?;
            Ok(())
        })
    }

    fn is_shared(&self) -> bool {
        true
    }

    fn try_lease<'a>(&'a self, lease: &'a str, token: &'a str, ttl: Duration) -> BoxFuture<'a, Result<bool, CacheError>> {
        Box::pin(async move {
            let ms = ttl.as_millis().max(1) as u64;
            let r: Option<String> = self.run(redis::cmd("SET").arg(lease).arg(token).arg("NX").arg("PX").arg(ms).clone()).await?;
            Ok(r.is_some())
        })
    }

    fn release_lease<'a>(&'a self, lease: &'a str, token: &'a str) -> BoxFuture<'a, Result<(), CacheError>> {
        Box::pin(async move {
            let _: i64 = self.run(redis::cmd("EVAL").arg(RELEASE_SCRIPT).arg(1).arg(lease).arg(token).clone()).await?;
            Ok(())
        })
    }
}
