//! From image bytes to a stored embedding: cache lookup (local, then shared), in-process single
//! flight, the cross-replica lease, preprocessing on the blocking pool, the batcher, and the
//! write-back to both cache tiers.
//!
//! Redis is never on the critical path for longer than one timeout: a request's images are
//! looked up in one `MGET`; when that (or the lease) fails, the image is encoded without any
//! further Redis call (no lease, no write-back, each of which would cost another timeout on a
//! stalled server) and returned inline; the lease is released in the background. A stored value
//! that fails verification (bad header, truncated, checksum) is a miss and counts as
//! `dsvl_vision_cache_requests_total{tier, outcome="corrupt"}`; it is overwritten by the
//! re-encode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsvl_cache::{EmbeddingCache, MemoryCache, RedisCache, SingleFlight};
use dsvl_core::cache_key::lease_key;
use dsvl_core::codec;
use dsvl_core::{Embedding, EmbeddingDType, EmbeddingSeal};
use dsvl_models::preprocess::Preprocessor;
use tokio::sync::oneshot;

use crate::batcher::{Batcher, Job, JobError};

/// An embedding as stored: the encoded value (what the caches hold) and the embedding, whose
/// payload is a slice of the value (no second copy).
#[derive(Debug)]
pub struct Stored {
    /// The encoded value (header + payload), as in the cache.
    pub value: Bytes,
    /// The embedding, sharing the value's payload bytes.
    pub embedding: Embedding,
}

impl Stored {
    /// Verifies `value`, read from under `key`, and keeps it.
    pub fn parse(value: Bytes, seal: &EmbeddingSeal, key: &str) -> Result<Self, codec::CodecError> {
        Ok(Self { embedding: Embedding::from_value(value.clone(), seal, key)?, value })
    }

    /// Stores `embedding` under `key`: encodes its value once and points the payload into it.
    pub fn new(embedding: Embedding, seal: &EmbeddingSeal, key: &str) -> Self {
        let value = embedding.to_value(seal, key);
        let payload = value.slice(value.len() - embedding.payload.len()..);
        Self { embedding: Embedding { payload, ..embedding }, value }
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
    /// The model thread is gone (it panicked): this replica cannot encode until restarted.
    ModelDown,
}

/// Outcome of one image.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The embedding.
    pub stored: Arc<Stored>,
    /// Whether it came from a cache rather than this request's encode.
    pub cache_hit: bool,
    /// Whether the value is (as far as this replica knows) in the shared cache under its key,
    /// so a reference to it resolves. False without a shared cache, and when Redis failed for
    /// this image (the caller should then return the embedding inline). A local-tier hit
    /// counts as shared when there is a shared tier: it was written or read there, though it
    /// may since have been evicted (the decoder then answers FAILED_PRECONDITION and the
    /// gateway asks again inline).
    pub shared: bool,
}

/// Result of a cache lookup for one key.
#[derive(Debug, Clone)]
pub enum Lookup {
    /// Found and verified, in either tier.
    Hit(Arc<Stored>),
    /// Not found (or not usable). `shared_ok` is false when the shared tier could not be asked
    /// (error, timeout, open breaker): the encode that follows then leaves Redis alone.
    Miss {
        /// Whether the shared tier answered.
        shared_ok: bool,
    },
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
    /// Seals values to their key and the cluster secret.
    pub seal: EmbeddingSeal,
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
    /// Images being decoded and preprocessed at once: a decoded image may take up to the pixel
    /// budget times four bytes, so this bounds the tier's peak image memory.
    pub decode_slots: Arc<tokio::sync::Semaphore>,
}

fn cache_metric(tier: &'static str, outcome: &'static str) {
    metrics::counter!("dsvl_vision_cache_requests_total", "tier" => tier, "outcome" => outcome)
        .increment(1);
}

