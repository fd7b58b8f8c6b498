//! RMSNorm of bf16 rows on CUDA in one kernel, with transformers' rounding points (the
//! normalised row is rounded to bf16 before the weight multiplies it).
//!
//! Why: written from candle ops the same maths is nine launches and as many passes over the
//! activations (cast, square, mean, add, sqrt, reciprocal, multiply, cast, multiply); at a
//! 64 x 128-token VL-7B prefill on an H200 those were about 15 % of the step's GPU time
//! (`scripts/gpu-profile`).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CpuStorage, CudaStorage, CustomOp2, Layout, Result, Shape, Tensor};

struct RmsNormBf16 {
    eps: f32,
}

impl CustomOp2 for RmsNormBf16 {
    fn name(&self) -> &'static str {
        "rms-norm-bf16"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        candle_core::bail!("rms-norm-bf16 is the CUDA kernel; the CPU has its own")
    }

    fn cuda_fwd(
        &self,
        x: &CudaStorage,
        xl: &Layout,
        w: &CudaStorage,
        wl: &Layout,
    ) -> Result<(CudaStorage, Shape)> {
        let (Some((x0, x1)), Some((w0, w1))) = (xl.contiguous_offsets(), wl.contiguous_offsets())
        else {
            candle_core::bail!("rms-norm-bf16: inputs must be contiguous")
        };
        let d = w1 - w0;
        if d == 0 || (x1 - x0) % d != 0 || xl.dims().last() != Some(&d) {
            candle_core::bail!(
                "rms-norm-bf16: rows {:?} and weight {:?} disagree",
                xl.dims(),
                wl.dims()
            )
        }
        let rows = (x1 - x0) / d;
        let (CudaStorageSlice::BF16(xs), CudaStorageSlice::BF16(ws)) = (&x.slice, &w.slice) else {
            candle_core::bail!("rms-norm-bf16: bf16 rows and weight")
        };
        let dev = x.device.clone();
        let func = super::func(&dev, "dsvl_rms_norm_bf16")?;
        // SAFETY: every element is written by the kernel before it is read.
        let mut out = unsafe { dev.alloc::<half::bf16>(rows * d) }?;
        let (xv, wv) = (xs.slice(x0..x1), ws.slice(w0..w1));
        let (d32, eps) = (d as u32, self.eps);
        let stream = dev.cuda_stream();
        let mut b = stream.launch_builder(&func);
        b.arg(&xv);
        b.arg(&wv);
        b.arg(&mut out);
        b.arg(&d32);
        b.arg(&eps);
        // Enough threads that each reads about four values: a decode step's single row is
        // latency-bound, and one thread looping over a long row waits on every load in turn.
        let threads = (d.div_ceil(4).div_ceil(32) * 32).clamp(32, 1024) as u32;
        let cfg = candle_core::cuda_backend::cudarc::driver::LaunchConfig {
            grid_dim: (rows as u32, 1, 1),
            block_dim: (threads, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: block `r` reads row `r` of `x` (`d` values) and the weight, and writes row `r`
        // of `out`; the lengths were checked above.
        unsafe { b.launch(cfg) }.w()?;
        Ok((CudaStorage { slice: CudaStorageSlice::BF16(out), device: dev }, xl.shape().clone()))
    }
}

/// `x / sqrt(mean(x²) + eps)` rounded to bf16, times `weight`, over the last axis of `x`
/// (bf16 on a CUDA device).
pub(crate) fn rms_norm_bf16(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &RmsNormBf16 { eps: eps as f32 })
}
