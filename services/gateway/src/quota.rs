//! Tenant quotas shared by every gateway replica: token buckets in Redis, taken and refilled by
//! Lua scripts so that a check-and-charge is one atomic step however many replicas race for the
//! same tenant (N replicas give the tenant its quota once, not N times).
//!
//! A request is charged its images and prompt + `n` x `max_new_tokens` tokens up front (it may
//! use them all); when it ends, the output tokens it did not generate are credited back
//! ([`SharedBuckets::credit`]). While Redis is unreachable the gateway falls back to its local
//! buckets ([`crate::tenancy::Tenancy::admit`]) and counts it
//! (`dsvl_gateway_quota_fallbacks_total`), so an outage degrades quotas to per replica instead
//! of refusing traffic.
//!
//! A tenant's buckets live in one hash slot (`dsvl:quota:{<tenant digest>}:<what>`), so the
//! scripts also run on a Redis Cluster.

use std::sync::Arc;

use dsvl_cache::{CacheError, RedisCache};

use crate::tenancy::{Limits, Refusal};

/// Refill to capacity, then take every amount if every bucket has it (else take nothing and
/// answer the first short bucket and the seconds until it would have enough).
/// ARGV: per bucket `capacity, rate per second, amount`, then the key lifetime in ms.
const TAKE: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local level = {}
for i = 1, #KEYS do
  local cap, rate, amount = tonumber(ARGV[3*i-2]), tonumber(ARGV[3*i-1]), tonumber(ARGV[3*i])
  local v = redis.call('HMGET', KEYS[i], 'tokens', 'ts')
  local tokens = tonumber(v[1]) or cap
  local ts = tonumber(v[2]) or now
  tokens = math.min(cap, tokens + math.max(0, now - ts) * rate)
  if tokens < amount then
    return {i, tostring((amount - tokens) / rate)}
  end
  level[i] = tokens - amount