impl Pipeline {
    fn check(&self, key: &str, value: Bytes, tier: &'static str) -> Option<Arc<Stored>> {
        match Stored::parse(value, &self.seal, key) {
            Ok(s)
                if s.embedding.model_fingerprint == self.expected.fingerprint
                    && s.embedding.dtype == self.expected.dtype
                    && s.embedding.shape == self.expected.shape =>
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
        match self.lookup_many(&[key]).await.pop() {
            Some(Lookup::Hit(s)) => Some(s),
            _ => None,
        }
    }

    /// Looks up several keys: the local tier for each, then the local misses in one shared
    /// `MGET`. Results are in the order of `keys`.
    pub async fn lookup_many<K: AsRef<str>>(&self, keys: &[K]) -> Vec<Lookup> {
        let mut out: Vec<Lookup> = Vec::with_capacity(keys.len());
        let mut missing: Vec<usize> = Vec::new();
        for (i, key) in keys.iter().enumerate() {
            let key = key.as_ref();
            let local = match self.local.get(key).await {
                Ok(Some(v)) => self.check(key, v, "local"),
                _ => {
                    cache_metric("local", "miss");
                    None
                }
            };
            match local {
                Some(s) => {
                    cache_metric("local", "hit");
                    out.push(Lookup::Hit(s));
                }
                None => {
                    out.push(Lookup::Miss { shared_ok: false });
                    missing.push(i);
                }
            }
        }
        let Some(shared) = self.shared.as_ref() else { return out };
        if missing.is_empty() {
            return out;
        }
        let wanted: Vec<&str> = missing.iter().map(|&i| keys[i].as_ref()).collect();
        match shared.get_many(&wanted).await {
            Ok(values) => {
                for (&i, value) in missing.iter().zip(values) {
                    out[i] = match value {
                        Some(v) => match self.check(keys[i].as_ref(), v, "shared") {
                            Some(s) => {
                                cache_metric("shared", "hit");
                                let _ = self
                                    .local
                                    .put(keys[i].as_ref(), s.value.clone(), self.ttl)
                                    .await;
                                Lookup::Hit(s)
                            }
                            None => Lookup::Miss { shared_ok: true },
                        },
                        None => {
                            cache_metric("shared", "miss");
                            Lookup::Miss { shared_ok: true }
                        }
                    };
                }
            }
            Err(_) => {
                for _ in &missing {
                    cache_metric("shared", "error");
                }
            }
        }
        out
    }

    /// The embedding of `image` under `key`: from a cache, from a concurrent computation of
    /// the same key (here or, through the lease, on another replica), or encoded now.
    pub async fn embed(
        self: &Arc<Self>,
        key: String,
        image: Bytes,
        deadline: Option<Instant>,
    ) -> Result<Outcome, Failure> {
        match self.lookup_many(&[key.as_str()]).await.pop() {
            Some(Lookup::Hit(stored)) => {
                Ok(Outcome { stored, cache_hit: true, shared: self.shared.is_some() })
            }
            Some(Lookup::Miss { shared_ok }) => {
                self.embed_missed(key, image, deadline, shared_ok).await
            }
            None => Err(Failure::Internal("lookup returned no result. This is a bug.".into())),
        }
    }

    /// [`Pipeline::embed`] after a [`Pipeline::lookup_many`] miss: joins a concurrent
    /// computation of `key` or computes it (`shared_ok` from the lookup).
    pub async fn embed_missed(
        self: &Arc<Self>,
        key: String,
        image: Bytes,
        deadline: Option<Instant>,
        shared_ok: bool,
    ) -> Result<Outcome, Failure> {
        let me = self.clone();
        let k = key.clone();
        let (result, led) = self
            .flights
            .run(key, || async move { me.compute(k, image, deadline, shared_ok).await })
            .await;
        if !led {
            metrics::counter!("dsvl_vision_single_flight_waits_total").increment(1);
            return result.map(|o| Outcome { cache_hit: true, ..o });
        }
        result
    }

    async fn compute(
        &self,
        key: String,
        image: Bytes,
        deadline: Option<Instant>,
        shared_ok: bool,
    ) -> Result<Outcome, Failure> {
        // No shared tier, or it just failed for this key: encode without touching Redis again.
        let Some(shared) = self.shared.as_ref().filter(|_| shared_ok) else {
            return self.encode_uncoordinated(&key, image, deadline).await;
        };
        let lease = lease_key(&key);
        let token = format!("{}-{:x}", std::process::id(), rand_token());
        loop {
            match shared.try_lease(&lease, &token, self.lease).await {
                Ok(true) => {
                    let r = self.encode_and_store(&key, image.clone(), deadline, true).await;
                    // Off the response path: the lease expires anyway if this never lands.
                    let (shared, lease, token) = (shared.clone(), lease.clone(), token.clone());
                    tokio::spawn(async move {
                        let _ = shared.release_lease(&lease, &token).await;
                    });
                    return r.map(|(stored, in_shared)| Outcome {
                        stored,
                        cache_hit: false,
                        shared: in_shared,
                    });
                }
                // Nobody can coordinate through a failing Redis: encode (fail open).
                Err(_) => return self.encode_uncoordinated(&key, image, deadline).await,
                Ok(false) => {}
            }
            metrics::counter!("dsvl_vision_lease_waits_total").increment(1);
            let until = Instant::now() + self.lease;
            while Instant::now() < until {
                if deadline.is_some_and(|d| Instant::now() >= d) {
                    return Err(Failure::Deadline);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                match shared.get(&key).await {
                    Ok(Some(v)) => {
                        if let Some(stored) = self.check(&key, v, "shared") {
                            let _ = self.local.put(&key, stored.value.clone(), self.ttl).await;
                            return Ok(Outcome { stored, cache_hit: true, shared: true });
                        }
                    }
                    Ok(None) => {}
                    // Redis failed while we waited for another replica's result: stop waiting
                    // (the result could not reach us) and encode.
                    Err(_) => return self.encode_uncoordinated(&key, image, deadline).await,
                }
            }
            // The holder did not deliver within its lease (it died): try to take over.
        }
    }

    /// Encodes and keeps the value in the local tier only.
    async fn encode_uncoordinated(
        &self,
        key: &str,
        image: Bytes,
        deadline: Option<Instant>,
    ) -> Result<Outcome, Failure> {
        let (stored, _) = self.encode_and_store(key, image, deadline, false).await?;
        Ok(Outcome { stored, cache_hit: false, shared: false })
    }

    /// Encodes `image` and stores it locally and, with `write_shared`, in the shared tier.
    /// Returns the value and whether it reached the shared tier.
    async fn encode_and_store(
        &self,
        key: &str,
        image: Bytes,
        deadline: Option<Instant>,
        write_shared: bool,
    ) -> Result<(Arc<Stored>, bool), Failure> {
        // Refusals that cost nothing come before the decode: a dead model thread, a full model
        // queue, then a decode slot (waited for until the deadline).
        if self.batcher.is_stopped() {
            return Err(Failure::ModelDown);
        }
        if self.batcher.is_full() {
            return Err(Failure::QueueFull);
        }
        let slot = self.decode_slots.clone().acquire_owned();
        let slot = match deadline {
            Some(d) => {
                tokio::time::timeout_at(d.into(), slot).await.map_err(|_| Failure::Deadline)?
            }
            None => slot.await,
        }
        .map_err(|_| Failure::Internal("the decode slots are closed".into()))?;
        let pre = self.preprocessor.clone();
        // The slot goes with the decode, not with the request: a caller that goes away
        // mid-decode must not free a slot while its image is still being decoded.
        let pixels = tokio::task::spawn_blocking(move || {
            let _slot = slot;
            let rgb = dsvl_models::preprocess::decode_rgb(&image, pre.limits())?;
            drop(image);
            let pixels = pre.preprocess_rgb(&rgb);
            let decoded = rgb.data.len();
            drop(rgb);
            crate::memory::release_decoded(decoded);
            Ok::<_, dsvl_models::preprocess::ImageError>(pixels)
        })
        .await
        .map_err(|e| Failure::Internal(format!("preprocessing task: {e}")))?
        .map_err(|e| Failure::Image(e.to_string()))?;
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Err(Failure::Deadline);
        }
        let (tx, rx) = oneshot::channel();
        self.batcher.submit(Job { pixels, deadline, reply: tx }).map_err(|_| {
            if self.batcher.is_stopped() {
                Failure::ModelDown
            } else {
                Failure::QueueFull
            }
        })?;
        let payload = match rx.await {
            Ok(Ok(p)) => p,
            Ok(Err(JobError::DeadlineExceeded)) => return Err(Failure::Deadline),
            Ok(Err(JobError::Model(e))) => return Err(Failure::Internal(e)),
            Err(_) => return Err(Failure::ModelDown),
        };
        let embedding = Embedding::new(
            self.expected.dtype,
            self.expected.shape.clone(),
            self.expected.fingerprint.clone(),
            payload,
        )
        .map_err(|e| Failure::Internal(format!("the model gave a malformed embedding: {e}")))?;
        // Never seal (and cache) what every reader would refuse.
        codec::check_finite(embedding.dtype, &embedding.payload).map_err(|e| {
            Failure::Internal(format!("the model gave a non-finite embedding: {e}"))
        })?;
        let stored = Stored::new(embedding, &self.seal, key);
        let value = stored.value.clone();
        let _ = self.local.put(key, value.clone(), self.ttl).await;
        let mut in_shared = false;
        if let Some(shared) = self.shared.as_ref().filter(|_| write_shared) {
            match shared.put(key, value.clone(), self.ttl).await {
                Ok(()) => in_shared = true,
                Err(_) => cache_metric("shared", "write_error"),
            }
        } else if self.shared.is_some() {
            cache_metric("shared", "write_skipped");
        }
        Ok((Arc::new(stored), in_shared))
    }
}

/// A random-enough lease token (collision only matters between concurrent holders).
fn rand_token() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0),
    );
    h.finish()
}

