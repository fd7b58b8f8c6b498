//! SAM's attention epilogue fused into one pass: add the decomposed relative positions to the
//! scores and take the softmax, row by row.
//!
//! Unfused, `scores + rel_h[..., None] + rel_w[..., None, :]` followed by a softmax makes four
//! passes over a `[B*heads, N, N]` tensor (805 MB per image for a SAM-B global block). On the
//! CPU this op reads each score once, adds the two terms in the reference's order
//! (`(s + rel_h) + rel_w`), and normalises in place, in f32. Other devices (and dtypes) take
//! the generic broadcast path with identical maths.

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
}

/// `softmax(scores + rel_h[..., :, None] + rel_w[..., None, :])` for `scores` `[BH, N, N]`,
/// `rel_h`, `rel_w` `[BH, S, S, S]` indexed `[b, h, w, k]` (query `(h, w)`, key row or column `k`).
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
    let (bh, n, _) = scores.dims3()?;
    let s = side;
    let summed = scores
        .reshape((bh, s, s, s, s))?
        .broadcast_add(&rel_h.unsqueeze(4)?)?
        .broadcast_add(&rel_w.unsqueeze(3)?)?
        .reshape((bh, n, n))?;
    softmax_last_dim(&summed)
}
