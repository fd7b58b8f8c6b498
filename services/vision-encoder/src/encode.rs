//! From image bytes to a stored embedding: cache lookup (local, then shared), in-process single
//! flight, the cross-replica lease, preprocessing on the blocking pool, the batcher, and the
//! write-back to both cache tiers.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsvl_cache::{EmbeddingCache, MemoryCache, RedisCache, SingleFlight};
use dsvl_core::cache_key::lease_key;
use dsvl_core::codec::{self, EmbeddingDType, EmbeddingHeader};
use dsvl_models::preprocess::Preprocessor;
use tokio::sync::oneshot;

use crate::batcher::{Batcher, Job, JobError};

/// An embedding as stored (encoded value) plus where its payload starts.
#[derive(Debug)]
pub struct Stored {
    /// The encoded value (header + payload), as in the cache.
    pub value: Bytes,
    /// The decoded header.
    pub header: EmbeddingHeader,
    /// Offset of the payload in `value`.
    pub payload_at: usize,
}

impl Stored {
    /// Verifies `value` and keeps it.
    pub fn parse(value: Bytes) -> Result<Self, codec::CodecError> {
        let (header, payload) = codec::decode(&value)?;
        let payload_at = value.len() - payload.len();
        Ok(Self { header, payload_at, value })
    }

    /// The tensor bytes.
    pub fn payload(&self) -> &[u8] {
        &self.value[self.payload_at..]
    }
}

/// Why one image could not be encoded.
#[derive(Debug, Clone)]
pub enum Failure {
    /// The image itself is bad (undecodable, too large, digest mismatch).
    Image(String),
    /// The batch queue is full.
    QueueFull,
    /// The request's deadline passed.
    Deadline,
    /// The model failed.
    Internal(String),
}

/// Outcome of one image.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The embedding.
    pub stored: Arc<Stored>,
    /// Whether it came from a cache rather than this request's encode.
    pub cache_hit: bool,
}

/// What the pipeline expects stored values to look like.
#[derive(Debug, Clone)]
pub struct Expected {
    /// This replica's model fingerprint.
    pub fingerprint: String,
    /// Element type.
    pub dtype: EmbeddingDType,
    /// `[tokens, hidden]`.
    pub shape: Vec<u32>,
}

/// Everything needed to turn bytes into embeddings; shared by all requests.
pub struct Pipeline {
    /// Model thread (shared by pipelines over the same model).
    pub batcher: Arc<Batcher>,
    /// Decoder + preprocessing.
    pub preprocessor: Preprocessor,
    /// Expected header of stored values.
    pub expected: Expected,
    /// First tier.
    pub local: Arc<MemoryCache>,
    /// Shared tier.
    pub shared: Option<Arc<RedisCache>>,
    /// In-process deduplication.
    pub flights: SingleFlight<String, Result<Outcome, Failure>>,
    /// Entry lifetime.
    pub ttl: Duration,
    /// Cross-replica lease lifetime.
    pub lease: Duration,
}

fn cache_metric(tier: &'static str, outcome: &'static str) {
    metrics::counter!("dsvl_vision_cache_requests_total", "tier" => tier, "outcome" => outcome).increment(1);
}

impl Pipeline {
    fn check(&self, value: Bytes, tier: &'static str) -> Option<Arc<Stored>> {
        match Stored::parse(value) {
            Ok(s) if s.header.model_fingerprint == self.expected.fingerprint
                && s.header.dtype == self.expected.dtype
                && s.header.shape == self.expected.shape =>
            {
                Some(Arc::new(s))
            }
            Ok(_) => {
                cache_metric(tier, "mismatch");
                None
            }
            Err(e) => {
                tracing::warn!(tier, error = %e, "corrupt cache value ignored");
                cache_metric(tier, "corrupt");
                None
            }
        }
    }

