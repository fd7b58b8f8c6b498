//! Image embeddings in: references are read from the shared cache and verified (the seal binding
//! the value to its key and the cluster secret, shape, model fingerprint, finite elements);
//! inline embeddings are checked the same way. Anything missing or
//! made by another model is refused with [`ServiceError::EmbeddingUnavailable`] (the typed
//! re-encode signal the gateway acts on), never replaced by zeros.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use dsvl_cache::RedisCache;
use dsvl_core::{Embedding, EmbeddingSeal};
use dsvl_parallel::tensor_bytes;
use dsvl_proto::internal::image_slot::Embedding as Source;
use dsvl_proto::internal::ImageSlot;

use crate::error::ServiceError;
use crate::group::ModelInfo;

/// Resolves every slot to a `[tokens, hidden]` tensor in the model's working dtype (`dtype`), in
/// slot order. An embedding already in that dtype (bf16 from a bf16 vision tier for a bf16
/// decoder) is never converted, and travels to the worker ranks at that width.
pub async fn fetch(
    slots: &[ImageSlot],
    info: &ModelInfo,
    cache: Option<&Arc<RedisCache>>,
    seal: &EmbeddingSeal,
    dtype: DType,
) -> Result<Vec<Tensor>, ServiceError> {
    let Some((_, fingerprint)) = &info.vision else {
        return Err(ServiceError::InvalidArgument(
            "this model is text-only: it cannot take images".into(),
        ));
    };
    let (rows, hidden) = (info.image_tokens, info.hidden_size);
    // Every referenced embedding of the request in one MGET.
    let ref_keys: Vec<&str> = slots
        .iter()
        .filter_map(|s| match &s.embedding {
            Some(Source::Ref(r)) => Some(r.key.as_str()),
            _ => None,
        })
        .collect();
    let mut fetched = if ref_keys.is_empty() {
        Vec::new()
    } else {
        let cache = cache.ok_or_else(|| ServiceError::EmbeddingUnavailable("embedding references need a shared cache; send the embedding inline or configure --redis".into()))?;
        cache.get_many(&ref_keys).await.map_err(|e| {
            ServiceError::EmbeddingUnavailable(format!("embeddings {} could not be read ({e}): re-encode or send them inline", ref_keys.join(", ")))
        })?
    }
    .into_iter();
    let mut out = Vec::with_capacity(slots.len());
    for (i, slot) in slots.iter().enumerate() {
        let emb: Embedding = match &slot.embedding {
            None => {
                return Err(ServiceError::InvalidArgument(format!("image {i} has no embedding")))
            }
            Some(Source::Inline(e)) => {
                if e.shape != [rows as u32, hidden as u32] {
                    return Err(ServiceError::EmbeddingUnavailable(format!(
                        "image {i}: embedding shape {:?}, this model takes [{rows}, {hidden}]: re-encode",
                        e.shape
                    )));
                }
                Embedding::try_from(e.clone())
                    .map_err(|e| ServiceError::InvalidArgument(format!("image {i}: {e}")))?
            }
            Some(Source::Ref(r)) => {
                let value = match fetched.next() {
                    Some(Some(v)) => v,
                    Some(None) => return Err(ServiceError::EmbeddingUnavailable(format!("embedding {} is not in the cache (expired or evicted): re-encode the image", r.key))),
                    None => return Err(ServiceError::Internal("fewer cache replies than references. This is a bug.".into())),
                };
                let emb = Embedding::from_value(value, seal, &r.key).map_err(|e| {
                    metrics::counter!("dsvl_decoder_embedding_errors_total", "reason" => "corrupt")
                        .increment(1);
                    ServiceError::EmbeddingUnavailable(format!(
                        "embedding {} is corrupt ({e}): re-encode the image",
                        r.key
                    ))
                })?;
                if emb.shape != [rows as u32, hidden as u32] {
                    return Err(ServiceError::EmbeddingUnavailable(format!("embedding {} has shape {:?}; this model takes [{rows}, {hidden}]: re-encode", r.key, emb.shape)));
                }
                emb
            }
        };
        if &emb.model_fingerprint != fingerprint {
            metrics::counter!("dsvl_decoder_embedding_errors_total", "reason" => "fingerprint")
                .increment(1);
            return Err(ServiceError::EmbeddingUnavailable(format!(
                "image {i} was encoded by another model (fingerprint {}, this decoder expects {fingerprint}): re-encode with the matching vision tier",
                emb.model_fingerprint
            )));
        }
        let t = tensor_bytes::from_le_bytes(
            &emb.payload,
            tensor_bytes::candle_dtype(emb.dtype),
            &[rows, hidden],
            &Device::Cpu,
        )
        .and_then(|t| if t.dtype() == dtype { Ok(t) } else { t.to_dtype(dtype) })
        .map_err(|e| ServiceError::Internal(e.to_string()))?;
        out.push(t);
    }
    Ok(out)
}
