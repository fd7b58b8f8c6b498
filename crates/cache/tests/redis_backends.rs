//! The Redis tier against real servers: a single node (values, TTL, leases, outage and
//! recovery through the breaker) and a three-master Redis Cluster.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use dsvl_cache::{BreakerConfig, BreakerState, CacheError, EmbeddingCache, RedisCache, RedisConfig};
use dsvl_testkit::{RedisCluster, RedisServer};

fn config(url: String) -> RedisConfig {
    RedisConfig {
        url,
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
        breaker: BreakerConfig { failure_threshold: 2, open_for: Duration::from_millis(300) },
    }
}

async fn exercise(cache: &RedisCache) -> Result<()> {
    for i in 0..20 {
        let key = format!("dsvl:emb:v1:test{i}");
        assert_eq!(cache.get(&key).await?, None);
        cache.put(&key, Bytes::from(vec![i as u8; 1000 + i]), Duration::from_secs(30)).await?;
        assert_eq!(cache.get(&key).await?.map(|b| b.len()), Some(1000 + i));
    }
    assert!(cache.try_lease("dsvl:lease:v1:x", "me", Duration::from_secs(5)).await?);
    assert!(!cache.try_lease("dsvl:lease:v1:x", "you", Duration::from_secs(5)).await?, "lease is exclusive");
    cache.release_lease("dsvl:lease:v1:x", "you").await?; // not the holder: no effect
    assert!(!cache.try_lease("dsvl:lease:v1:x", "you", Duration::from_secs(5)).await?);
    cache.release_lease("dsvl:lease:v1:x", "me").await?;
    assert!(cache.try_lease("dsvl:lease:v1:x", "you", Duration::from_secs(5)).await?);
    Ok(())
}

#[tokio::test]
async fn single_node_values_ttl_and_leases() -> Result<()> {
    let redis = RedisServer::start()?;
    let cache = RedisCache::new(config(redis.url()))?;
    exercise(&cache).await?;
    cache.put("dsvl:emb:v1:short", Bytes::from_static(b"v"), Duration::from_millis(100)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cache.get("dsvl:emb:v1:short").await?, None, "TTL expired");
    Ok(())
}

/// Down: errors (never hangs past the timeouts), then the breaker opens and calls return at
/// once; back up: the breaker probes and closes.
#[tokio::test]
async fn outage_opens_the_breaker_and_recovery_closes_it() -> Result<()> {
    let mut redis = RedisServer::start()?;
    let cache = RedisCache::new(config(redis.url()))?;
    cache.put("dsvl:emb:v1:a", Bytes::from_static(b"1"), Duration::from_secs(30)).await?;
    redis.kill();
    for _ in 0..2 {
        let t = Instant::now();
        assert!(cache.get("dsvl:emb:v1:a").await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "bounded by the timeouts");
    }
    assert_eq!(cache.breaker().state(), BreakerState::Open);
    let t = Instant::now();
    assert!(matches!(cache.get("dsvl:emb:v1:a").await, Err(CacheError::BreakerOpen)));
    assert!(t.elapsed() < Duration::from_millis(50), "an open breaker does not touch the network");
    redis.restart()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.get("dsvl:emb:v1:a").await.is_err() {
        anyhow::ensure!(Instant::now() < deadline, "never recovered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cache.breaker().state(), BreakerState::Closed);
    Ok(())
}

#[tokio::test]
async fn redis_cluster_url_works() -> Result<()> {
    let cluster = RedisCluster::start()?;
    let cache = RedisCache::new(config(cluster.url()))?;
    exercise(&cache).await?;
    // Keys spread over the masters.
    let spread = cluster.nodes.iter().filter(|n| n.dbsize().unwrap_or(0) > 0).count();
    assert!(spread >= 2, "keys landed on {spread} node(s)");
    Ok(())
}
