//! The workspace's one tensor ↔ bytes codec: row-major little-endian elements, in the tensor's
//! own dtype. The tensor-parallel frames, the vision tier's embeddings and the decoder's image
//! rows all go through these two functions; the embedding form on top of the bytes is
//! [`dsvl_core::Embedding`].
//!
//! [`to_le_bytes`] copies the tensor to the host once (the element vector is reinterpreted as
//! bytes, not re-encoded element by element, through candle's safetensors view); [`from_le_bytes`] builds the tensor straight from
//! the byte slice.

use candle_core::{DType, Device, Tensor};
use dsvl_core::EmbeddingDType;

/// The tensor's elements, row-major, little-endian, in its dtype.
///
/// # Errors
/// When the tensor cannot be copied to the host.
pub fn to_le_bytes(t: &Tensor) -> candle_core::Result<Vec<u8>> {
    use safetensors::View;
    match t.dtype() {
        DType::U8
        | DType::U32
        | DType::I64
        | DType::BF16
        | DType::F16
        | DType::F32
        | DType::F64 => {}
        other => candle_core::bail!("dtype {other:?} has no byte form here"),
    }
    // candle's safetensors view: one copy to the host, the element vector reinterpreted as
    // bytes (candle, like this workspace, runs on little-endian hosts only).
    Ok(View::data(&t.contiguous()?).into_owned())
}

/// A tensor of `dtype` and `dims` on `device` from row-major little-endian `bytes`.
///
/// # Errors
/// When the byte count does not match `dims` and `dtype`.
pub fn from_le_bytes(
    bytes: &[u8],
    dtype: DType,
    dims: &[usize],
    device: &Device,
) -> candle_core::Result<Tensor> {
    let want = dims.iter().product::<usize>() * dtype.size_in_bytes();
    if bytes.len() != want {
        candle_core::bail!("{} bytes for {dims:?} {dtype:?} (want {want})", bytes.len());
    }
    Tensor::from_raw_buffer(bytes, dtype, dims, device)
}

/// The candle dtype of an embedding dtype.
pub fn candle_dtype(d: EmbeddingDType) -> DType {
    match d {
        EmbeddingDType::F32 => DType::F32,
        EmbeddingDType::F16 => DType::F16,
        EmbeddingDType::BF16 => DType::BF16,
    }
}

/// The embedding dtype of a candle dtype (`None` for non-float types).
pub fn embedding_dtype(d: DType) -> Option<EmbeddingDType> {
    match d {
        DType::F32 => Some(EmbeddingDType::F32),
        DType::F16 => Some(EmbeddingDType::F16),
        DType::BF16 => Some(EmbeddingDType::BF16),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_dtype_round_trips() {
        let base = Tensor::arange(0f32, 12.0, &Device::Cpu).unwrap().reshape((3, 4)).unwrap();
        for dtype in
            [DType::U8, DType::U32, DType::I64, DType::BF16, DType::F16, DType::F32, DType::F64]
        {
            let t = base.to_dtype(dtype).unwrap();
            let bytes = to_le_bytes(&t).unwrap();
            assert_eq!(bytes.len(), 12 * dtype.size_in_bytes());
            let back = from_le_bytes(&bytes, dtype, &[3, 4], &Device::Cpu).unwrap();
            let (a, b) = (t.to_dtype(DType::F64).unwrap(), back.to_dtype(DType::F64).unwrap());
            assert_eq!(a.to_vec2::<f64>().unwrap(), b.to_vec2::<f64>().unwrap(), "{dtype:?}");
        }
        assert!(from_le_bytes(&[0; 5], DType::F32, &[2], &Device::Cpu).is_err());
    }

    #[test]
    fn little_endian_layout() {
        let t = Tensor::new(&[1.0f32, -2.5], &Device::Cpu).unwrap();
        let bytes = to_le_bytes(&t).unwrap();
        assert_eq!(&bytes[..4], &1.0f32.to_le_bytes());
        assert_eq!(&bytes[4..], &(-2.5f32).to_le_bytes());
    }

    #[test]
    fn dtype_maps_agree() {
        for d in [EmbeddingDType::F32, EmbeddingDType::F16, EmbeddingDType::BF16] {
            assert_eq!(embedding_dtype(candle_dtype(d)), Some(d));
        }
        assert_eq!(embedding_dtype(DType::U32), None);
    }
}
