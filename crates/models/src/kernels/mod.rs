//! Small CPU kernels for hot element-wise loops where candle's scalar paths cost more than the
//! matmuls around them: a vectorisable `exp`, exact-erf GELU, the SAM attention epilogue
//! (relative-position add + softmax over one score row), the decoder's RMSNorm, SiLU-gate and
//! RoPE in f32 (`decoder.rs`) and, with the residual add, in bf16 (`decoder_bf16.rs`), and the linears' matrix multiply against weights packed at load, in
//! f32 and bf16, from a one-row decode step to a prefill (`packed.rs`).
//!
//! Each element-wise kernel is compiled three times, for the baseline target, with AVX2 + FMA (8 lanes) and
//! with AVX-512 (16 lanes), and picked at run time ([`Isa`]), so the loops vectorise as wide as
//! the processor allows without a `-C target-cpu` build. The `_with` variants take the path
//! explicitly: the tests run every path the machine has against a scalar reference. The
//! packed GEMM has its own micro-kernels per path (AVX-512, AVX512_BF16, AVX2, baseline).

use crate::isa::{on_isa, Isa};

mod bf16;
mod decoder;
mod decoder_bf16;
mod packed;
mod permute;

pub use bf16::Bf16Path;
pub use decoder::{rms_norm, rms_norm_with, rope, rope_with, silu_mul, silu_mul_with};
pub use decoder_bf16::{add_bf16, rms_norm_bf16, rope_bf16, silu_mul_bf16};
pub use packed::{Activation, PackPath, PackedWeight};
pub use permute::contiguous_par;

/// `exp(x)` for f32 with Cephes-style range reduction and a degree-6 polynomial; max relative
/// error about 2e-7 (1-2 ulp) over the range softmax uses. Branch-free so loops vectorise;
/// inputs below -87.3 flush to zero, as the libm result does in practice for softmax rows.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Round-to-nearest without `floor` (a libm call on the SSE2 baseline).
    const MAGIC: f32 = 12_582_912.0; // 1.5 * 2^23
    let x = x.clamp(-87.3, 88.7);
    let n = (x * LOG2E + MAGIC) - MAGIC;
    let r = x - n * LN2_HI - n * LN2_LO;
    let r2 = r * r;
    let p = ((((1.987_569_1e-4 * r + 1.398_199_9e-3) * r + 8.333_452e-3) * r + 4.166_579_6e-2) * r
        + 1.666_666_5e-1)
        * r
        + 5e-1;
    let y = p * r2 + r + 1.0;
    // 2^n without a float-to-int conversion (Rust's saturating `as` blocks vectorisation):
    // adding MAGIC leaves the integer n + 127 in the low mantissa bits; shifting by 23 moves it
    // into the exponent field and drops everything above.
    let biased = (n + (MAGIC + 127.0)).to_bits() << 23;
    y * f32::from_bits(biased)
}

// The hand-split reductions take their lane count `L` (8, or 16 on AVX-512) as a const
// generic: float reductions only vectorise when written as independent partial results (the
// compiler may not reassociate them).

#[inline(always)]
fn max_lanes<const L: usize>(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; L];
    let mut chunks = xs.chunks_exact(L);
    for c in &mut chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = if v > *a { v } else { *a };
        }
    }
    let tail = chunks.remainder().iter().fold(f32::NEG_INFINITY, |m, &v| if v > m { v } else { m });
    acc.iter().fold(tail, |m, &v| if v > m { v } else { m })
}

/// Replaces each `x` by `exp(x - max)` and returns the sum.
#[inline(always)]
fn exp_sub_sum<const L: usize>(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; L];
    let mut chunks = xs.chunks_exact_mut(L);
    for c in &mut chunks {
        for (a, v) in acc.iter_mut().zip(c.iter_mut()) {
            *v = exp_f32(*v - max);
            *a += *v;
        }
    }
    let mut tail = 0f32;
    for v in chunks.into_remainder() {
        *v = exp_f32(*v - max);
        tail += *v;
    }
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn relpos_softmax_row_impl<const L: usize>(row: &mut [f32], rh: &[f32], rw: &[f32]) {
    let s = rw.len();
    for (chunk, &h) in row.chunks_exact_mut(s).zip(rh) {
        for (d, &w) in chunk.iter_mut().zip(rw) {
            // The reference adds rel_h first, then rel_w.
            *d = (*d + h) + w;
        }
    }
    softmax_row_impl::<L>(row)
}

