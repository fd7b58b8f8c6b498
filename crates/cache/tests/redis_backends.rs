//! The Redis tier against real servers: a single node (values, TTL, leases, outage and
//! recovery through the breaker) and a three-master Redis Cluster.

use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use dsvl_cache::{
    BreakerConfig, BreakerState, CacheError, EmbeddingCache, RedisCache, RedisConfig,
};
use dsvl_testkit::{RedisCluster, RedisServer};

fn config(url: String) -> RedisConfig {
    RedisConfig {
        url,
        tls: Default::default(),
        connect_timeout: Duration::from_millis(300),
        response_timeout: Duration::from_millis(300),
        breaker: BreakerConfig { failure_threshold: 2, open_for: Duration::from_millis(300) },
    }
}

async fn exercise(cache: &RedisCache) -> Result<()> {
    for i in 0..20 {
        let key = format!("dsvl:emb:v2:test{i}");
        assert_eq!(cache.get(&key).await?, None);
        cache.put(&key, Bytes::from(vec![i as u8; 1000 + i]), Duration::from_secs(30)).await?;
        assert_eq!(cache.get(&key).await?.map(|b| b.len()), Some(1000 + i));
    }
    assert!(cache.try_lease("dsvl:lease:v2:x", "me", Duration::from_secs(5)).await?);
    assert!(
        !cache.try_lease("dsvl:lease:v2:x", "you", Duration::from_secs(5)).await?,
        "lease is exclusive"
    );
    cache.release_lease("dsvl:lease:v2:x", "you").await?; // not the holder: no effect
    assert!(!cache.try_lease("dsvl:lease:v2:x", "you", Duration::from_secs(5)).await?);
    cache.release_lease("dsvl:lease:v2:x", "me").await?;
    assert!(cache.try_lease("dsvl:lease:v2:x", "you", Duration::from_secs(5)).await?);

    // Batched reads: one MGET / one EXISTS pipeline (split per slot on a cluster), in order,
    // with absent keys and duplicates.
    let keys: Vec<String> =
        [3, 999, 7, 3, 12].iter().map(|i| format!("dsvl:emb:v2:test{i}")).collect();
    let values = cache.get_many(&keys).await?;
    let lens: Vec<Option<usize>> = values.iter().map(|v| v.as_ref().map(Bytes::len)).collect();
    assert_eq!(lens, [Some(1003), None, Some(1007), Some(1003), Some(1012)]);
    assert_eq!(values[0].as_deref(), Some(&vec![3u8; 1003][..]));
    assert_eq!(cache.exists_many(&keys).await?, [true, false, true, true, true]);
    assert!(cache.get_many::<&str>(&[]).await?.is_empty());
    assert!(cache.exists_many::<&str>(&[]).await?.is_empty());
    Ok(())
}

/// A stalled server (SIGSTOP: connections open, no replies) costs each call at most the
/// response timeout, for single and batched calls, concurrent ones too; then the breaker opens;
/// after SIGCONT the same connection serves again.
#[tokio::test]
async fn stalled_server_costs_at_most_the_response_timeout() -> Result<()> {
    let redis = RedisServer::start()?;
    let cache = std::sync::Arc::new(RedisCache::new(RedisConfig {
        breaker: BreakerConfig { failure_threshold: 6, open_for: Duration::from_millis(300) },
        ..config(redis.url())
    })?);
    cache.put("dsvl:emb:v2:a", Bytes::from_static(b"1"), Duration::from_secs(30)).await?;
    let frozen = redis.freeze()?;
    // One response timeout (300 ms) plus slack for a loaded machine; three calls one after
    // another would take 900 ms.
    let bound = Duration::from_millis(300 + 400);
    let t = Instant::now();
    assert!(cache.get("dsvl:emb:v2:a").await.is_err());
    assert!(t.elapsed() < bound, "GET took {:?}", t.elapsed());
    let t = Instant::now();
    assert!(cache.get_many(&["dsvl:emb:v2:a", "dsvl:emb:v2:b"]).await.is_err());
    assert!(cache.exists_many(&["dsvl:emb:v2:a", "dsvl:emb:v2:b"]).await.is_err());
    assert!(t.elapsed() < bound * 2, "MGET + EXISTS took {:?}", t.elapsed());
    // Concurrent callers wait in parallel, not one after another.
    let t = Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|i| {
            let cache = cache.clone();
            tokio::spawn(async move {
                cache
                    .put(
                        &format!("dsvl:emb:v2:c{i}"),
                        Bytes::from_static(b"x"),
                        Duration::from_secs(30),
                    )
                    .await
            })
        })
        .collect();
    for c in calls {
        assert!(c.await?.is_err());
    }
    assert!(t.elapsed() < bound, "3 concurrent SETs took {:?}", t.elapsed());
    assert_eq!(cache.breaker().state(), BreakerState::Open);
    // A cache that has not connected yet: concurrent first calls share the connect timeout
    // instead of queueing behind each other's connection attempts.
    let fresh = std::sync::Arc::new(RedisCache::new(config(redis.url()))?);
    let t = Instant::now();
    let calls: Vec<_> = (0..3)
        .map(|_| {
            let fresh = fresh.clone();
            tokio::spawn(async move { fresh.get("dsvl:emb:v2:a").await })
        })
        .collect();
    for c in calls {
        assert!(c.await?.is_err());
    }
    assert!(t.elapsed() < bound, "3 concurrent first calls took {:?}", t.elapsed());
    drop(frozen);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(v) = cache.get_many(&["dsvl:emb:v2:a"]).await {
            assert_eq!(
                v,
                [Some(Bytes::from_static(b"1"))],
                "replies are matched to their commands after the stall"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "never recovered after SIGCONT");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(cache.breaker().state(), BreakerState::Closed);
    Ok(())
}

#[tokio::test]
async fn single_node_values_ttl_and_leases() -> Result<()> {
    let redis = RedisServer::start()?;
    let cache = RedisCache::new(config(redis.url()))?;
    exercise(&cache).await?;
    cache.put("dsvl:emb:v2:short", Bytes::from_static(b"v"), Duration::from_millis(100)).await?;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(cache.get("dsvl:emb:v2:short").await?, None, "TTL expired");
    Ok(())
}

/// Down: errors (never hangs past the timeouts), then the breaker opens and calls return at
/// once; back up: the breaker probes and closes.
#[tokio::test]
async fn outage_opens_the_breaker_and_recovery_closes_it() -> Result<()> {
    let mut redis = RedisServer::start()?;
    let cache = RedisCache::new(config(redis.url()))?;
    cache.put("dsvl:emb:v2:a", Bytes::from_static(b"1"), Duration::from_secs(30)).await?;
    redis.kill();
    for _ in 0..2 {
        let t = Instant::now();
        assert!(cache.get("dsvl:emb:v2:a").await.is_err());
        assert!(t.elapsed() < Duration::from_secs(2), "bounded by the timeouts");
    }
    assert_eq!(cache.breaker().state(), BreakerState::Open);
    let t = Instant::now();
    assert!(matches!(cache.get("dsvl:emb:v2:a").await, Err(CacheError::BreakerOpen)));
    assert!(t.elapsed() < Duration::from_millis(50), "an open breaker does not touch the network");
    redis.restart()?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while cache.get("dsvl:emb:v2:a").await.is_err() {
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
