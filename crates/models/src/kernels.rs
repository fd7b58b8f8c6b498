//! Small CPU kernels for hot element-wise loops where candle's scalar paths cost more than the
//! matmuls around them: a vectorisable `exp`, exact-erf GELU, the SAM attention epilogue
//! (relative-position add + softmax over one score row), and a bandwidth-bound GEMV for
//! batch-1 decode.
//!
//! Each kernel is compiled twice, for the baseline target and with AVX2 + FMA, and picked at run
//! time, so the loops vectorise 8-wide on the machines we serve from without a `-C target-cpu`
//! build.

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

/// Lanes of the hand-split reductions: float reductions only vectorise when written as
/// independent partial results (the compiler may not reassociate them).
const LANES: usize = 8;

#[inline(always)]
fn max_lanes(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
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
fn exp_sub_sum(xs: &mut [f32], max: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact_mut(LANES);
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
fn relpos_softmax_row_impl(row: &mut [f32], rh: &[f32], rw: &[f32]) {
    let s = rw.len();
    for (chunk, &h) in row.chunks_exact_mut(s).zip(rh) {
        for (d, &w) in chunk.iter_mut().zip(rw) {
            // The reference adds rel_h first, then rel_w.
            *d = (*d + h) + w;
        }
    }
    softmax_row_impl(row)
}

#[inline(always)]
fn softmax_row_impl(row: &mut [f32]) {
    let max = max_lanes(row);
    let inv = 1.0 / exp_sub_sum(row, max);
    for d in row.iter_mut() {
        *d *= inv;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_row_avx2(row: &mut [f32]) {
    softmax_row_impl(row)
}

/// In-place softmax of one row.
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { softmax_row_avx2(row) };
        }
    }
    softmax_row_impl(row)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn relpos_softmax_row_avx2(row: &mut [f32], rh: &[f32], rw: &[f32]) {
    relpos_softmax_row_impl(row, rh, rw)
}

/// One row of `softmax(scores + rel_h[kh] + rel_w[kw])` over keys `(kh, kw)`, in place: `row`
/// has `S * S` entries, `rh` and `rw` have `S`.
pub fn relpos_softmax_row(row: &mut [f32], rh: &[f32], rw: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { relpos_softmax_row_avx2(row, rh, rw) };
        }
    }
    relpos_softmax_row_impl(row, rh, rw)
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

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gelu_slice_avx2(dst: &mut [f32], src: &[f32]) {
    gelu_slice_impl(dst, src)
}

/// `dst[i] = gelu_erf(src[i])`.
pub fn gelu_slice(dst: &mut [f32], src: &[f32]) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { gelu_slice_avx2(dst, src) };
        }
    }
    gelu_slice_impl(dst, src)
}

#[inline(always)]
pub(crate) fn dot_impl(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut ca = a.chunks_exact(LANES);
    let mut cb = b.chunks_exact(LANES);
    for (x, y) in (&mut ca).zip(&mut cb) {
        for l in 0..LANES {
            acc[l] += x[l] * y[l];
        }
    }
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    acc.iter().sum::<f32>() + tail
}

#[inline(always)]
fn gemv_block_impl(out: &mut [f32], x: &[f32], w_rows: &[f32], k: usize) {
    // out: [m, rows] for this block (row-major over m), w_rows: [rows, k].
    let rows = w_rows.len() / k;
    let m = x.len() / k;
    for (j, w) in w_rows.chunks_exact(k).enumerate() {
        for i in 0..m {
            out[i * rows + j] = dot_impl(&x[i * k..][..k], w);
        }
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn gemv_block_avx2(out: &mut [f32], x: &[f32], w_rows: &[f32], k: usize) {
    gemv_block_impl(out, x, w_rows, k)
}

fn gemv_block(out: &mut [f32], x: &[f32], w_rows: &[f32], k: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU supports the features the function was compiled for.
            return unsafe { gemv_block_avx2(out, x, w_rows, k) };
        }
    }
    gemv_block_impl(out, x, w_rows, k)
}

/// `y = x W^T` for one (or a few) rows of `x` (`[m, k]`) and `W` `[n, k]`: each weight row is
/// streamed once, blocks of rows in parallel. A batch-1 decode step is bound by reading the
/// weights, and this reads them at close to memory bandwidth. Returns `[m, n]`.
pub fn gemv(x: &[f32], w: &[f32], m: usize, n: usize, k: usize) -> Vec<f32> {
    use rayon::prelude::*;
    const BLOCK: usize = 64;
    let blocks = n.div_ceil(BLOCK);
    let parts: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|b| {
            let r0 = b * BLOCK;
            let rows = BLOCK.min(n - r0);
            let mut out = vec![0f32; m * rows];
            gemv_block(&mut out, x, &w[r0 * k..(r0 + rows) * k], k);
            out
        })
        .collect();
    let mut y = vec![0f32; m * n];
    for (b, part) in parts.iter().enumerate() {
        let r0 = b * BLOCK;
        let rows = part.len() / m;
        for i in 0..m {
            y[i * n + r0..i * n + r0 + rows].copy_from_slice(&part[i * rows..(i + 1) * rows]);
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gemv_matches_naive_product() {
        let (m, n, k) = (3, 130, 37);
        let x: Vec<f32> = (0..m * k).map(|i| ((i * 7 % 11) as f32 - 5.0) * 0.1).collect();
        let w: Vec<f32> = (0..n * k).map(|i| ((i * 13 % 17) as f32 - 8.0) * 0.05).collect();
        let y = gemv(&x, &w, m, n, k);
        for i in 0..m {
            for j in 0..n {
                let want: f32 = (0..k).map(|t| x[i * k + t] * w[j * k + t]).sum();
                assert!((y[i * n + j] - want).abs() < 1e-4, "{i},{j}");
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
    fn row_softmax_sums_to_one_and_adds_terms() {
        let s = 3;
        let src: Vec<f32> = (0..9).map(|i| i as f32 * 0.1).collect();
        let rh = [0.5, -0.5, 1.0];
        let rw = [0.0, 0.25, -0.25];
        let mut dst = src.clone();
        relpos_softmax_row(&mut dst, &rh, &rw);
        let logits: Vec<f64> = (0..9).map(|i| f64::from(src[i] + rh[i / s] + rw[i % s])).collect();
        let z: f64 = logits.iter().map(|l| l.exp()).sum();
        for (d, l) in dst.iter().zip(&logits) {
            assert!((f64::from(*d) - l.exp() / z).abs() < 1e-6);
        }
    }
}