#[cfg(test)]
mod tests {
    //! The pipeline with a fake model and the in-process cache: single flight, cache hits,
    //! corrupt values treated as misses and repaired, bad images failing alone.

    use std::sync::atomic::{AtomicUsize, Ordering};

    use candle_core::{Device, Tensor};
    use dsvl_cache::{EmbeddingCache, MemoryCache, SingleFlight};
    use dsvl_core::ImageLimits;
    use dsvl_models::preprocess::{PreprocessConfig, Preprocessed, Preprocessor};
    use dsvl_telemetry::probes::Watchdog;

    use super::*;
    use crate::batcher::{Batcher, BatcherConfig, VisionModel};

    /// Embeds each image as 2 x 3 copies of its first pixel value, slowly enough for requests
    /// to overlap; counts the images it embedded.
    struct FakeModel(Arc<AtomicUsize>);

    impl VisionModel for FakeModel {
        fn embed(&self, pixels: &[&Preprocessed]) -> Result<Tensor, dsvl_models::ModelError> {
            self.0.fetch_add(pixels.len(), Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(100));
            let v: Vec<f32> = pixels.iter().flat_map(|p| [p.pixel_values[0]; 6]).collect();
            Ok(Tensor::from_vec(v, (pixels.len(), 2, 3), &Device::Cpu)?)
        }
    }

