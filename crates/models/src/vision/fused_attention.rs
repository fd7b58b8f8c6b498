//! Attention fused per (head, block of query rows) for f32 on the CPU.
//!
//! `softmax(scale * q k^T + bias) v` is computed one head and a few dozen to a few hundred query
//! rows at a time: the score tile (half of L2) is produced by one GEMM into a per-task buffer,
//! gets the optional SAM relative-position terms and the softmax while it is still in cache,
//! and is multiplied by `v` straight into the output. Parallelism is over heads (each GEMM runs
//! on one thread), which suits the many small matrices of windowed attention and never
//! materialises the `[heads, N, N]` score tensor that costs a full-size memory round trip per op
//! when unfused.
//!
//! Both GEMMs run the linears' micro-kernels ([`PackedWeight`], on the [`Isa`] the other kernels
//! use, so `DSVL_CPU_ISA` holds them too): a head's keys and values are packed once, as the
//! weights of `q kᵀ` and `p v`, and the query and score rows are read in place. Through the
//! `gemm` crate (packing both operands on every call) they took about 17 % of a VL-7B encode on
//! an AMD Zen 5; one thread, SAM's global blocks now run 12 % faster, its windows 5 % slower
//! (196 keys fill 7 panels of 32) and SigLIP's alike. Other devices and dtypes use the composed
//! candle ops in the callers.

use candle_core::{CpuStorage, CustomOp1, CustomOp2, Layout, Result, Shape, Tensor};
use rayon::prelude::*;

use crate::isa::Isa;
use crate::kernels::{relpos_softmax_row, softmax_row, PackPath, PackedWeight};

/// Score-tile budget per task, in elements: half of this core's share of L2 (512 KiB of f32
/// where it is not known), so a tile and the keys' and values' slices passing over it share L2
/// from `q kᵀ` through the softmax to `p v`. On an AMD Zen 5 (1 MiB of L2), one thread, an
/// eighth, a quarter, a half and all of L2 timed alike within the noise.
fn tile_elems() -> usize {
    crate::cpu_caches::share_of(2).unwrap_or(1 << 20) / 2 / std::mem::size_of::<f32>()
}

