//! The decoder's element-wise work for a bf16 model, fused and vectorised per [`Isa`] like the
//! f32 kernels in `decoder.rs`: RMSNorm, `silu(gate) * up`, rotate-half RoPE and the residual
//! add. candle runs these as chains of bf16 ops that each widen, compute and round every
//! element (and its bf16 SiLU rounds inside the formula); after AMX made the linears fast they
//! were most of a bf16 prefill.
//!
//! Each kernel computes in f32 and rounds to bf16 exactly where PyTorch's bf16 ops of the
//! reference (HF Llama) do, one rounding per op, round-to-nearest-even:
//! - RMSNorm: `w * bf16(x32 * rsqrt(mean(x32²) + eps))`, the product rounded;
//! - MLP: `bf16(silu(g)) * u` (SiLU computed in f32 and rounded, as PyTorch's kernel does);
//! - RoPE: `bf16(x * cos) + bf16(rotate_half(x) * sin)`, tables in bf16;
//! - residual: `a + b`.

use half::bf16;
use rayon::prelude::*;

use super::decoder::{in_chunks, rope_rows};
use super::{dot_impl, exp_f32};
use crate::isa::{on_isa, Isa};

/// Elements below which a parallel task is not worth it.
const MIN_PARALLEL: usize = 1 << 14;

/// bf16 to f32 (exact).
#[inline(always)]
fn widen(v: bf16) -> f32 {
    f32::from_bits(u32::from(v.to_bits()) << 16)
}

/// f32 to bf16, round-to-nearest-even, NaN kept a (quiet) NaN: PyTorch's conversion, written
/// without branches so the loops vectorise.
#[inline(always)]
fn narrow(x: f32) -> bf16 {
    let b = x.to_bits();
    let rounded = (b.wrapping_add(0x7fff + ((b >> 16) & 1)) >> 16) as u16;
    let nan = ((b >> 16) | 0x40) as u16;
    bf16::from_bits(if x.is_nan() { nan } else { rounded })
}

/// `x` rounded to bf16 and back: one of the reference's intermediate roundings.
#[inline(always)]
fn round(x: f32) -> f32 {
    widen(narrow(x))
}

/// HF `LlamaRMSNorm` on bf16 rows of `weight.len()` elements.
pub fn rms_norm_bf16(dst: &mut [bf16], src: &[bf16], weight: &[bf16], eps: f32) {
    rms_norm_bf16_with(Isa::current(), dst, src, weight, eps)
}

/// [`rms_norm_bf16`] on the path `isa`.
pub fn rms_norm_bf16_with(isa: Isa, dst: &mut [bf16], src: &[bf16], weight: &[bf16], eps: f32) {
    let dim = weight.len();
    assert!(
        dim > 0 && src.len().is_multiple_of(dim) && dst.len() == src.len(),
        "rows of {dim} expected"
    );
    let rows_per_task = (MIN_PARALLEL / dim).max(1);
    dst.par_chunks_mut(dim * rows_per_task).zip(src.par_chunks(dim * rows_per_task)).for_each(
        |(dst, src)| {
            let mut buf = vec![0f32; dim];
            let row = buf.as_mut_slice();
            on_isa!(isa, <L> |dst: &mut [bf16], src: &[bf16], weight: &[bf16], eps: f32, row: &mut [f32]| -> () {
                for (d, s) in dst.chunks_exact_mut(weight.len()).zip(src.chunks_exact(weight.len())) {
                    for (r, &v) in row.iter_mut().zip(s) {
                        *r = widen(v);
                    }
                    let inv = 1.0 / (dot_impl::<L>(row, row) / row.len() as f32 + eps).sqrt();
                    for ((d, &x), &w) in d.iter_mut().zip(row.iter()).zip(weight) {
                        *d = narrow(widen(w) * round(x * inv));
                    }
                }
            })
        },
    );
}

/// `dst = bf16(silu(gate)) * up`, the gated MLP's activation of a bf16 model.
pub fn silu_mul_bf16(dst: &mut [bf16], gate: &[bf16], up: &[bf16]) {
    silu_mul_bf16_with(Isa::current(), dst, gate, up)
}

/// [`silu_mul_bf16`] on the path `isa`.
pub fn silu_mul_bf16_with(isa: Isa, dst: &mut [bf16], gate: &[bf16], up: &[bf16]) {
    in_chunks(dst, gate, up, |dst, gate, up| {
        on_isa!(isa, <L> |dst: &mut [bf16], gate: &[bf16], up: &[bf16]| -> () {
            for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
                let g = widen(g);
                *d = narrow(round(g / (1.0 + exp_f32(-g))) * widen(u));
            }
        })
    });
}

/// `dst = a + b` in bf16 (the residual stream of a bf16 model).
pub fn add_bf16(dst: &mut [bf16], a: &[bf16], b: &[bf16]) {
    add_bf16_with(Isa::current(), dst, a, b)
}

/// [`add_bf16`] on the path `isa`.
pub fn add_bf16_with(isa: Isa, dst: &mut [bf16], a: &[bf16], b: &[bf16]) {
    in_chunks(dst, a, b, |dst, a, b| {
        on_isa!(isa, <L> |dst: &mut [bf16], a: &[bf16], b: &[bf16]| -> () {
            for ((d, &x), &y) in dst.iter_mut().zip(a).zip(b) {
                *d = narrow(widen(x) + widen(y));
            }
        })
    });
}

/// Rotate-half RoPE of bf16 `x` `[rows, heads, head_dim]`; row `r` is at `positions[r]`, and
/// `cos`/`sin` are bf16 `[max_pos, head_dim]` tables.
pub fn rope_bf16(
    dst: &mut [bf16],
    x: &[bf16],
    cos: &[bf16],
    sin: &[bf16],
    positions: &[u32],
    heads: usize,
) {
    rope_bf16_with(Isa::current(), dst, x, cos, sin, positions, heads)
}

/// [`rope_bf16`] on the path `isa`.
pub fn rope_bf16_with(
    isa: Isa,
    dst: &mut [bf16],
    x: &[bf16],
    cos: &[bf16],
    sin: &[bf16],
    positions: &[u32],
    heads: usize,
) {
    rope_rows(dst, x, cos, sin, positions, heads, |dst, x, cos, sin, d| {
        on_isa!(isa, <L> |dst: &mut [bf16], x: &[bf16], cos: &[bf16], sin: &[bf16], d: usize| -> () {
            let half = d / 2;
            for (dh, xh) in dst.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                let (x1, x2) = xh.split_at(half);
                let (d1, d2) = dh.split_at_mut(half);
                // rotate_half(x) = cat(-x2, x1); each product rounded, then the sum.
                for i in 0..half {
                    let (a, b) = (widen(x1[i]), widen(x2[i]));
                    d1[i] = narrow(round(a * widen(cos[i])) + round(-b * widen(sin[i])));
                    let (c, s) = (widen(cos[half + i]), widen(sin[half + i]));
                    d2[i] = narrow(round(b * c) + round(a * s));
                }
            }
        })
    });
}

#[cfg(test)]
mod tests;
