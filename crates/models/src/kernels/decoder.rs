//! The decoder's element-wise work in f32, fused and vectorised for each [`Isa`]: RMSNorm,
//! the MLP's `silu(gate) * up` and rotate-half RoPE. Each follows the reference's (HF Llama's)
//! op order, so the only difference from PyTorch is the summation order of RMSNorm's mean
//! (lane-split partial sums, as PyTorch's own vectorised reduction does too).

use rayon::prelude::*;

use super::{dot_impl, exp_f32};
use crate::isa::{on_isa, Isa};

/// Rows below this many elements are not worth a parallel task.
const MIN_PARALLEL: usize = 1 << 14;

#[inline(always)]
fn rms_norm_row<const L: usize>(dst: &mut [f32], src: &[f32], weight: &[f32], eps: f32) {
    let mean = dot_impl::<L>(src, src) / src.len() as f32;
    let inv = 1.0 / (mean + eps).sqrt();
    for ((d, &x), &w) in dst.iter_mut().zip(src).zip(weight) {
        // HF: `hidden * rsqrt(variance + eps)`, then `weight * hidden`.
        *d = w * (x * inv);
    }
}

/// HF `LlamaRMSNorm` in f32 over rows of `weight.len()` elements.
pub fn rms_norm(dst: &mut [f32], src: &[f32], weight: &[f32], eps: f32) {
    rms_norm_with(Isa::current(), dst, src, weight, eps)
}

/// [`rms_norm`] on the path `isa`.
pub fn rms_norm_with(isa: Isa, dst: &mut [f32], src: &[f32], weight: &[f32], eps: f32) {
    let dim = weight.len();
    assert!(
        dim > 0 && src.len().is_multiple_of(dim) && dst.len() == src.len(),
        "rows of {dim} expected"
    );
    let rows_per_task = (MIN_PARALLEL / dim).max(1);
    dst.par_chunks_mut(dim * rows_per_task).zip(src.par_chunks(dim * rows_per_task)).for_each(
        |(dst, src)| {
            on_isa!(isa, <L> |dst: &mut [f32], src: &[f32], weight: &[f32], eps: f32| -> () {
                for (d, s) in dst.chunks_exact_mut(weight.len()).zip(src.chunks_exact(weight.len())) {
                    rms_norm_row::<L>(d, s, weight, eps)
                }
            })
        },
    );
}

#[inline(always)]
fn silu_mul_impl(dst: &mut [f32], gate: &[f32], up: &[f32]) {
    for ((d, &g), &u) in dst.iter_mut().zip(gate).zip(up) {
        // PyTorch's SiLU: x / (1 + exp(-x)).
        *d = g / (1.0 + exp_f32(-g)) * u;
    }
}

/// `dst = silu(gate) * up`, the gated MLP's activation.
pub fn silu_mul(dst: &mut [f32], gate: &[f32], up: &[f32]) {
    silu_mul_with(Isa::current(), dst, gate, up)
}

/// [`silu_mul`] on the path `isa`.
pub fn silu_mul_with(isa: Isa, dst: &mut [f32], gate: &[f32], up: &[f32]) {
    in_chunks(dst, gate, up, |dst, gate, up| {
        on_isa!(isa, <L> |dst: &mut [f32], gate: &[f32], up: &[f32]| -> () {
            silu_mul_impl(dst, gate, up)
        })
    });
}

/// `f(dst, a, b)` over matching chunks of the three, in parallel: the element-wise kernels'
/// split (lengths checked).
pub(super) fn in_chunks<D: Send, E: Sync>(
    dst: &mut [D],
    a: &[E],
    b: &[E],
    f: impl Fn(&mut [D], &[E], &[E]) + Sync,
) {
    assert!(a.len() == dst.len() && b.len() == dst.len(), "element-wise: lengths differ");
    dst.par_chunks_mut(MIN_PARALLEL)
        .zip(a.par_chunks(MIN_PARALLEL))
        .zip(b.par_chunks(MIN_PARALLEL))
        .for_each(|((dst, a), b)| f(dst, a, b));
}

#[inline(always)]
fn rope_head(dst: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32]) {
    let half = x.len() / 2;
    let (x1, x2) = x.split_at(half);
    let (d1, d2) = dst.split_at_mut(half);
    // HF: `x * cos + rotate_half(x) * sin`, rotate_half(x) = cat(-x2, x1).
    for i in 0..half {
        d1[i] = x1[i] * cos[i] + (-x2[i]) * sin[i];
    }
    for i in 0..half {
        d2[i] = x2[i] * cos[half + i] + x1[i] * sin[half + i];
    }
}

/// Rotate-half RoPE of `x` `[rows, heads, head_dim]`; row `r` is at `positions[r]`, and
/// `cos`/`sin` are `[max_pos, head_dim]` tables.
pub fn rope(dst: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], positions: &[u32], heads: usize) {
    rope_with(Isa::current(), dst, x, cos, sin, positions, heads)
}