struct FusedAttention {
    scale: f32,
    /// The micro-kernels' path.
    isa: Isa,
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

/// A task's buffers: a tile's scaled query rows, its scores (`ldn` apart), and its output
/// rows where the head size is not whole panels.
struct Scratch {
    scaled: Vec<f32>,
    scores: Vec<f32>,
    padded: Vec<f32>,
}

impl FusedAttention {
    /// One head: `q`, `k`, `v` `[n, d]`, `rel` its `[n, 2S]` relative-position terms, into
    /// `out` `[n, d]`, `rows` query rows a tile.
    fn head(
        &self,
        scratch: &mut Scratch,
        (q, k, v): (&[f32], &[f32], &[f32]),
        rel: Option<(&[f32], usize)>,
        (n, d, rows, ldn): (usize, usize, usize, usize),
        out: &mut [f32],
    ) {
        // The keys as the weight of `q kᵀ` and `vᵀ` as that of `p v`, packed once a head.
        let keys = PackedWeight::pack_f32_on_this_thread(k, n, d, self.isa);
        let values = PackedWeight::pack_f32_transposed(v, n, d, self.isa);
        let ldd = values.padded_n();
        let Scratch { scaled, scores, padded } = scratch;
        for r0 in (0..n).step_by(rows) {
            let nr = rows.min(n - r0);
            // The reference scales q before the product (`(q * scale) @ k^T`).
            for (s, &x) in scaled.iter_mut().zip(&q[r0 * d..(r0 + nr) * d]) {
                *s = x * self.scale;
            }
            keys.matmul_into(scaled, d, nr, scores, ldn);
            for (i, row) in scores.chunks_exact_mut(ldn).take(nr).enumerate() {
                let row = &mut row[..n];
                match rel {
                    Some((rel, s)) => {
                        let r = &rel[(r0 + i) * 2 * s..][..2 * s];
                        relpos_softmax_row(row, &r[..s], &r[s..]);
                    }
                    None => softmax_row(row),
                }
            }
            if ldd == d {
                values.matmul_into(scores, ldn, nr, &mut out[r0 * d..], d);
            } else {
                values.matmul_into(scores, ldn, nr, padded, ldd);
                for (o, p) in out[r0 * d..].chunks_exact_mut(d).zip(padded.chunks(ldd)) {
                    o.copy_from_slice(&p[..d]);
                }
            }
        }
    }

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
        let path = PackPath::F32(self.isa);
        let whole = |cols: usize| cols.div_ceil(path.panel_width()) * path.panel_width();
        let (ldn, ldd) = (whole(n), whole(d));
        // Score rows a multiple of 4 KiB apart (4,096 keys) would put a row block's values in
        // one L1 set, which `p v` reads down the rows: one more cache line a row (SAM's global
        // blocks ran 15 % faster on an AMD Zen 5, two threads).
        let ldn = if ldn.is_multiple_of(1024) { ldn + 16 } else { ldn };
        // Whole row blocks of the micro-kernel a tile (60 rows, not 64, at 4,096 keys).
        let mr = path.row_block();
        let rows = (tile_elems() / ldn / mr * mr).clamp(mr.min(n), n);
        let mut out = vec![0f32; bh * head];
        out.par_chunks_mut(head).enumerate().for_each_init(
            // Per-task buffers, every value written before it is read.
            || Scratch {
                scaled: vec![0f32; rows * d],
                scores: vec![0f32; rows * ldn],
                padded: vec![0f32; if ldd == d { 0 } else { rows * ldd }],
            },
            |scratch, (b, out_h)| {
                let at = b * head..(b + 1) * head;
                let rel = rel.map(|rel| (&rel[b * n * 2 * s..][..n * 2 * s], s));
                let (q, k, v) = (&q[at.clone()], &k[at.clone()], &v[at]);
                self.head(scratch, (q, k, v), rel, (n, d, rows, ldn), out_h);
            },
        );
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
    fused_attention_with(Isa::current(), qkv, rel, scale)
}

/// [`fused_attention`] with the micro-kernels of `isa`.
fn fused_attention_with(
    isa: Isa,
    qkv: &Tensor,
    rel: Option<(&Tensor, usize)>,
    scale: f64,
) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let op = |side| FusedAttention { scale: scale as f32, isa, side };
    match rel {
        None => qkv.apply_op1_no_bwd(&op(None)),
        Some((rel, side)) => qkv.apply_op2_no_bwd(&rel.contiguous()?, &op(Some(side))),
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::ops::softmax_last_dim;

    /// The composed ops: `softmax((q * scale) kᵀ [+ rel_h + rel_w]) v`, rel `[BH, N, 2S]`.
    fn composed(qkv: &Tensor, rel: Option<(&Tensor, usize)>, scale: f64) -> Result<Tensor> {
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let scores = (q * scale)?.matmul(&k.t()?)?;
        let scores = match rel {
            None => scores,
            Some((rel, s)) => {
                let (bh, n, _) = rel.dims3()?;
                let rh = rel.narrow(2, 0, s)?.reshape((bh, n, s, 1))?;
                let rw = rel.narrow(2, s, s)?.reshape((bh, n, 1, s))?;
                let scores = scores.reshape((bh, n, s, s))?;
                scores.broadcast_add(&rh)?.broadcast_add(&rw)?.reshape((bh, n, n))?
            }
        };
        softmax_last_dim(&scores)?.matmul(&v)
    }

    /// Every kernel path against the composed ops: head sizes of whole panels and not (the
    /// padded output), key counts with partial panels, one and several row tiles (576 keys
    /// take two 1 MiB tiles), with and without SAM's relative positions.
    #[test]
    fn fused_attention_matches_the_composed_ops_on_every_path() -> Result<()> {
        let dev = Device::Cpu;
        for (bh, side, d) in [(3, 7, 16), (2, 14, 64), (2, 24, 40), (1, 5, 80)] {
            let n = side * side;
            let qkv = Tensor::randn(0f32, 1.0, (3, bh, n, d), &dev)?;
            let rel = Tensor::randn(0f32, 1.0, (bh, n, 2 * side), &dev)?;
            let scale = (d as f64).powf(-0.5);
            for rel in [None, Some((&rel, side))] {
                let want = composed(&qkv, rel, scale)?;
                for isa in Isa::supported() {
                    let got = fused_attention_with(isa, &qkv, rel, scale)?;
                    let diff = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                    let label = format!("{isa:?} bh {bh} n {n} d {d} rel {}", rel.is_some());
                    assert!(diff < 2e-6, "{label}: max |diff| {diff}");
                }
            }
        }
        Ok(())
    }
}
