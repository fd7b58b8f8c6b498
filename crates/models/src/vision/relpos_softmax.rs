//! SAM's attention epilogue fused into one pass: add the decomposed relative positions to the
//! scores and take the softmax, row by row.
//!
//! Unfused, `scores + rel_h[..., None] + rel_w[..., None, :]` followed by a softmax makes four
//! passes over a `[B*heads, N, N]` tensor (805 MB per image for a SAM-B global block). On the
//! CPU this op reads each score once, adds the two terms in the reference's order
//! (`(s + rel_h) + rel_w`), and normalises in place, in f32; on CUDA a kernel of ours does the
//! same per row (`crate::cuda::relpos_softmax`). Other devices (and dtypes) take the generic
//! broadcast path with identical maths.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::kernels::relpos_softmax_row;
use crate::ops::softmax_last_dim;

struct RelPosSoftmax {
    side: usize,
}

impl CustomOp3 for RelPosSoftmax {
    fn name(&self) -> &'static str {
        "sam-relpos-softmax"
    }

    fn cpu_fwd(
        &self,
        scores: &CpuStorage,
        ls: &Layout,
        rel_h: &CpuStorage,
        lh: &Layout,
        rel_w: &CpuStorage,
        lw: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let s = self.side;
        let n = s * s;
        let (CpuStorage::F32(scores), CpuStorage::F32(rel_h), CpuStorage::F32(rel_w)) =
            (scores, rel_h, rel_w)
        else {
            candle_core::bail!("{}: f32 only", self.name());
        };
        let (Some((s0, s1)), Some((h0, h1)), Some((w0, w1))) =
            (ls.contiguous_offsets(), lh.contiguous_offsets(), lw.contiguous_offsets())
        else {
            candle_core::bail!("{}: inputs must be contiguous", self.name());
        };
        let (scores, rel_h, rel_w) = (&scores[s0..s1], &rel_h[h0..h1], &rel_w[w0..w1]);
        let mut out = scores.to_vec();
        // One row per (batch*head, query position); rel_h/rel_w hold S entries per row.
        out.par_chunks_mut(n)
            .zip(rel_h.par_chunks(s).zip(rel_w.par_chunks(s)))
            .for_each(|(row, (rh, rw))| relpos_softmax_row(row, rh, rw));
        Ok((CpuStorage::F32(out), ls.shape().clone()))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        scores: &candle_core::CudaStorage,
        ls: &Layout,
        rel_h: &candle_core::CudaStorage,
        lh: &Layout,
        rel_w: &candle_core::CudaStorage,
        lw: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::relpos_softmax::relpos_softmax(
            self.side,
            (scores, ls),
            (rel_h, lh),
            (rel_w, lw),
        )
    }
}

/// `softmax(scores + rel_h[..., :, None] + rel_w[..., None, :])` for `scores` `[BH, R, N]`
/// (`R` query rows: all `N = side²` of them, or a tile of whole grid rows, `R = r * side`),
/// `rel_h`, `rel_w` `[BH, r, S, S]` indexed `[b, h, w, k]` (query `(h, w)`, key row or column
/// `k`).
pub fn relpos_softmax(
    scores: &Tensor,
    rel_h: &Tensor,
    rel_w: &Tensor,
    side: usize,
) -> Result<Tensor> {
    let dtype = scores.dtype();
    if scores.device().is_cpu() {
        let f32c = |t: &Tensor| t.to_dtype(DType::F32).and_then(|t| t.contiguous());
        let out = f32c(scores)?.apply_op3_no_bwd(
            &f32c(rel_h)?,
            &f32c(rel_w)?,
            &RelPosSoftmax { side },
        )?;
        return out.to_dtype(dtype);
    }
    if scores.device().is_cuda() && matches!(dtype, DType::BF16 | DType::F32) {
        // One kernel (`crate::cuda::relpos_softmax`); the inputs share the scores' dtype.
        let c = |t: &Tensor| t.to_dtype(dtype).and_then(|t| t.contiguous());
        return c(scores)?.apply_op3_no_bwd(&c(rel_h)?, &c(rel_w)?, &RelPosSoftmax { side });
    }
    relpos_softmax_broadcast(scores, rel_h, rel_w, side)
}

