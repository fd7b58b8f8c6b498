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
//! SAM's decomposed relative positions are computed here too, a head at a time from its
//! unscaled `q` and the gathered tables (two products of `S` rows per grid row and column),
//! instead of as `[BH, S, S, S]` tensors that candle permuted, concatenated and copied (4 % of
//! a VL-7B encode on an AMD Zen 5).
//!
//! Both GEMMs run the linears' micro-kernels ([`PackedWeight`], on the [`Isa`] the other kernels
//! use, so `DSVL_CPU_ISA` holds them too): a head's keys and values are packed once, as the
//! weights of `q kᵀ` and `p v`, and the query and score rows are read in place. Through the
//! `gemm` crate (packing both operands on every call) they took about 17 % of a VL-7B encode on
//! an AMD Zen 5; one thread, SAM's global blocks now run 12 % faster, its windows 5 % slower
//! (196 keys fill 7 panels of 32) and SigLIP's alike. Other devices and dtypes use the composed
//! candle ops in the callers.

use candle_core::{CpuStorage, CustomOp1, CustomOp3, Layout, Result, Shape, Tensor};
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

/// A task's buffers: a tile's scaled query rows, its scores (`ldn` apart), its output rows
/// where the head size is not whole panels, and the head's relative-position terms.
struct Scratch {
    scaled: Vec<f32>,
    scores: Vec<f32>,
    padded: Vec<f32>,
    terms: Vec<f32>,
}

/// SAM's decomposed relative positions (MViTv2): for grid row `h` the table `Rh[h]` (`[S, D]`,
/// a row per key row `kh`), for grid column `w` the table `Rw[w]`, packed once a call as the
/// weights of `q Rh[h]ᵀ` and `q Rw[w]ᵀ` and shared by every head.
struct RelTables {
    side: usize,
    /// `S` rounded up to whole panels: each query row's terms are `rel_h` then `rel_w`, this
    /// many apart.
    width: usize,
    h: Vec<PackedWeight>,
    w: Vec<PackedWeight>,
}

impl RelTables {
    /// `rh`, `rw`: `[S, S, D]`, `Rh[h][kh] = rel_pos_h[h - kh + S - 1]` (likewise `Rw`).
    fn pack(rh: &[f32], rw: &[f32], side: usize, d: usize, isa: Isa) -> Self {
        let tables = |t: &[f32]| -> Vec<PackedWeight> {
            t.par_chunks(side * d)
                .map(|t| PackedWeight::pack_f32_on_this_thread(t, side, d, isa))
                .collect()
        };
        let (h, w) = (tables(rh), tables(rw));
        let width = h.first().map_or(side, PackedWeight::padded_n);
        Self { side, width, h, w }
    }

    /// A head's terms from its unscaled `q` (`[S*S, D]`, the reference's order): `terms` row
    /// `(h, w)` (`2 * width` apart) gets `rel_h[kh] = q(h,w) · Rh[h][kh]` then, from `width`,
    /// `rel_w[kw] = q(h,w) · Rw[w][kw]`. A grid row's queries are consecutive rows of `q`, a
    /// grid column's are `S` rows apart: one product of `S` rows per table, read in place.
    fn terms(&self, q: &[f32], d: usize, terms: &mut [f32]) {
        let (s, ld) = (self.side, 2 * self.width);
        for (h, table) in self.h.iter().enumerate() {
            table.matmul_into(&q[h * s * d..], d, s, &mut terms[h * s * ld..], ld);
        }
        for (w, table) in self.w.iter().enumerate() {
            table.matmul_into(&q[w * d..], s * d, s, &mut terms[w * ld + self.width..], s * ld);
        }
    }
}