/// [`softmax_row`] inlined into a caller compiled for its own [`Isa`] (with its lane count).
#[inline(always)]
pub(crate) fn softmax_row_impl<const L: usize>(row: &mut [f32]) {
    let max = max_lanes::<L>(row);
    let inv = 1.0 / exp_sub_sum::<L>(row, max);
    for d in row.iter_mut() {
        *d *= inv;
    }
}

/// In-place softmax of one row.
pub fn softmax_row(row: &mut [f32]) {
    softmax_row_with(Isa::current(), row)
}

/// [`softmax_row`] on the path `isa` (lowered to what the processor has).
pub fn softmax_row_with(isa: Isa, row: &mut [f32]) {
    on_isa!(isa, <L> |row: &mut [f32]| -> () { softmax_row_impl::<L>(row) })
}

/// One row of `softmax(scores + rel_h[kh] + rel_w[kw])` over keys `(kh, kw)`, in place: `row`
/// has `S * S` entries, `rh` and `rw` have `S`.
pub fn relpos_softmax_row(row: &mut [f32], rh: &[f32], rw: &[f32]) {
    relpos_softmax_row_with(Isa::current(), row, rh, rw)
}

/// [`relpos_softmax_row`] on the path `isa`.
pub fn relpos_softmax_row_with(isa: Isa, row: &mut [f32], rh: &[f32], rw: &[f32]) {
    on_isa!(isa, <L> |row: &mut [f32], rh: &[f32], rw: &[f32]| -> () {
        relpos_softmax_row_impl::<L>(row, rh, rw)
    })
}

/// `erfc(z)` for `z >= 0` with fractional error below 1.2e-7 (Chebyshev fit of Numerical
/// Recipes' `erfcc`); branch-free so it vectorises.
#[inline(always)]
fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let poly = -1.265_512_2
        + t * (1.000_023_7
            + t * (0.374_091_96
                + t * (0.096_784_18
                    + t * (-0.186_288_06
                        + t * (0.278_868_07
                            + t * (-1.135_204
                                + t * (1.488_515_9 + t * (-0.822_152_23 + t * 0.170_872_77))))))));
    t * exp_f32(-z * z + poly)
}

/// Exact (erf-based) GELU, `0.5 x (1 + erf(x / sqrt 2))`, as `nn.GELU()` computes it; absolute
/// error below 1e-7 * |x|.
#[inline(always)]
pub fn gelu_erf_f32(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let erfc = erfc_nonneg(z.abs());
    let erf = if z >= 0.0 { 1.0 - erfc } else { erfc - 1.0 };
    0.5 * x * (1.0 + erf)
}

#[inline(always)]
fn gelu_slice_impl(dst: &mut [f32], src: &[f32]) {
    for (d, &x) in dst.iter_mut().zip(src) {
        *d = gelu_erf_f32(x);
    }
}

/// `dst[i] = gelu_erf(src[i])`.
pub fn gelu_slice(dst: &mut [f32], src: &[f32]) {
    gelu_slice_with(Isa::current(), dst, src)
}

/// [`gelu_slice`] on the path `isa`.
pub fn gelu_slice_with(isa: Isa, dst: &mut [f32], src: &[f32]) {
    on_isa!(isa, <L> |dst: &mut [f32], src: &[f32]| -> () { gelu_slice_impl(dst, src) })
}