    /// Local, then shared lookup; filling the local tier on a shared hit.
    pub async fn lookup(&self, key: &str) -> Option<Arc<Stored>> {
        if let Ok(Some(v)) = self.local.get(key).await {
            if let Some(s) = self.check(v, "local") {
                cache_metric("local", "hit");
                return Some(s);
            }
        } else {
            cache_metric("local", "miss");
        }
        let shared = self.shared.as_ref()?;
        match shared.get(key).await {
            Ok(Some(v)) => {
                let s = self.check(v, "shared")?;
                cache_metric("shared", "hit");
                let _ = self.local.put(key, s.value.clone(), self.ttl).await;
                Some(s)
            }
            Ok(None) => {
                cache_metric("shared", "miss");
                None
            }
            Err(_) => {
                cache_metric("shared", "error");
                None
            }
        }
    }

    /// The embedding of `image` under `key`: from a cache, from a concurrent computation of
    /// the same key (here or, through the lease, on another replica), or encoded now.
    pub async fn embed(self: &Arc<Self>, key: String, image: Bytes, deadline: Option<Instant>) -> Result<Outcome, Failure> {
        if let Some(stored) = self.lookup(&key).await {
            return Ok(Outcome { stored, cache_hit: true });
        }
        let me = self.clone();
        let k = key.clone();
        let (result, led) = self.flights.run(key, || async move { me.compute(k, image, deadline).await }).await;
        if !led {
            metrics::counter!("dsvl_vision_single_flight_waits_total").increment(1);
            return result.map(|o| Outcome { cache_hit: true, ..o });
        }
        result
    }

    async fn compute(&self, key: String, image: Bytes, deadline: Option<Instant>) -> Result<Outcome, Failure> {
        let Some(shared) = &self.shared else {
            return self.encode_and_store(&key, image, deadline).await.map(|stored| Outcome { stored, cache_hit: false });
        };
        let lease = lease_key(&key);
        let token = format!("{}-{:x}", std::process::id(), rand_token());
        loop {
            // A Redis error means nobody can coordinate: encode (fail open).
            let got = shared.try_lease(&lease, &token, self.lease).await.unwrap_or(true);
            if got {
                let r = self.encode_and_store(&key, image.clone(), deadline).await;
                let _ = shared.release_lease(&lease, &token).await;
                return r.map(|stored| Outcome { stored, cache_hit: false });
            }
            metrics::counter!("dsvl_vision_lease_waits_total").increment(1);
            let until = Instant::now() + self.lease;
            while Instant::now() < until {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Failure::Deadline);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                if let Ok(Some(v)) = shared.get(&key).await {
                    if let Some(stored) = self.check(v, "shared") {
                        let _ = self.local.put(&key, stored.value.clone(), self.ttl).await;
                        return Ok(Outcome { stored, cache_hit: true });
                    }
                }
            }
            // The holder did not deliver within its lease (it died): try to take over.
        }
    }

    async fn encode_and_store(&self, key: &str, image: Bytes, deadline: Option<Instant>) -> Result<Arc<Stored>, Failure> {
        let pre = self.preprocessor.clone();
        let pixels = tokio::task::spawn_blocking(move || pre.preprocess_bytes(&image))
            .await
            .map_err(|e| Failure::Internal(format!("preprocessing task: {e}")))?
            .map_err(|e| Failure::Image(e.to_string()))?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Failure::Deadline);
        }
        let (tx, rx) = oneshot::channel();
        self.batcher.submit(Job { pixels, deadline, reply: tx }).map_err(|_| Failure::QueueFull)?;
        let payload = match rx.await {
            Ok(Ok(p)) => p,
            Ok(Err(JobError::DeadlineExceeded)) => return Err(Failure::Deadline),
            Ok(Err(JobError::Model(e))) => return Err(Failure::Internal(e)),
            Err(_) => return Err(Failure::Internal("the model thread stopped".into())),
        };
        let header = EmbeddingHeader {
            dtype: self.expected.dtype,
            shape: self.expected.shape.clone(),
            model_fingerprint: self.expected.fingerprint.clone(),
        };
        let value = Bytes::from(codec::encode(&header, &payload));
        let _ = self.local.put(key, value.clone(), self.ttl).await;
        if let Some(shared) = &self.shared {
            if shared.put(key, value.clone(), self.ttl).await.is_err() {
                cache_metric("shared", "write_error");
            }
        }
        let payload_at = value.len() - payload.len();
        Ok(Arc::new(Stored { value, header, payload_at }))
    }
}

/// A random-enough lease token (collision only matters between concurrent holders).
fn rand_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0));
    h.finish()
}