    fn pipeline() -> (Arc<Pipeline>, Arc<AtomicUsize>) {
        let embedded = Arc::new(AtomicUsize::new(0));
        let cfg = BatcherConfig { max_batch: 4, max_wait: Duration::from_millis(5), capacity: 16 };
        let batcher = Batcher::start(FakeModel(embedded.clone()), cfg, Watchdog::new("test"));
        let pre = PreprocessConfig::from_json(include_str!(
            "../../../assets/tiny-dsvl/preprocessor_config.json"
        ))
        .expect("bundled preprocessor config");
        let p = Pipeline {
            batcher: Arc::new(batcher),
            preprocessor: Preprocessor::new(pre, ImageLimits::default()),
            expected: Expected {
                fingerprint: "fake".into(),
                dtype: EmbeddingDType::F32,
                shape: vec![2, 3],
            },
            seal: EmbeddingSeal::keyed(&dsvl_core::ClusterSecret::random()),
            local: Arc::new(MemoryCache::new(1 << 20)),
            shared: None,
            flights: SingleFlight::new(),
            ttl: Duration::from_secs(60),
            lease: Duration::from_secs(1),
            decode_slots: Arc::new(tokio::sync::Semaphore::new(2)),
        };
        (Arc::new(p), embedded)
    }

    fn png(shade: u8) -> Bytes {
        use image::ImageEncoder;
        let mut buf = Vec::new();
        image::codecs::png::PngEncoder::new(&mut buf)
            .write_image(&[shade, 10, 20, shade, 30, 40], 2, 1, image::ExtendedColorType::Rgb8)
            .expect("png");
        buf.into()
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_requests_for_one_image_encode_it_once() {
        let (p, embedded) = pipeline();
        let jobs: Vec<_> = (0..4)
            .map(|_| {
                let p = p.clone();
                tokio::spawn(async move { p.embed("k1".into(), png(200), None).await })
            })
            .collect();
        let mut hits = 0;
        for j in jobs {
            let o = j.await.unwrap().map_err(|e| format!("{e:?}")).unwrap();
            assert_eq!(o.stored.embedding.shape, [2, 3]);
            hits += usize::from(o.cache_hit);
        }
        assert_eq!(embedded.load(Ordering::SeqCst), 1, "one encode for four requests");
        assert_eq!(hits, 3, "the three waiters are served from the leader's result");
        // Now cached: no encode; another image: one more.
        assert!(
            p.embed("k1".into(), png(200), None)
                .await
                .map_err(|e| format!("{e:?}"))
                .unwrap()
                .cache_hit
        );
        p.embed("k2".into(), png(100), None).await.map_err(|e| format!("{e:?}")).unwrap();
        assert_eq!(embedded.load(Ordering::SeqCst), 2);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn corrupt_values_are_misses_and_are_repaired() {
        let (p, embedded) = pipeline();
        p.local
            .put("k", Bytes::from_static(b"not an embedding"), Duration::from_secs(60))
            .await
            .unwrap();
        assert!(p.lookup("k").await.is_none(), "a corrupt value is a miss");
        let o = p.embed("k".into(), png(7), None).await.map_err(|e| format!("{e:?}")).unwrap();
        assert!(!o.cache_hit);
        assert_eq!(embedded.load(Ordering::SeqCst), 1);
        let again = p.lookup("k").await.expect("repaired by the re-encode");
        assert_eq!(again.embedding, o.stored.embedding);
        // A value made by another model under the key is a miss too.
        let foreign = Stored::new(
            Embedding { model_fingerprint: "other".into(), ..o.stored.embedding.clone() },
            &p.seal,
            "k",
        );
        p.local.put("k", foreign.value.clone(), Duration::from_secs(60)).await.unwrap();
        assert!(p.lookup("k").await.is_none(), "another model's value is a miss");
        // A good value copied from another key, or sealed without our secret, is a miss too.
        let elsewhere = Stored::new(o.stored.embedding.clone(), &p.seal, "other-key");
        p.local.put("k", elsewhere.value.clone(), Duration::from_secs(60)).await.unwrap();
        assert!(p.lookup("k").await.is_none(), "a value moved from another key is a miss");
        let forged = Stored::new(o.stored.embedding.clone(), &EmbeddingSeal::public(), "k");
        p.local.put("k", forged.value.clone(), Duration::from_secs(60)).await.unwrap();
        assert!(p.lookup("k").await.is_none(), "a value forged without the secret is a miss");
        let o = p.embed("k".into(), png(7), None).await.map_err(|e| format!("{e:?}")).unwrap();
        assert!(!o.cache_hit, "and is repaired by encoding again");
        assert!(p.lookup("k").await.is_some());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn decoding_waits_for_a_slot_and_gives_up_at_the_deadline() {
        let (p, embedded) = pipeline();
        let held = p.decode_slots.clone().acquire_many_owned(2).await.unwrap();
        let deadline = Instant::now() + Duration::from_millis(200);
        match p.embed("busy".into(), png(9), Some(deadline)).await {
            Err(Failure::Deadline) => {}
            other => panic!("{:?}", other.map(|o| o.cache_hit)),
        }
        assert_eq!(embedded.load(Ordering::SeqCst), 0, "nothing was decoded without a slot");
        drop(held);
        p.embed("busy".into(), png(9), Some(Instant::now() + Duration::from_secs(5)))
            .await
            .map_err(|e| format!("{e:?}"))
            .unwrap();
        assert_eq!(embedded.load(Ordering::SeqCst), 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_undecodable_image_fails_alone() {
        let (p, embedded) = pipeline();
        match p.embed("bad".into(), Bytes::from_static(b"\x89PNG garbage"), None).await {
            Err(Failure::Image(m)) => assert!(!m.is_empty()),
            other => panic!("{:?}", other.map(|o| o.cache_hit)),
        }
        assert_eq!(embedded.load(Ordering::SeqCst), 0, "nothing reached the model");
    }
}
