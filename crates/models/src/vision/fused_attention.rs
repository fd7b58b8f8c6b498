//! Attention fused per (head, block of query rows) for f32 on the CPU.
//!
//! `softmax(scale * q k^T + bias) v` is computed one head and a few dozen query rows at a time:
//! the score tile (at most 1 MiB) is produced by one GEMM into a per-task buffer, gets the
//! optional SAM relative-position terms and the softmax while it is still in cache, and is
//! multiplied by `v` straight into the output. Parallelism is over heads (each GEMM runs on one
//! thread), which suits the many small matrices of windowed attention and never materialises the
//! `[heads, N, N]` score tensor that costs a full-size memory round trip per op when unfused.
//! Other devices and dtypes use the composed candle ops in the callers.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use gemm::Parallelism;
use rayon::prelude::*;

use crate::kernels::{relpos_softmax_row, softmax_row};

/// Score-tile budget per task, in elements (1 MiB of f32).
const TILE_ELEMS: usize = 1 << 18;

struct FusedAttention {
    scale: f32,
    /// SAM window / grid side when relative positions are added.
    side: Option<usize>,
}

fn contiguous<'a>(s: &'a CpuStorage, l: &Layout, name: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(data) = s else {
        candle_core::bail!("fused attention: {name} must be f32")
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("fused attention: {name} must be contiguous")
    };
    Ok(&data[a..b])
}

impl FusedAttention {
    fn run(&self, qkv: &[f32], qkv_l: &Layout, rel: Option<&[f32]>) -> Result<(CpuStorage, Shape)> {
        let (three, bh, n, d) = qkv_l.shape().dims4()?;
        if three != 3 {
            candle_core::bail!("fused attention: expected [3, BH, N, D], got {:?}", qkv_l.shape());
        }
        let s = self.side.unwrap_or(0);
        if let Some(rel) = rel {
            if s * s != n || rel.len() != bh * n * 2 * s {
                candle_core::bail!(
                    "fused attention: relative-position terms do not match {n} tokens"
                );
            }
        }
        let head = n * d;
        let (q, rest) = qkv.split_at(bh * head);
        let (k, v) = rest.split_at(bh * head);
        let rows = (TILE_ELEMS / n).clamp(1, n);
        let mut out = vec![0f32; bh * head];
        out.par_chunks_mut(head).enumerate().for_each(|(b, out_h)| {
            let (q, k, v) =
                (&q[b * head..][..head], &k[b * head..][..head], &v[b * head..][..head]);
            let mut scores = vec![0f32; rows * n];
            for r0 in (0..n).step_by(rows) {
                let nr = rows.min(n - r0);
                // SAFETY: all pointers address in-bounds regions of the slices above with the
                // strides given: q rows [r0, r0 + nr) x d, k^T as d x n (column stride d), the
                // score tile nr x n, v n x d, and out rows [r0, r0 + nr) x d.
                unsafe {
                    gemm::gemm(
                        nr,
                        n,
                        d,
                        scores.as_mut_ptr(),
                        1,
                        n as isize,
                        false,
                        q.as_ptr().add(r0 * d),
                        1,
                        d as isize,
                        k.as_ptr(),
                        d as isize,
                        1,
                        0.0,
                        self.scale,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
                for (i, row) in scores[..nr * n].chunks_exact_mut(n).enumerate() {
                    match rel {
                        Some(rel) => {
                            let r = &rel[(b * n + r0 + i) * 2 * s..][..2 * s];
                            relpos_softmax_row(row, &r[..s], &r[s..]);
                        }
                        None => softmax_row(row),
                    }
                }
                unsafe {
                    gemm::gemm(
                        nr,
                        d,
                        n,
                        out_h.as_mut_ptr().add(r0 * d),
                        1,
                        d as isize,
                        false,
                        scores.as_ptr(),
                        1,
                        n as isize,
                        v.as_ptr(),
                        1,
                        d as isize,
                        0.0,
                        1.0,
                        false,
                        false,
                        false,
                        Parallelism::None,
                    );
                }
            }
        });
        Ok((CpuStorage::F32(out), Shape::from_dims(&[bh, n, d])))
    }
}

impl CustomOp1 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous(s, l, "qkv")?, l, None)
    }
}

impl CustomOp2 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-relpos"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(contiguous(s1, l1, "qkv")?, l1, Some(contiguous(s2, l2, "rel")?))
    }
}

/// Whether [`fused_attention`] applies to `t` (f32 on the CPU).
pub fn is_supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `softmax(scale * q k^T [+ rel]) v` for `qkv` `[3, BH, N, D]`, giving `[BH, N, D]`. `rel`, when
/// given, is `[BH, N, 2S]`: the SAM `rel_h` then `rel_w` terms of each query row (`N = S * S`).
pub fn fused_attention(qkv: &Tensor, rel: Option<(&Tensor, usize)>, scale: f64) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    match rel {
        None => qkv.apply_op1_no_bwd(&FusedAttention { scale: scale as f32, side: None }),
        Some((rel, side)) => qkv.apply_op2_no_bwd(
            &rel.contiguous()?,
            &FusedAttention { scale: scale as f32, side: Some(side) },
        ),
    }
}
