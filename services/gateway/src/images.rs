//! The vision stage: every image of a request becomes an embedding the decoder can use.
//!
//! 1. With a shared cache (Redis) and the vision tier's model info, the gateway computes each
//!    image's key itself and asks Redis `EXISTS` for all of them in one pipeline; present keys
//!    become references without any vision call.
//! 2. The rest go to the vision tier, grouped per replica by rendezvous hashing on the image
//!    digest (an image keeps landing on the replica that has it in its local cache). A replica
//!    that fails is skipped for those images and they are retried on the next one in their
//!    hash order, within the retry budget.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use dsvl_core::cache_key::{embedding_key, ImageDigest, KeyParts, PREPROCESS_VERSION};
use dsvl_proto::convert::embedding_dtype;
use dsvl_proto::internal::encode_result::Result as EncodeOutcome;
use dsvl_proto::internal::image_slot::Embedding as SlotEmbedding;
use dsvl_proto::internal::vision_encoder_client::VisionEncoderClient;
use dsvl_proto::internal::{
    EmbeddingRef, EncodeRequest, EncodeResponse, ImageErrorCode, ImageInput, InfoRequest,
    InfoResponse,
};
use tonic::{Code, Status};

use crate::error::GatewayError;
use crate::upstream::Replica;
use crate::Gateway;

/// Embeddings of a request's images, in order.
#[derive(Debug, Clone)]
pub struct Embedded {
    /// One per image.
    pub embeddings: Vec<SlotEmbedding>,
    /// Images that needed no encoding (shared-cache probe or a vision-side cache hit).
    pub cached: u32,
}

fn retryable(s: &Status) -> bool {
    matches!(s.code(), Code::Unavailable | Code::Unknown | Code::ResourceExhausted)
}

/// Largest message the gateway sends or accepts from a tier.
pub const MAX_UPSTREAM_MESSAGE: usize = 256 << 20;

impl Gateway {
    /// The vision tier's model info, refreshed in the background.
    pub fn vision_info(&self) -> Option<InfoResponse> {
        self.vision_info.read().expect("info lock poisoned. This is a bug.").clone()
    }

