//! The per-tier Redis users ([`dsvl_cache::acl`]) against a real `redis-server`: each tier can
//! do exactly its job (the calls it makes through [`RedisCache`], the gateway's quota script)
//! and is refused the rest: the decoder cannot write or lease, the gateway cannot read or write
//! embeddings (directly or from a Lua script), the vision tier cannot touch quotas, nobody can
//! flush, list keys or reconfigure the server, and the default user is off.

use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use dsvl_cache::acl::{users_acl, TierUser, QUOTA_PREFIX};
use dsvl_cache::{BreakerConfig, EmbeddingCache, RedisCache, RedisConfig};
use dsvl_testkit::RedisServer;

const EMB: &str = "dsvl:emb:v2:acl-test";
const LEASE: &str = "dsvl:lease:v2:acl-test";

fn url(redis: &RedisServer, tier: TierUser) -> String {
    redis.url().replacen("redis://", &format!("redis://{}:pw-{}@", tier.name(), tier.name()), 1)
}

/// A fresh cache client for `tier` (a breaker that never opens, so refusals stay visible).
fn cache(redis: &RedisServer, tier: TierUser) -> Result<RedisCache> {
    Ok(RedisCache::new(RedisConfig {
        url: url(redis, tier),
        tls: Default::default(),
        connect_timeout: Duration::from_secs(2),
        response_timeout: Duration::from_secs(2),
        breaker: BreakerConfig { failure_threshold: 1000, open_for: Duration::from_millis(1) },
    })?)
}

/// One raw command as `tier`: Ok(reply) or the server's error text.
async fn raw(redis: &RedisServer, tier: TierUser, args: &[&str]) -> Result<redis::Value, String> {
    let client = redis::Client::open(url(redis, tier)).map_err(|e| e.to_string())?;
    let mut conn = client.get_multiplexed_async_connection().await.map_err(|e| e.to_string())?;
    let mut cmd = redis::cmd(args[0]);
    for a in &args[1..] {
        cmd.arg(*a);
    }
    cmd.query_async(&mut conn).await.map_err(|e| e.to_string())
}

fn denied(r: Result<redis::Value, String>, what: &str) {
    match r {
        Err(e) => assert!(
            e.contains("NOPERM") || e.contains("permission") || e.contains("can't run"),
            "{what}: {e}"
        ),
        Ok(v) => panic!("{what} was allowed: {v:?}"),
    }
}

/// The quota scripts' calls (TIME, HMGET, HSET, PEXPIRE) on `key`.
const QUOTA_SCRIPT: &str = "local t = redis.call('TIME') \
    local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts') \
    redis.call('HSET', KEYS[1], 'tokens', '1', 'ts', t[1]) \
    redis.call('PEXPIRE', KEYS[1], 60000) return 1";

#[tokio::test]
async fn each_tier_can_do_its_job_and_nothing_else() -> Result<()> {
    let redis = RedisServer::start()?;
    // The users as `users.acl` writes them (the default user stays on here for the harness).
    let acl = users_acl("pw-dsvl-gateway", "pw-dsvl-vision", "pw-dsvl-decoder");
    assert!(acl.starts_with("user default off\n"), "{acl}");
    for line in acl.lines().skip(1) {
        let reply = redis.command(&line.replacen("user ", "ACL SETUSER ", 1))?;
        assert!(reply.starts_with("+OK"), "{line}: {reply}");
    }
    use TierUser::{Decoder, Gateway, Vision};

    // Vision: writes, reads, leases.
    let vision = cache(&redis, Vision)?;
    vision.put(EMB, Bytes::from_static(b"value"), Duration::from_secs(60)).await?;
    assert_eq!(vision.get(EMB).await?.as_deref(), Some(&b"value"[..]));
    assert!(vision.try_lease(LEASE, "me", Duration::from_secs(5)).await?);
    vision.release_lease(LEASE, "me").await?;
    assert_eq!(vision.get_many(&[EMB]).await?.len(), 1);
    denied(
        raw(&redis, Vision, &["EVAL", QUOTA_SCRIPT, "1", &format!("{QUOTA_PREFIX}x")]).await,
        "vision quota",
    );

    // Decoder: reads only.
    let decoder = cache(&redis, Decoder)?;
    assert_eq!(decoder.get(EMB).await?.as_deref(), Some(&b"value"[..]));
    assert_eq!(decoder.get_many(&[EMB, "dsvl:emb:v2:absent"]).await?.len(), 2);
    assert!(decoder
        .put(EMB, Bytes::from_static(b"forged"), Duration::from_secs(60))
        .await
        .is_err());
    assert!(decoder.try_lease(LEASE, "me", Duration::from_secs(5)).await.is_err());
    denied(raw(&redis, Decoder, &["DEL", EMB]).await, "decoder DEL");

    // Gateway: existence and quotas, never the embeddings themselves.
    let gateway = cache(&redis, Gateway)?;
    assert!(gateway.exists(EMB).await?);
    assert_eq!(gateway.exists_many(&[EMB, "dsvl:emb:v2:absent"]).await?, [true, false]);
    let quota_key = format!("{QUOTA_PREFIX}{{tenant}}:tokens");
    let took: i64 = gateway.eval(QUOTA_SCRIPT, &[quota_key], &[]).await?;
    assert_eq!(took, 1);
    assert!(gateway.get(EMB).await.is_err(), "the gateway read an embedding");
    denied(raw(&redis, Gateway, &["SET", EMB, "forged"]).await, "gateway SET");
    let poison = "redis.call('SET', KEYS[1], 'forged') return 1";
    denied(raw(&redis, Gateway, &["EVAL", poison, "1", EMB]).await, "gateway script SET");
    let sneaky = "return redis.call('GET', 'dsvl:emb:v2:acl-test')";
    denied(raw(&redis, Gateway, &["EVAL", sneaky, "0"]).await, "gateway script GET");

    // Nobody administers the server.
    for tier in TierUser::ALL {
        denied(raw(&redis, tier, &["FLUSHALL"]).await, "FLUSHALL");
        denied(raw(&redis, tier, &["KEYS", "*"]).await, "KEYS");
        denied(raw(&redis, tier, &["CONFIG", "GET", "*"]).await, "CONFIG");
        denied(raw(&redis, tier, &["ACL", "LIST"]).await, "ACL");
    }
    assert_eq!(vision.get(EMB).await?.as_deref(), Some(&b"value"[..]), "nothing was forged");
    Ok(())
}
