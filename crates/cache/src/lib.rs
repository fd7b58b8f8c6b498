//! The cluster-wide embedding cache.
//!
//! * [`EmbeddingCache`]: get / put with TTL, plus short leases for cross-replica single flight.
//! * [`MemoryCache`]: an in-process LRU bounded in bytes (the default without Redis, and the
//!   first tier in front of Redis).
//! * [`RedisCache`]: redis-rs async through a `ConnectionManager` (single node) or a cluster
//!   connection, with connect and response timeouts and a [`CircuitBreaker`]: every Redis error
//!   is a miss for the caller and a metric, never a failed request.
//! * [`link`]: TLS to Redis (`rediss://`), plain text only with `--insecure`.
//! * [`SingleFlight`]: concurrent requests for one key in a process share one computation.
//!
//! Values are opaque bytes here; their format and verification live in `dsvl_core::codec`.
#![deny(missing_docs)]

pub mod acl;
mod breaker;
pub mod link;
mod memory;
pub mod outage;
mod redis_cache;
mod singleflight;

use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;

pub use breaker::{BreakerConfig, BreakerState, CircuitBreaker};
pub use link::{check_link, redis_link, RedisTls};
pub use memory::MemoryCache;
pub use redis_cache::{RedisCache, RedisConfig};
pub use singleflight::SingleFlight;

/// Why a cache operation did not complete. Callers treat every variant as a miss.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// Redis failed or timed out.
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    /// The breaker is open after repeated failures; Redis is not being asked.
    #[error("cache unavailable (circuit open)")]
    BreakerOpen,
    /// Bad configuration (URL).
    #[error("cache configuration: {0}")]
    Config(String),
}

impl CacheError {
    /// Low-cardinality label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Redis(e) if e.is_timeout() => "timeout",
            Self::Redis(e)
                if e.is_connection_dropped() || e.is_connection_refusal() || e.is_io_error() =>
            {
                "connection"
            }
            Self::Redis(_) => "redis",
            Self::BreakerOpen => "breaker_open",
            Self::Config(_) => "config",
        }
    }
}

/// A key-value store for encoded embeddings.
pub trait EmbeddingCache: Send + Sync {
    /// The value under `key`, if present.
    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, CacheError>>;
    /// Stores `value` under `key` for `ttl`.
    fn put<'a>(
        &'a self,
        key: &'a str,
        value: Bytes,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<(), CacheError>>;
    /// Whether other replicas see this cache's entries (then results can be returned by key).
    fn is_shared(&self) -> bool;
    /// Tries to take the lease `lease` for `ttl` with `token` (SET NX PX). Caches that are not
    /// shared always grant it.
    fn try_lease<'a>(
        &'a self,
        lease: &'a str,
        token: &'a str,
        ttl: Duration,
    ) -> BoxFuture<'a, Result<bool, CacheError>> {
        let _ = (lease, token, ttl);
        Box::pin(async { Ok(true) })
    }
    /// Releases a lease taken with `token` (no effect if it expired or another holder has it).
    fn release_lease<'a>(
        &'a self,
        lease: &'a str,
        token: &'a str,
    ) -> BoxFuture<'a, Result<(), CacheError>> {
        let _ = (lease, token);
        Box::pin(async { Ok(()) })
    }
}