    /// Asks one healthy vision replica for its model info.
    pub async fn refresh_vision_info(&self) {
        for r in self.vision.replicas().into_iter().filter(|r| r.usable()) {
            let mut client = VisionEncoderClient::new(r.channel.clone());
            let call = client.info(InfoRequest {});
            if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(2), call).await {
                *self.vision_info.write().expect("info lock poisoned. This is a bug.") =
                    Some(info.into_inner());
                return;
            }
        }
    }

    /// References for images whose key the shared cache already holds.
    async fn probe_shared_cache(
        &self,
        salt: &[u8],
        digests: &[ImageDigest],
        out: &mut [Option<SlotEmbedding>],
    ) -> u32 {
        let (Some(redis), Some(info)) = (&self.redis, self.vision_info()) else { return 0 };
        // The same dtype name the vision tier puts into its keys (`EmbeddingDType::name`).
        let Some(dtype) =
            embedding_dtype(info.dtype).map(|d| d.name()).filter(|_| info.shared_cache)
        else {
            return 0;
        };
        let keys: Vec<String> = digests
            .iter()
            .map(|image| {
                embedding_key(&KeyParts {
                    salt,
                    model_fingerprint: &info.model_fingerprint,
                    dtype,
                    preprocess_version: PREPROCESS_VERSION,
                    image,
                })
            })
            .collect();
        // One round trip for all the request's images (a pipeline of EXISTS); an error leaves
        // every image to the vision tier.
        let Ok(present) = redis.exists_many(&keys).await else { return 0 };
        let mut hits = 0;
        for ((key, slot), present) in keys.into_iter().zip(out.iter_mut()).zip(present) {
            if present {
                *slot = Some(SlotEmbedding::Ref(EmbeddingRef {
                    key,
                    shape: vec![info.tokens_per_image, info.hidden_size],
                    dtype: info.dtype,
                    model_fingerprint: info.model_fingerprint.clone(),
                    stored_bytes: 0,
                }));
                hits += 1;
            }
        }
        hits
    }

    async fn call_encode(
        &self,
        request_id: &str,
        r: &Replica,
        images: Vec<ImageInput>,
        salt: &[u8],
        inline: bool,
        deadline: Instant,
    ) -> Result<EncodeResponse, Status> {
        let mut req = tonic::Request::new(EncodeRequest {
            images,
            cache_salt: Bytes::copy_from_slice(salt),
            return_inline: inline,
        });
        req.set_timeout(deadline.saturating_duration_since(Instant::now()));
        dsvl_telemetry::inject_trace_context(req.metadata_mut());
        if let Ok(id) = request_id.parse() {
            req.metadata_mut().insert(dsvl_telemetry::REQUEST_ID_HEADER, id);
        }
        let mut client = VisionEncoderClient::new(r.channel.clone())
            .max_decoding_message_size(MAX_UPSTREAM_MESSAGE)
            .max_encoding_message_size(MAX_UPSTREAM_MESSAGE);
        let started = Instant::now();
        let result = client.encode(req).await.map(tonic::Response::into_inner);
        metrics::histogram!("dsvl_upstream_latency_seconds", "tier" => "vision")
            .record(started.elapsed().as_secs_f64());
        result
    }

    /// Embeddings for `images` under the tenant's `salt`; `inline` forces the data into the
    /// reply (used when the decoder cannot read a reference).
    ///
    /// # Errors
    /// A bad image (INVALID_ARGUMENT naming it), no usable vision replica, the retry budget
    /// spent, or the deadline.
    pub async fn embed_images(
        &self,
        request_id: &str,
        salt: &[u8],
        images: &[Bytes],
        image_digests: &[ImageDigest],
        inline: bool,
        deadline: Instant,
    ) -> Result<Embedded, GatewayError> {
        let n = images.len();
        let mut out: Vec<Option<SlotEmbedding>> = vec![None; n];
        let mut cached =
            if inline { 0 } else { self.probe_shared_cache(salt, image_digests, &mut out).await };
        // Hex for routing and `client_digest`: formatting, not hashing again.
        let digests: Vec<String> = image_digests.iter().map(ImageDigest::to_hex).collect();
        let mut tried: Vec<HashSet<String>> = vec![HashSet::new(); n];
        let mut first_round = true;
        loop {
            let pending: Vec<usize> = (0..n).filter(|&i| out[i].is_none()).collect();
            if pending.is_empty() {
                break;
            }
            if !first_round {
                if !self.vision_retries.withdraw() {
                    return Err(GatewayError::Unavailable(
                        "vision tier: failed and the retry budget is spent".into(),
                    ));
                }
                metrics::counter!("dsvl_gateway_retries_total", "tier" => "vision").increment(1);
            }
            first_round = false;
            let routing = Instant::now();
            let mut groups: HashMap<String, (Arc<Replica>, Vec<usize>)> = HashMap::new();
            for &i in &pending {
                let r = self
                    .vision
                    .by_rendezvous(&digests[i])
                    .into_iter()
                    .find(|r| r.usable() && !tried[i].contains(&r.addr))
                    .ok_or_else(|| {
                        GatewayError::Unavailable(format!(
                            "no healthy vision replica could take image {}",
                            i + 1
                        ))
                    })?;
                groups.entry(r.addr.clone()).or_insert_with(|| (r, Vec::new())).1.push(i);
            }
            metrics::histogram!("dsvl_gateway_routing_seconds", "tier" => "vision")
                .record(routing.elapsed().as_secs_f64());
            let digests = &digests;
            let calls = groups.into_values().map(|(r, idx)| async move {
                let inputs = idx
                    .iter()
                    .map(|&i| ImageInput {
                        data: images[i].clone(),
                        client_digest: digests[i].clone(),
                    })
                    .collect();
                let result = self.call_encode(request_id, &r, inputs, salt, inline, deadline).await;
                (r, idx, result)
            });
            for (r, idx, result) in futures::future::join_all(calls).await {
                match result {
                    Ok(resp) if resp.results.len() == idx.len() => {
                        r.breaker.success();
                        for (&i, res) in idx.iter().zip(resp.results) {
                            cached += u32::from(res.cache_hit);
                            out[i] = Some(match res.result {
                                Some(EncodeOutcome::Ref(x)) => SlotEmbedding::Ref(x),
                                Some(EncodeOutcome::Inline(x)) => SlotEmbedding::Inline(x),
                                Some(EncodeOutcome::Error(e))
                                    if e.code() == ImageErrorCode::InvalidImage =>
                                {
                                    return Err(GatewayError::InvalidArgument(format!(
                                        "image {}: {}",
                                        i + 1,
                                        e.message
                                    )));
                                }
                                Some(EncodeOutcome::Error(e)) => {
                                    return Err(GatewayError::Unavailable(format!(
                                        "image {}: {}",
                                        i + 1,
                                        e.message
                                    )))
                                }
                                None => {
                                    return Err(GatewayError::Internal(
                                        "vision tier: empty result".into(),
                                    ))
                                }
                            });
                        }
                    }
                    Ok(resp) => {
                        return Err(GatewayError::Internal(format!(
                            "vision tier: {} results for {} images",
                            resp.results.len(),
                            idx.len()
                        )));
                    }
                    Err(s) if retryable(&s) => {
                        tracing::warn!(replica = %r.addr, code = ?s.code(), message = s.message(), "vision replica failed; retrying elsewhere");
                        if s.code() != Code::ResourceExhausted {
                            r.breaker.failure();
                        }
                        for &i in &idx {
                            tried[i].insert(r.addr.clone());
                        }
                    }
                    Err(s) => return Err(GatewayError::from_upstream("vision tier", &s)),
                }
            }
        }
        Ok(Embedded {
            embeddings: out.into_iter().map(|e| e.expect("every image embedded")).collect(),
            cached,
        })
    }
}
