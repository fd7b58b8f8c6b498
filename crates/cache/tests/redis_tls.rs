//! Redis over TLS against a real `redis-server` with `tls-auth-clients yes`: the cache works
//! with the right authority and client certificate, fails (as misses) without them, and picks
//! up rotated certificate files without a restart.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use dsvl_cache::{BreakerConfig, EmbeddingCache, RedisCache, RedisConfig, RedisTls};
use dsvl_testkit::RedisServer;
use dsvl_tls::DevCa;

fn cache(url: &str, tls: RedisTls) -> Result<RedisCache> {
    Ok(RedisCache::new(RedisConfig {
        tls,
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        breaker: BreakerConfig { failure_threshold: 1000, open_for: Duration::from_millis(1) },
        ..RedisConfig::new(url)
    })?)
}

async fn round_trip(cache: &RedisCache, key: &str) -> Result<()> {
    cache.put(key, Bytes::from_static(b"value"), Duration::from_secs(30)).await?;
    anyhow::ensure!(cache.get(key).await?.as_deref() == Some(&b"value"[..]), "read back");
    Ok(())
}

#[tokio::test]
async fn tls_with_client_certificates_and_rotation() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let ca = DevCa::new("redis test CA")?;
    let server = ca.write_leaf(&dir.path().join("server"), "redis", &["127.0.0.1"])?;
    let client = ca.write_leaf(&dir.path().join("client"), "client", &["dsvl-vision"])?;
    let redis = RedisServer::start_tls(&server.cert, &server.key, &server.ca)?;
    let url = redis.tls_url().expect("a TLS port");
    let good = RedisTls {
        ca: Some(client.ca.clone()),
        identity: Some((client.cert.clone(), client.key.clone())),
    };
    let cache_ok = cache(&url, good.clone())?;
    round_trip(&cache_ok, "dsvl:emb:v2:tls").await?;

    // Redis demands a client certificate.
    let anonymous = cache(&url, RedisTls { ca: Some(client.ca.clone()), identity: None })?;
    assert!(anonymous.get("dsvl:emb:v2:tls").await.is_err(), "no client certificate");
    // The server must chain to the configured authority, not just any.
    let other = DevCa::new("another CA")?.write_leaf(&dir.path().join("other"), "x", &["a"])?;
    let wrong_trust = cache(&url, RedisTls { ca: Some(other.ca.clone()), ..good.clone() })?;
    assert!(wrong_trust.get("dsvl:emb:v2:tls").await.is_err(), "untrusted server");
    // Plain text to the TLS port is no connection at all.
    let plain = cache(&url.replacen("rediss://", "redis://", 1), RedisTls::default())?;
    assert!(plain.get("dsvl:emb:v2:tls").await.is_err(), "plain text to the TLS port");

    // Rotation: the files are re-read when they change. A certificate Redis does not trust
    // makes the next connection fail (so the new files are really used), then a good one
    // brings the cache back, all without a new client.
    std::fs::copy(&other.cert, &client.cert)?;
    std::fs::copy(&other.key, &client.key)?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert!(cache_ok.get("dsvl:emb:v2:tls").await.is_err(), "rotated to an untrusted cert");
    let renewed = ca.write_leaf(&dir.path().join("renewed"), "client", &["dsvl-vision"])?;
    std::fs::copy(&renewed.cert, &client.cert)?;
    std::fs::copy(&renewed.key, &client.key)?;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    round_trip(&cache_ok, "dsvl:emb:v2:tls2").await?;
    Ok(())
}