end
for i = 1, #KEYS do
  redis.call('HSET', KEYS[i], 'tokens', tostring(level[i]), 'ts', tostring(now))
  redis.call('PEXPIRE', KEYS[i], ARGV[3*#KEYS+1])
end
return {0, '0'}
";

/// Gives `amount` back to one bucket (never above its capacity).
/// ARGV: capacity, rate per second, amount, key lifetime in ms.
const CREDIT: &str = r"
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local cap, rate, amount = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local v = redis.call('HMGET', KEYS[1], 'tokens', 'ts')
local tokens = tonumber(v[1]) or cap
local ts = tonumber(v[2]) or now
tokens = math.min(cap, tokens + math.max(0, now - ts) * rate + amount)
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'ts', tostring(now))
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
";

/// The buckets in Redis.
pub struct SharedBuckets {
    redis: Arc<RedisCache>,
}

fn key(tenant: &str, what: &str) -> String {
    let digest = blake3::hash(tenant.as_bytes()).to_hex();
    format!("{}{{{}}}:{what}", dsvl_cache::acl::QUOTA_PREFIX, &digest[..32])
}

/// A bucket's script arguments: capacity and rate from a per-minute limit.
fn bucket(per_minute: u32, amount: f64) -> [String; 3] {
    let cap = f64::from(per_minute);
    [cap.to_string(), (cap / 60.0).to_string(), amount.to_string()]
}

/// Buckets refill completely within a minute: a key idle for two is at capacity anyway.
const KEY_LIFETIME_MS: &str = "120000";

impl SharedBuckets {
    /// Buckets in `redis`.
    pub fn new(redis: Arc<RedisCache>) -> Self {
        Self { redis }
    }

    /// Charges one request, `images` and `tokens` to `tenant` under `limits`, all or nothing.
    ///
    /// # Errors
    /// Redis could not be asked (the caller falls back to local buckets); the inner result is
    /// the quota decision.
    pub async fn admit(
        &self,
        tenant: &str,
        limits: Limits,
        images: usize,
        tokens: usize,
    ) -> Result<Result<(), Refusal>, CacheError> {
        let wanted = [
            ("requests", limits.rpm, 1.0),
            ("images", limits.ipm, images as f64),
            ("tokens", limits.tpm, tokens as f64),
        ];
        let active: Vec<_> = wanted.iter().filter(|(_, pm, a)| *pm > 0 && *a > 0.0).collect();
        if active.is_empty() {
            return Ok(Ok(()));
        }
        let keys: Vec<String> = active.iter().map(|(w, _, _)| key(tenant, w)).collect();
        let mut args: Vec<String> = active.iter().flat_map(|(_, pm, a)| bucket(*pm, *a)).collect();
        args.push(KEY_LIFETIME_MS.into());
        let (short, retry_after): (usize, String) = self.redis.eval(TAKE, &keys, &args).await?;
        Ok(match short {
            0 => Ok(()),
            i => Err(Refusal::Quota {
                what: active.get(i - 1).map_or("requests", |(w, _, _)| *w),
                // A hint from Redis is data: only a finite, sane number of seconds is used.
                retry_after: retry_after
                    .parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite())
                    .map_or(1.0, |s| s.clamp(0.0, 3600.0)),
            }),
        })
    }

    /// Credits `tokens` back to `tenant`'s token bucket (output it was charged for but did not
    /// generate).
    ///
    /// # Errors
    /// Redis could not be asked.
    pub async fn credit(
        &self,
        tenant: &str,
        limits: Limits,
        tokens: usize,
    ) -> Result<(), CacheError> {
        if limits.tpm == 0 || tokens == 0 {
            return Ok(());
        }
        let mut args = bucket(limits.tpm, tokens as f64).to_vec();
        args.push(KEY_LIFETIME_MS.into());
        let _: i64 = self.redis.eval(CREDIT, &[key(tenant, "tokens")], &args).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    //! Against a real `redis-server`: two gateways' buckets are one, refusals charge nothing,
    //! credits come back, and a dead Redis is an error the caller can fall back on.

    use dsvl_cache::RedisConfig;
    use dsvl_testkit::RedisServer;

    use super::*;

    fn replica(url: &str) -> SharedBuckets {
        SharedBuckets::new(Arc::new(RedisCache::new(RedisConfig::new(url)).expect("url")))
    }

    #[tokio::test]
    async fn replicas_share_one_bucket_per_tenant() -> anyhow::Result<()> {
        let redis = RedisServer::start()?;
        let (a, b) = (replica(&redis.url()), replica(&redis.url()));
        let limits = Limits { rpm: 4, ipm: 0, tpm: 100 };
        // Four requests across two replicas use the tenant's four; the fifth is refused on
        // either, with a retry hint of about 15 s (one request refills in 60 / 4 s).
        for (i, r) in [&a, &b, &a, &b].iter().enumerate() {
            assert_eq!(r.admit("acme", limits, 0, 10).await?, Ok(()), "request {i}");
        }
        match b.admit("acme", limits, 0, 10).await? {
            Err(Refusal::Quota { what: "requests", retry_after }) => {
                assert!(retry_after > 10.0 && retry_after <= 15.0, "{retry_after}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(a.admit("globex", limits, 0, 10).await?, Ok(()), "tenants are separate");

        // Tokens: after 40 of 100, a request for 70 is refused and charges nothing (not even
        // its request); a credit of 30 (output not generated) makes room for it.
        let limits = Limits { rpm: 2, ipm: 0, tpm: 100 };
        assert_eq!(a.admit("initech", limits, 0, 40).await?, Ok(()));
        let refused = b.admit("initech", limits, 0, 70).await?;
        assert!(matches!(refused, Err(Refusal::Quota { what: "tokens", .. })), "{refused:?}");
        a.credit("initech", limits, 30).await?;
        assert_eq!(b.admit("initech", limits, 0, 70).await?, Ok(()), "the request was not charged");

        // Redis gone: an error, for the caller to fall back on.
        drop(redis);
        assert!(a.admit("acme", limits, 0, 1).await.is_err());
        Ok(())
    }
}
