//! The one mapping between the wire messages and the workspace's own types. Every service
//! converts through these functions, so a field is interpreted in one place.

use dsvl_core::codec::CodecError;
use dsvl_core::sampling::{SamplingParams, SamplingRequest};
use dsvl_core::{Embedding, EmbeddingDType};

use crate::{internal, v1};

/// The public API's optional fields, as asked (defaults and validation: [`SamplingRequest::resolve`]).
impl From<&v1::SamplingParams> for SamplingRequest {
    fn from(p: &v1::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            min_p: p.min_p,
            logit_bias: p.logit_bias.iter().map(|(&id, &bias)| (id, bias)).collect(),
        }
    }
}

/// Resolved parameters onto the internal wire (every field set).
impl From<&SamplingParams> for internal::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            min_p: p.min_p,
            logit_bias: p
                .logit_bias
                .iter()
                .map(|&(token_id, bias)| internal::LogitBias { token_id, bias })
                .collect(),
        }
    }
}

/// Resolved parameters off the internal wire; the receiver still validates them
/// ([`SamplingParams::validate`]).
impl From<&internal::SamplingParams> for SamplingParams {
    fn from(p: &internal::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            min_p: p.min_p,
            logit_bias: p.logit_bias.iter().map(|b| (b.token_id, b.bias)).collect(),
        }
    }
}

/// The embedding dtype on the wire.
impl From<EmbeddingDType> for internal::DType {
    fn from(d: EmbeddingDType) -> Self {
        match d {
            EmbeddingDType::F32 => Self::DtypeF32,
            EmbeddingDType::F16 => Self::DtypeF16,
            EmbeddingDType::BF16 => Self::DtypeBf16,
        }
    }
}

/// The embedding dtype off the wire (`None` for unspecified or unknown values).
pub fn embedding_dtype(wire: i32) -> Option<EmbeddingDType> {
    match internal::DType::try_from(wire).ok()? {
        internal::DType::DtypeF32 => Some(EmbeddingDType::F32),
        internal::DType::DtypeF16 => Some(EmbeddingDType::F16),
        internal::DType::DtypeBf16 => Some(EmbeddingDType::BF16),
        internal::DType::DtypeUnspecified => None,
    }
}

/// An embedding onto the wire (the payload is shared, not copied).
impl From<&Embedding> for internal::Embedding {
    fn from(e: &Embedding) -> Self {
        Self {
            shape: e.shape.clone(),
            dtype: internal::DType::from(e.dtype) as i32,
            data: e.payload.clone(),
            model_fingerprint: e.model_fingerprint.clone(),
        }
    }
}

/// An embedding off the wire: dtype known, payload length matching the shape, every element
/// finite (a NaN row would poison the whole sequence).
impl TryFrom<internal::Embedding> for Embedding {
    type Error = CodecError;
    fn try_from(e: internal::Embedding) -> Result<Self, CodecError> {
        let dtype = embedding_dtype(e.dtype)
            .ok_or_else(|| CodecError::Format(format!("unknown dtype {}", e.dtype)))?;
        let emb = Embedding::new(dtype, e.shape, e.model_fingerprint, e.data)?;
        dsvl_core::codec::check_finite(dtype, &emb.payload)?;
        Ok(emb)
    }
}

/// The Decoder's "re-encode these images and send them inline" answer: FAILED_PRECONDITION
/// with a typed [`internal::DecoderErrorDetail`] in the status details.
pub fn embedding_unavailable(message: impl Into<String>) -> tonic::Status {
    use prost::Message;
    let detail = internal::DecoderErrorDetail {
        reason: internal::decoder_error_detail::Reason::EmbeddingUnavailable as i32,
    };
    tonic::Status::with_details(
        tonic::Code::FailedPrecondition,
        message,
        detail.encode_to_vec().into(),
    )
}

/// Whether a Decoder status asks the caller to re-encode the request's images (see
/// [`embedding_unavailable`]); a bare FAILED_PRECONDITION does not.
pub fn asks_to_reencode(status: &tonic::Status) -> bool {
    use prost::Message;
    status.code() == tonic::Code::FailedPrecondition
        && internal::DecoderErrorDetail::decode(status.details()).is_ok_and(|d| {
            d.reason == internal::decoder_error_detail::Reason::EmbeddingUnavailable as i32
        })
}

/// The prefix-cache spans of a request's images ([`dsvl_core::prefix`]): each slot's run of
/// `tokens_per_image` positions, keyed by its embedding-cache key, or for an inline embedding
/// by its bytes. The decoder caches KV blocks under these and the gateway routes by them, so
/// both read them here. Sorted by position.
pub fn prefix_spans(
    slots: &[internal::ImageSlot],
    tokens_per_image: usize,
) -> Vec<dsvl_core::prefix::ImageSpan> {
    use dsvl_core::prefix::{image_key_hash, inline_image_key, ImageSpan};
    use internal::image_slot::Embedding as Source;
    let mut spans: Vec<ImageSpan> = slots
        .iter()
        .map(|s| ImageSpan {
            start: s.position as usize,
            len: tokens_per_image,
            key: match &s.embedding {
                Some(Source::Ref(r)) => image_key_hash(r.key.as_bytes()),
                Some(Source::Inline(e)) => inline_image_key(&e.data),
                None => image_key_hash(b""),
            },
        })
        .collect();
    spans.sort_by_key(|s| s.start);
    spans
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_parameters_round_trip_the_internal_wire() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: 42,
            presence_penalty: -0.5,
            frequency_penalty: 1.5,
            min_p: 0.05,
            logit_bias: vec![(3, -100.0), (17, 2.5)],
        };
        assert_eq!(SamplingParams::from(&internal::SamplingParams::from(&p)), p);
    }

    #[test]
    fn embeddings_round_trip_the_wire() {
        let e = Embedding::new(EmbeddingDType::BF16, vec![2, 3], "fp".into(), vec![7u8; 12].into())
            .unwrap();
        let wire = internal::Embedding::from(&e);
        assert_eq!(wire.data.as_ptr(), e.payload.as_ptr(), "shared, not copied");
        assert_eq!(Embedding::try_from(wire.clone()).unwrap(), e);
        assert!(Embedding::try_from(internal::Embedding { dtype: 0, ..wire.clone() }).is_err());
        assert!(
            Embedding::try_from(internal::Embedding { shape: vec![2, 4], ..wire.clone() }).is_err()
        );
        let mut nan = wire.data.to_vec();
        nan[4..6].copy_from_slice(&[0xc0, 0x7f]); // bf16 NaN as element 2
        assert_eq!(
            Embedding::try_from(internal::Embedding { data: nan.into(), ..wire }).unwrap_err(),
            CodecError::NotFinite { index: 2 }
        );
    }

    #[test]
    fn dtypes_round_trip_the_wire() {
        for d in [EmbeddingDType::F32, EmbeddingDType::F16, EmbeddingDType::BF16] {
            assert_eq!(embedding_dtype(internal::DType::from(d) as i32), Some(d));
        }
        assert_eq!(embedding_dtype(0), None);
        assert_eq!(embedding_dtype(99), None);
    }

    #[test]
    fn public_fields_keep_their_presence() {
        let public = v1::SamplingParams { top_p: Some(0.0), ..Default::default() };
        let req = SamplingRequest::from(&public);
        assert_eq!(req.top_p, Some(0.0));
        assert_eq!(req.temperature, None);
        assert_eq!(req.resolve().unwrap_err().field, "top_p");
    }
}