/// The same function from candle's broadcast ops, for any device and dtype.
fn relpos_softmax_broadcast(
    scores: &Tensor,
    rel_h: &Tensor,
    rel_w: &Tensor,
    side: usize,
) -> Result<Tensor> {
    let (bh, rows, n) = scores.dims3()?;
    let s = side;
    if n != s * s || rows % s != 0 {
        candle_core::bail!(
            "relpos softmax: scores {:?} are not whole rows of a {s}x{s} grid",
            scores.dims()
        );
    }
    // [b, (h, w), (kh, kw)] -> [b, h, w, kh, kw]: rel_h broadcasts over kw, rel_w over kh.
    let summed = scores
        .reshape((bh, rows / s, s, s, s))?
        .broadcast_add(&rel_h.unsqueeze(4)?)?
        .broadcast_add(&rel_w.unsqueeze(3)?)?
        .reshape((bh, rows, n))?;
    softmax_last_dim(&summed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, IndexOp};

    /// Max |a - b| over two tensors of the same shape.
    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b).unwrap().abs().unwrap().flatten_all().unwrap().max(0).unwrap().to_scalar().unwrap()
    }

    /// The broadcast path (what GPUs run) equals the fused CPU op on whole grids and on tiles of
    /// grid rows, which is how SAM's tiled attention calls it.
    #[test]
    fn the_broadcast_path_equals_the_fused_op_on_grids_and_row_tiles() -> Result<()> {
        let dev = Device::Cpu;
        let (bh, s) = (3, 6);
        let n = s * s;
        let scores = Tensor::randn(0f32, 2.0, (bh, n, n), &dev)?;
        let rel_h = Tensor::randn(0f32, 1.0, (bh, s, s, s), &dev)?;
        let rel_w = Tensor::randn(0f32, 1.0, (bh, s, s, s), &dev)?;
        let fused = relpos_softmax(&scores, &rel_h, &rel_w, s)?;
        let broadcast = relpos_softmax_broadcast(&scores, &rel_h, &rel_w, s)?;
        assert!(max_diff(&fused, &broadcast) < 1e-6);
        // Unfused by hand, one element: softmax over keys of s + rel_h[kh] + rel_w[kw].
        let (b, h, w) = (1, 2, 5);
        let row: Vec<f32> = scores.i((b, h * s + w))?.to_vec1()?;
        let (rh, rw): (Vec<f32>, Vec<f32>) =
            (rel_h.i((b, h, w))?.to_vec1()?, rel_w.i((b, h, w))?.to_vec1()?);
        let logits: Vec<f32> = (0..n).map(|k| row[k] + rh[k / s] + rw[k % s]).collect();
        let top = logits.iter().cloned().fold(f32::MIN, f32::max);
        let sum: f32 = logits.iter().map(|l| (l - top).exp()).sum();
        let want = (logits[7] - top).exp() / sum;
        let got: f32 = broadcast.i((b, h * s + w, 7))?.to_scalar()?;
        assert!((want - got).abs() < 1e-6, "{want} vs {got}");
        // Tiles of two grid rows, as `attention_tiled` narrows them.
        for h0 in (0..s).step_by(2) {
            let tile = scores.narrow(1, h0 * s, 2 * s)?;
            let (th, tw) = (rel_h.narrow(1, h0, 2)?, rel_w.narrow(1, h0, 2)?);
            let want = fused.narrow(1, h0 * s, 2 * s)?;
            assert!(max_diff(&relpos_softmax(&tile, &th, &tw, s)?, &want) < 1e-6);
            assert!(max_diff(&relpos_softmax_broadcast(&tile, &th, &tw, s)?, &want) < 1e-6);
        }
        Ok(())
    }
}
