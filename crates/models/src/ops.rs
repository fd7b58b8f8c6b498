//! Numerics helpers shared by the towers and the decoder.

use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::gelu_slice;

/// Softmax over the last axis computed in f32 and rounded once to the working dtype, as
/// PyTorch's reduced-precision softmax kernels (and the reference's eager attention, which
/// upcasts) do; candle's CPU kernel would accumulate in bf16.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 {
        return candle_nn::ops::softmax_last_dim(&x.contiguous()?);
    }
    candle_nn::ops::softmax_last_dim(&x.to_dtype(DType::F32)?.contiguous()?)?.to_dtype(x.dtype())
}

struct GeluErf;

impl CustomOp1 for GeluErf {
    fn name(&self) -> &'static str {
        "gelu-erf-f32"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let CpuStorage::F32(data) = storage else { candle_core::bail!("gelu-erf-f32: f32 only") };
        let Some((a, b)) = layout.contiguous_offsets() else {
            candle_core::bail!("gelu-erf-f32: contiguous input only")
        };
        let src = &data[a..b];
        let mut out = vec![0f32; src.len()];
        out.par_chunks_mut(1 << 14)
            .zip(src.par_chunks(1 << 14))
            .for_each(|(d, s)| gelu_slice(d, s));
        Ok((CpuStorage::F32(out), layout.shape().clone()))
    }
}

/// Exact-erf GELU (`nn.GELU()`): a vectorised kernel for f32 on the CPU (candle's is a scalar
/// `erf` per element, which costs seconds per image at SAM-B sizes), candle's op elsewhere.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    if x.dtype() == DType::F32 && x.device().is_cpu() {
        return x.contiguous()?.apply_op1_no_bwd(&GeluErf);
    }
    x.gelu_erf()
}