#[inline(always)]
pub(crate) fn dot_impl<const L: usize>(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; L];
    let mut ca = a.chunks_exact(L);
    let mut cb = b.chunks_exact(L);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..L {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

/// `len` zeros, written by the rayon pool when there are many: a prefill's or a vision tower's
/// output is tens of MiB of reused pages that the allocator would zero on the calling thread
/// while the other workers wait (3 % of a vision encode's samples on an Intel Xeon).
pub(crate) fn zeroed(len: usize) -> Vec<f32> {
    if len < 1 << 18 {
        return vec![0f32; len];
    }
    use rayon::prelude::*;
    let mut v: Vec<f32> = Vec::with_capacity(len);
    v.spare_capacity_mut()
        .par_chunks_mut(1 << 16)
        .for_each(|c| c.fill(std::mem::MaybeUninit::new(0.0)));
    // SAFETY: the first `len` elements were all initialised above.
    unsafe { v.set_len(len) };
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both sizes of [`zeroed`]: the serial one and the pool's, every element zero.
    #[test]
    fn zeroed_is_all_zeros_at_every_size() {
        for len in [0, 7, (1 << 18) - 1, 1 << 18, (1 << 20) + 5] {
            let v = zeroed(len);
            assert_eq!(v.len(), len);
            assert!(v.iter().all(|&x| x.to_bits() == 0), "len {len}");
        }
    }

    /// Every path this processor has (`scalar` always; `avx2`, `avx512` where present).
    pub(super) fn paths() -> Vec<Isa> {
        let paths = Isa::supported();
        eprintln!("kernel paths run here: {:?} (best {:?})", paths, Isa::best());
        paths
    }

    pub(super) fn values(n: usize, seed: usize) -> Vec<f32> {
        (0..n).map(|i| (((i * 2_654_435_761 + seed) % 1999) as f32 / 999.5 - 1.0) * 3.0).collect()
    }

    #[test]
    fn softmax_matches_f64_on_every_path() {
        for len in [1, 7, 8, 17, 33, 1000] {
            let src = values(len, len);
            let max = src.iter().fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
            let z: f64 = src.iter().map(|&v| (f64::from(v) - max).exp()).sum();
            for isa in paths() {
                let mut row = src.clone();
                softmax_row_with(isa, &mut row);
                for (got, &v) in row.iter().zip(&src) {
                    let want = (f64::from(v) - max).exp() / z;
                    assert!((f64::from(*got) - want).abs() < 1e-6, "{isa:?} len {len}");
                }
            }
        }
    }

    #[test]
    fn gelu_slice_matches_erf_on_every_path() {
        let src = values(1037, 5);
        for isa in paths() {
            let mut dst = vec![0f32; src.len()];
            gelu_slice_with(isa, &mut dst, &src);
            for (got, &x) in dst.iter().zip(&src) {
                let x = f64::from(x);
                let want =
                    0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
                assert!((f64::from(*got) - want).abs() < 1e-6 * x.abs().max(1.0), "{isa:?} {x}");
            }
        }
    }

    #[test]
    fn exp_matches_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (f64::from(exp_f32(x)), f64::from(x.exp()));
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "max relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-200.0) < 1e-37);
    }

    #[test]
    fn gelu_matches_erf_definition() {
        // Reference erf from the f64 series/continued fraction in libm via candle's own erf.
        let mut worst = 0f64;
        let mut x = -9.0f64;
        while x < 9.0 {
            let want =
                0.5 * x * (1.0 + candle_core::cpu::erf::erf_f64(x / std::f64::consts::SQRT_2));
            let got = f64::from(gelu_erf_f32(x as f32));
            worst = worst.max((got - want).abs() / x.abs().max(1.0));
            x += 0.00731;
        }
        assert!(worst < 3e-7, "max error {worst:e}");
    }

    #[test]
    fn row_softmax_sums_to_one_and_adds_terms_on_every_path() {
        let s = 3;
        let src: Vec<f32> = (0..9).map(|i| i as f32 * 0.1).collect();
        let rh = [0.5, -0.5, 1.0];
        let rw = [0.0, 0.25, -0.25];
        let logits: Vec<f64> = (0..9).map(|i| f64::from(src[i] + rh[i / s] + rw[i % s])).collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        for isa in paths() {
            let mut dst = src.clone();
            relpos_softmax_row_with(isa, &mut dst, &rh, &rw);
            for (d, l) in dst.iter().zip(&logits) {
                assert!((f64::from(*d) - l.exp() / z).abs() < 1e-6, "{isa:?}");
            }
        }
    }
}