impl FusedAttention {
    /// One head: `q`, `k`, `v` `[n, d]`, with SAM's relative positions where `rel` is given,
    /// into `out` `[n, d]`, `rows` query rows a tile.
    fn head(
        &self,
        scratch: &mut Scratch,
        (q, k, v): (&[f32], &[f32], &[f32]),
        rel: Option<&RelTables>,
        (n, d, rows, ldn): (usize, usize, usize, usize),
        out: &mut [f32],
    ) {
        // The keys as the weight of `q kᵀ` and `vᵀ` as that of `p v`, packed once a head.
        let keys = PackedWeight::pack_f32_on_this_thread(k, n, d, self.isa);
        let values = PackedWeight::pack_f32_transposed(v, n, d, self.isa);
        let ldd = values.padded_n();
        let Scratch { scaled, scores, padded, terms } = scratch;
        if let Some(rel) = rel {
            rel.terms(q, d, terms);
        }
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
                    Some(rel) => {
                        let t = &terms[(r0 + i) * 2 * rel.width..];
                        relpos_softmax_row(row, &t[..rel.side], &t[rel.width..][..rel.side]);
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

    /// `qkv` `[3, BH, N, D]`; `rel` SAM's gathered tables `Rh` and `Rw`, `[S, S, D]` each.
    fn run(
        &self,
        qkv: &[f32],
        qkv_l: &Layout,
        rel: Option<(&[f32], &[f32])>,
    ) -> Result<(CpuStorage, Shape)> {
        let (three, bh, n, d) = qkv_l.shape().dims4()?;
        if three != 3 {
            candle_core::bail!("fused attention: expected [3, BH, N, D], got {:?}", qkv_l.shape());
        }
        let s = self.side.unwrap_or(0);
        let rel = match rel {
            Some((rh, rw)) if s * s == n && rh.len() == n * d && rw.len() == n * d => {
                Some(RelTables::pack(rh, rw, s, d, self.isa))
            }
            Some(_) => candle_core::bail!(
                "fused attention: relative-position tables do not match {n} tokens of {d}"
            ),
            None => None,
        };
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
        // Whole row blocks of the micro-kernel a tile (24 rows, not 31, at 4,096 keys and 1 MiB
        // of L2).
        let mr = path.row_block();
        let rows = (tile_elems() / ldn / mr * mr).clamp(mr.min(n), n);
        let mut out = vec![0f32; bh * head];
        out.par_chunks_mut(head).enumerate().for_each_init(
            // Per-task buffers, every value written before it is read.
            || Scratch {
                scaled: vec![0f32; rows * d],
                scores: vec![0f32; rows * ldn],
                padded: vec![0f32; if ldd == d { 0 } else { rows * ldd }],
                terms: vec![0f32; rel.as_ref().map_or(0, |r| n * 2 * r.width)],
            },
            |scratch, (b, out_h)| {
                let at = b * head..(b + 1) * head;
                let (q, k, v) = (&q[at.clone()], &k[at.clone()], &v[at]);
                self.head(scratch, (q, k, v), rel.as_ref(), (n, d, rows, ldn), out_h);
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

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention-relpos"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let tables = (contiguous(s2, l2, "rel_pos_h")?, contiguous(s3, l3, "rel_pos_w")?);
        self.run(contiguous(s1, l1, "qkv")?, l1, Some(tables))
    }
}

/// Whether [`fused_attention`] applies to `t` (f32 on the CPU).
pub fn is_supported(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == candle_core::DType::F32
}

/// `softmax(scale * q k^T [+ rel]) v` for `qkv` `[3, BH, N, D]`, giving `[BH, N, D]`. `rel`, when
/// given, is SAM's gathered relative-position tables `Rh` and `Rw` (`[S, S, D]` each,
/// `N = S * S`), whose terms against the unscaled `q` are added to the scores
/// (`scores[(h,w), (kh,kw)] += q(h,w)·Rh[h][kh] + q(h,w)·Rw[w][kw]`).
pub fn fused_attention(
    qkv: &Tensor,
    rel: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    fused_attention_with(Isa::current(), qkv, rel, scale)
}

/// [`fused_attention`] with the micro-kernels of `isa`.
fn fused_attention_with(
    isa: Isa,
    qkv: &Tensor,
    rel: Option<(&Tensor, &Tensor)>,
    scale: f64,
) -> Result<Tensor> {
    let qkv = qkv.contiguous()?;
    let scale = scale as f32;
    match rel {
        None => qkv.apply_op1_no_bwd(&FusedAttention { scale, isa, side: None }),
        Some((rh, rw)) => {
            let side = rh.dim(0)?;
            let op = FusedAttention { scale, isa, side: Some(side) };
            qkv.apply_op3_no_bwd(&rh.contiguous()?, &rw.contiguous()?, &op)
        }
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::ops::softmax_last_dim;

    /// The composed ops the other devices run: `softmax((q * scale) kᵀ [+ rel_h + rel_w]) v`,
    /// the terms from SAM's own `decomposed_rel_pos`; run here in f64.
    fn composed(qkv: &Tensor, rel: Option<(&Tensor, &Tensor)>, scale: f64) -> Result<Tensor> {
        let (q, k, v) = (qkv.i(0)?, qkv.i(1)?, qkv.i(2)?);
        let scores = (&q * scale)?.matmul(&k.t()?)?;
        let scores = match rel {
            None => scores,
            Some((rh, rw)) => {
                let (bh, n, _) = q.dims3()?;
                let s = rh.dim(0)?;
                let (rel_h, rel_w) = super::super::sam::decomposed_rel_pos(&q, rh, rw, s)?;
                let scores = scores.reshape((bh, s, s, s, s))?;
                let rel_h = rel_h.reshape((bh, s, s, s, 1))?;
                let rel_w = rel_w.reshape((bh, s, s, 1, s))?;
                scores.broadcast_add(&rel_h)?.broadcast_add(&rel_w)?.reshape((bh, n, n))?
            }
        };
        softmax_last_dim(&scores)?.matmul(&v)
    }

    /// Uniform values of standard deviation `sd`, the same on every run (xorshift).
    fn noise(shape: impl Into<Shape>, sd: f32, seed: u64) -> Result<Tensor> {
        let shape = shape.into();
        let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ seed;
        let v: Vec<f32> = (0..shape.elem_count())
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                ((x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0) * sd * 3f32.sqrt()
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu)
    }

    /// Every kernel path against the composed ops: head sizes of whole panels and not (the
    /// padded output), key counts with partial panels, one and several row tiles (576 keys
    /// take two or three tiles of half an L2), with and without SAM's relative positions.
    #[test]
    fn fused_attention_matches_the_composed_ops_on_every_path() -> Result<()> {
        for (bh, side, d) in [(3, 7, 16), (2, 14, 64), (2, 24, 40), (1, 5, 80)] {
            let n = side * side;
            let qkv = noise((3, bh, n, d), 1.0, 1)?;
            // Tables whose terms are about the scores' size (trained SAM tables are small):
            // much larger terms make every row one spike, and the check about f32 rounding of
            // spiky logits rather than about the kernel.
            let rh = noise((side, side, d), 0.1, 2)?;
            let rw = noise((side, side, d), 0.1, 3)?;
            let scale = (d as f64).powf(-0.5);
            for rel in [None, Some((&rh, &rw))] {
                // In f64: what is left is the fused kernel's own f32 rounding.
                let wide = |t: &Tensor| t.to_dtype(candle_core::DType::F64);
                let (qkv64, rh64, rw64) = (wide(&qkv)?, wide(&rh)?, wide(&rw)?);
                let want = composed(&qkv64, rel.map(|_| (&rh64, &rw64)), scale)?
                    .to_dtype(candle_core::DType::F32)?;
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
