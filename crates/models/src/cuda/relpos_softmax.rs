//! SAM's attention epilogue on CUDA: `softmax(scores + rel_h[.., kh] + rel_w[.., kw])` in one
//! pass, one thread block per score row, f32 inside.
//!
//! Why: candle's broadcast adds over the 5-D view `[BH, r, S, S(kh), S(kw)]` index every element
//! through its strides and ran at about 270 GB/s on an H200; with the casts to and from f32 around
//! the softmax they were 70 % of a VL-7B vision forward's GPU time (`scripts/gpu-profile`).

use candle_core::cuda_backend::cudarc::driver::PushKernelArg;
use candle_core::cuda_backend::{CudaStorageSlice, WrapErr};
use candle_core::{CudaStorage, Layout, Result, Shape};

/// The op for `scores` `[BH, R, S*S]` and `rel_h`, `rel_w` `[BH, R/S, S, S]` (all contiguous,
/// one dtype: bf16 or f32); returns the probabilities in the same dtype and shape.
pub(crate) fn relpos_softmax(
    side: usize,
    (scores, sl): (&CudaStorage, &Layout),
    (rel_h, hl): (&CudaStorage, &Layout),
    (rel_w, wl): (&CudaStorage, &Layout),
) -> Result<(CudaStorage, Shape)> {
    let (Some((s0, s1)), Some((h0, h1)), Some((w0, w1))) =
        (sl.contiguous_offsets(), hl.contiguous_offsets(), wl.contiguous_offsets())
    else {
        candle_core::bail!("sam-relpos-softmax: inputs must be contiguous")
    };
    let n = side * side;
    let rows = (s1 - s0) / n;
    if rows * n != s1 - s0 || h1 - h0 != rows * side || w1 - w0 != rows * side {
        candle_core::bail!(
            "sam-relpos-softmax: {:?} scores with {:?} and {:?} relative terms for side {side}",
            sl.dims(),
            hl.dims(),
            wl.dims()
        )
    }
    let dev = scores.device.clone();
    let cfg = super::block_per_row(rows);
    let side = side as u32;
    macro_rules! launch {
        ($kernel:literal, $t:ty, $s:expr, $h:expr, $w:expr, $wrap:path) => {{
            let func = super::func(&dev, $kernel)?;
            // SAFETY: every element is written by the kernel before it is read.
            let mut out = unsafe { dev.alloc::<$t>(rows * n) }?;
            let (s, h, w) = ($s.slice(s0..s1), $h.slice(h0..h1), $w.slice(w0..w1));
            let stream = dev.cuda_stream();
            let mut b = stream.launch_builder(&func);
            b.arg(&s);
            b.arg(&h);
            b.arg(&w);
            b.arg(&mut out);
            b.arg(&side);
            // SAFETY: block `r` reads row `r` of `rows` rows of each input and writes that row of
            // `out`; the lengths were checked above.
            unsafe { b.launch(cfg) }.w()?;
            CudaStorage { slice: $wrap(out), device: dev.clone() }
        }};
    }
    let out = match (&scores.slice, &rel_h.slice, &rel_w.slice) {
        (CudaStorageSlice::BF16(s), CudaStorageSlice::BF16(h), CudaStorageSlice::BF16(w)) => {
            launch!("dsvl_relpos_softmax_bf16", half::bf16, s, h, w, CudaStorageSlice::BF16)
        }
        (CudaStorageSlice::F32(s), CudaStorageSlice::F32(h), CudaStorageSlice::F32(w)) => {
            launch!("dsvl_relpos_softmax_f32", f32, s, h, w, CudaStorageSlice::F32)
        }
        _ => candle_core::bail!("sam-relpos-softmax: bf16 or f32 inputs of one dtype"),
    };
    Ok((out, sl.shape().clone()))
}