/// [`rope`] on the path `isa`.
pub fn rope_with(
    isa: Isa,
    dst: &mut [f32],
    x: &[f32],
    cos: &[f32],
    sin: &[f32],
    positions: &[u32],
    heads: usize,
) {
    rope_rows(dst, x, cos, sin, positions, heads, |dst, x, cos, sin, d| {
        on_isa!(isa, <L> |dst: &mut [f32], x: &[f32], cos: &[f32], sin: &[f32], d: usize| -> () {
            for (dh, xh) in dst.chunks_exact_mut(d).zip(x.chunks_exact(d)) {
                rope_head(dh, xh, cos, sin)
            }
        })
    });
}

/// RoPE's split: `f(dst, x, cos, sin, head_dim)` per row of `x` (`[rows, heads, head_dim]`),
/// in parallel, with the row's position's `cos`/`sin` (shapes and positions checked).
pub(super) fn rope_rows<E: Send + Sync>(
    dst: &mut [E],
    x: &[E],
    cos: &[E],
    sin: &[E],
    positions: &[u32],
    heads: usize,
    f: impl Fn(&mut [E], &[E], &[E], &[E], usize) + Sync,
) {
    let rows = positions.len();
    assert!(rows > 0 && heads > 0 && x.len().is_multiple_of(rows * heads) && dst.len() == x.len());
    let d = x.len() / (rows * heads);
    assert!(
        d.is_multiple_of(2) && cos.len() == sin.len() && cos.len().is_multiple_of(d),
        "rope: bad tables"
    );
    let row = heads * d;
    dst.par_chunks_mut(row).zip(x.par_chunks(row)).zip(positions).with_min_len(4).for_each(
        |((dst, x), &p)| {
            let p = p as usize * d;
            assert!(p + d <= cos.len(), "rope: position beyond the table");
            f(dst, x, &cos[p..p + d], &sin[p..p + d], d)
        },
    );
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::tests::{paths, values};

    #[test]
    fn rms_norm_matches_f64_on_every_path() {
        for dim in [1, 7, 16, 33, 2048] {
            let rows = 5;
            let src = values(rows * dim, dim);
            let weight = values(dim, 7);
            let eps = 1e-6;
            for isa in paths() {
                let mut dst = vec![0f32; src.len()];
                rms_norm_with(isa, &mut dst, &src, &weight, eps);
                for (r, (d, s)) in dst.chunks(dim).zip(src.chunks(dim)).enumerate() {
                    let ms: f64 = s.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>() / dim as f64;
                    let inv = 1.0 / (ms + f64::from(eps)).sqrt();
                    for i in 0..dim {
                        let want = f64::from(weight[i]) * f64::from(s[i]) * inv;
                        let got = f64::from(d[i]);
                        assert!((got - want).abs() < 1e-5 * want.abs().max(1.0), "{isa:?} {r} {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn silu_mul_matches_f64_on_every_path() {
        let mut gate = values(40_037, 11);
        gate.extend([-120.0, -88.0, 0.0, 88.0, 120.0]);
        let up = values(gate.len(), 12);
        for isa in paths() {
            let mut dst = vec![0f32; gate.len()];
            silu_mul_with(isa, &mut dst, &gate, &up);
            for ((&got, &g), &u) in dst.iter().zip(&gate).zip(&up) {
                let (g, u) = (f64::from(g), f64::from(u));
                let want = g / (1.0 + (-g).exp()) * u;
                assert!(
                    (f64::from(got) - want).abs() < 1e-6 * want.abs().max(1.0),
                    "{isa:?} silu({g}) * {u}: {got} vs {want}"
                );
            }
        }
    }

    #[test]
    fn rope_matches_the_rotate_half_definition_on_every_path() {
        let (rows, heads, d, max_pos) = (6, 3, 64, 40);
        let x = values(rows * heads * d, 13);
        let cos = values(max_pos * d, 14);
        let sin = values(max_pos * d, 15);
        let positions: Vec<u32> = vec![0, 39, 7, 7, 12, 1];
        for isa in paths() {
            let mut dst = vec![0f32; x.len()];
            rope_with(isa, &mut dst, &x, &cos, &sin, &positions, heads);
            for (r, &pos) in positions.iter().enumerate() {
                let p = pos as usize * d;
                for h in 0..heads {
                    let o = (r * heads + h) * d;
                    for i in 0..d {
                        let rot = if i < d / 2 { -x[o + i + d / 2] } else { x[o + i - d / 2] };
                        // The reference's two products and one sum, each rounded to f32.
                        let want = x[o + i] * cos[p + i] + rot * sin[p + i];
                        assert_eq!(dst[o + i], want, "{isa:?} row {r} head {h} dim {i}");
                    }
                }
            }
        }
    }
}
