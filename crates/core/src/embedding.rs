//! The image embedding as every tier sees it: element type, shape, the fingerprint of the model
//! that produced it, and the payload (row-major little-endian elements, shared without copies).
//!
//! One type, one stored form: [`Embedding::to_value`] / [`Embedding::from_value`] are the
//! Redis value format ([`crate::codec`]), the proto mapping is `dsvl_proto::convert`, and the
//! tensor side is `dsvl_parallel::tensor_bytes` (the one tensor ↔ bytes codec). The dtype
//! travels unchanged from the vision tier to every decoder rank: a bf16 embedding stays bf16.

use bytes::Bytes;

use crate::codec::{self, CodecError, EmbeddingHeader};
use crate::secret::EmbeddingSeal;

/// Element types an embedding can be stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmbeddingDType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
}

impl EmbeddingDType {
    pub(crate) fn code(self) -> u8 {
        match self {
            Self::F32 => 1,
            Self::F16 => 2,
            Self::BF16 => 3,
        }
    }

    pub(crate) fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            1 => Self::F32,
            2 => Self::F16,
            3 => Self::BF16,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }

    /// Lower-case name (`f32`, `f16`, `bf16`): the one name used in cache keys, logs and
    /// configs.
    pub fn name(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }
}

impl std::str::FromStr for EmbeddingDType {
    type Err = CodecError;
    fn from_str(s: &str) -> Result<Self, CodecError> {
        match s {
            "f32" => Ok(Self::F32),
            "f16" => Ok(Self::F16),
            "bf16" => Ok(Self::BF16),
            other => Err(CodecError::Format(format!("unknown embedding dtype `{other}`"))),
        }
    }
}

/// One image's embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Embedding {
    /// Element type of the payload.
    pub dtype: EmbeddingDType,
    /// `[tokens, hidden]` (576 x 4096 for DeepSeek-VL-7B).
    pub shape: Vec<u32>,
    /// Fingerprint of the vision tower + aligner that produced it.
    pub model_fingerprint: String,
    /// Row-major little-endian elements.
    pub payload: Bytes,
}

impl Embedding {
    /// An embedding whose payload is checked against its shape and dtype.
    ///
    /// # Errors
    /// The payload length does not match.
    pub fn new(
        dtype: EmbeddingDType,
        shape: Vec<u32>,
        model_fingerprint: String,
        payload: Bytes,
    ) -> Result<Self, CodecError> {
        let elems = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d as usize))
            .ok_or_else(|| CodecError::Format("shape overflows".into()))?;
        if elems.checked_mul(dtype.size()) != Some(payload.len()) {
            return Err(CodecError::Format(format!(
                "payload of {} bytes for shape {shape:?} {}",
                payload.len(),
                dtype.name()
            )));
        }
        Ok(Self { dtype, shape, model_fingerprint, payload })
    }

    /// The stored form under `cache_key` (header with its seal, then the payload): one copy of
    /// the payload.
    pub fn to_value(&self, seal: &EmbeddingSeal, cache_key: &str) -> Bytes {
        let header = EmbeddingHeader {
            dtype: self.dtype,
            shape: self.shape.clone(),
            model_fingerprint: self.model_fingerprint.clone(),
        };
        Bytes::from(codec::encode(&header, &self.payload, seal, cache_key))
    }

    /// Parses and verifies a value read from under `cache_key`; the payload is a slice of
    /// `value` (no copy).
    ///
    /// # Errors
    /// Truncated, malformed, misplaced, forged or non-finite values ([`codec::decode`]).
    pub fn from_value(
        value: Bytes,
        seal: &EmbeddingSeal,
        cache_key: &str,
    ) -> Result<Self, CodecError> {
        let (header, payload) = codec::decode(&value, seal, cache_key)?;
        let start = value.len() - payload.len();
        Ok(Self {
            dtype: header.dtype,
            shape: header.shape,
            model_fingerprint: header.model_fingerprint,
            payload: value.slice(start..),
        })
    }

    /// Payload size in bytes.
    pub fn payload_bytes(&self) -> usize {
        self.payload.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Embedding {
        let payload = Bytes::from((0..24u8).collect::<Vec<_>>());
        Embedding::new(EmbeddingDType::BF16, vec![3, 4], "fp".into(), payload).unwrap()
    }

    #[test]
    fn value_round_trip_shares_the_payload() {
        let e = sample();
        let seal = EmbeddingSeal::public();
        let value = e.to_value(&seal, "k");
        let back = Embedding::from_value(value.clone(), &seal, "k").unwrap();
        assert_eq!(back, e);
        // The payload is a view into the value, not a copy.
        let end = value.as_ptr() as usize + value.len();
        assert_eq!(back.payload.as_ptr() as usize + back.payload.len(), end);
    }

    #[test]
    fn payload_must_match_shape_and_dtype() {
        let short = Bytes::from(vec![0u8; 23]);
        assert!(Embedding::new(EmbeddingDType::BF16, vec![3, 4], "fp".into(), short).is_err());
        let f32 = Bytes::from(vec![0u8; 48]);
        assert!(Embedding::new(EmbeddingDType::F32, vec![3, 4], "fp".into(), f32).is_ok());
    }

    #[test]
    fn one_name_per_dtype() {
        for d in [EmbeddingDType::F32, EmbeddingDType::F16, EmbeddingDType::BF16] {
            assert_eq!(d.name().parse::<EmbeddingDType>().unwrap(), d);
        }
        assert!("fp8".parse::<EmbeddingDType>().is_err());
    }
}
