//! Image embeddings in: references are read from the shared cache and verified (checksum,
//! shape, model fingerprint); inline embeddings are checked the same way. Anything missing or
//! made by another model is refused with [`ServiceError::EmbeddingUnavailable`] (the typed
//! re-encode signal the gateway acts on), never replaced by zeros.

use std::sync::Arc;

use crate::error::ServiceError;
use candle_core::{DType, Device, Tensor};
use dsvl_cache::RedisCache;
use dsvl_core::codec::{self, EmbeddingDType};
use dsvl_proto::internal::image_slot::Embedding as Source;
use dsvl_proto::internal::ImageSlot;

use crate::group::ModelInfo;

fn to_tensor(
    dtype: EmbeddingDType,
    payload: &[u8],
    rows: usize,
    hidden: usize,
) -> Result<Tensor, ServiceError> {
    let t = match dtype {
        EmbeddingDType::F32 => {
            let v: Vec<f32> = payload
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            Tensor::from_vec(v, (rows, hidden), &Device::Cpu)
        }
        EmbeddingDType::BF16 => {
            let v: Vec<half::bf16> = payload
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes(b.try_into().expect("2 bytes")))
                .collect();
            Tensor::from_vec(v, (rows, hidden), &Device::Cpu)
        }
        EmbeddingDType::F16 => {
            let v: Vec<half::f16> = payload
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes(b.try_into().expect("2 bytes")))
                .collect();
            Tensor::from_vec(v, (rows, hidden), &Device::Cpu)
        }
    };
    t.map_err(|e| ServiceError::Internal(e.to_string()))
}

/// Resolves every slot to a `[tokens, hidden]` f32 tensor, in slot order.
pub async fn fetch(
    slots: &[ImageSlot],
    info: &ModelInfo,
    cache: Option<&Arc<RedisCache>>,
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
        let (dtype, payload, fp): (EmbeddingDType, Vec<u8>, String) = match &slot.embedding {
            None => {
                return Err(ServiceError::InvalidArgument(format!("image {i} has no embedding")))
            }
            Some(Source::Inline(e)) => {
                let dt = dsvl_proto::convert::embedding_dtype(e.dtype).ok_or_else(|| {
                    ServiceError::InvalidArgument(format!("image {i}: unknown dtype {}", e.dtype))
                })?;
                if e.shape != [rows as u32, hidden as u32] {
                    return Err(ServiceError::EmbeddingUnavailable(format!("image {i}: embedding shape {:?}, this model takes [{rows}, {hidden}]: re-encode", e.shape)));
                }
                if e.data.len() != rows * hidden * dt.size() {
                    return Err(ServiceError::InvalidArgument(format!(
                        "image {i}: {} bytes for shape {:?}",
                        e.data.len(),
                        e.shape
                    )));
                }
                (dt, e.data.to_vec(), e.model_fingerprint.clone())
            }
            Some(Source::Ref(r)) => {
                let value = match fetched.next() {
                    Some(Some(v)) => v,
                    Some(None) => return Err(ServiceError::EmbeddingUnavailable(format!("embedding {} is not in the cache (expired or evicted): re-encode the image", r.key))),
                    None => return Err(ServiceError::Internal("fewer cache replies than references. This is a bug.".into())),
                };
                let (header, payload) = codec::decode(&value).map_err(|e| {
                    metrics::counter!("dsvl_decoder_embedding_errors_total", "reason" => "corrupt")
                        .increment(1);
                    ServiceError::EmbeddingUnavailable(format!(
                        "embedding {} is corrupt ({e}): re-encode the image",
                        r.key
                    ))
                })?;
                if header.shape != [rows as u32, hidden as u32] {
                    return Err(ServiceError::EmbeddingUnavailable(format!("embedding {} has shape {:?}; this model takes [{rows}, {hidden}]: re-encode", r.key, header.shape)));
                }
                (header.dtype, payload.to_vec(), header.model_fingerprint)
            }
        };
        if &fp != fingerprint {
            metrics::counter!("dsvl_decoder_embedding_errors_total", "reason" => "fingerprint")
                .increment(1);
            return Err(ServiceError::EmbeddingUnavailable(format!(
                "image {i} was encoded by another model (fingerprint {fp}, this decoder expects {fingerprint}): re-encode with the matching vision tier"
            )));
        }
        out.push(
            to_tensor(dtype, &payload, rows, hidden)?
                .to_dtype(DType::F32)
                .map_err(|e| ServiceError::Internal(e.to_string()))?,
        );
    }
    Ok(out)
}
