//! The one-row kernels: a decode step's GEMV, `c = a · W` for a single row `a`, reading
//! several panels of `W` at once. One panel at a time leaves the weights to a single stream
//! per thread; four streams ran the one-row product 20-45 % faster on an Intel Xeon
//! (benches/README.md). Each kernel sums the `KC` blocks of `k` as the tiles sum one row, so
//! a row's result is the same whether it is multiplied alone or among others.

use std::arch::x86_64::*;

use half::bf16;

use super::super::KC;
use super::{bh, store, BLoad, Lanes};

/// One row against `P` neighbouring panels (`stride` values apart) at once:
/// `c[P * NR] = a[kk] · b`, summed in blocks of `KC` steps exactly as the tile sums one row
/// (each block from zero, then added to `c`).
///
/// # Safety
/// The processor has the instructions of `V`; `a` holds `kk` values, each of the `P` panels
/// `kk * NR` and `c` `P * NR` (checked by the caller).
#[inline(always)]
unsafe fn fma_row_panels<const P: usize, V: Lanes, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
) {
    let nr = 2 * V::N;
    let step = nr * std::mem::size_of::<W>();
    for kb in (0..kk).step_by(KC) {
        let mut acc = [[V::zero(); 2]; P];
        for t in kb..kk.min(kb + KC) {
            let ai = V::splat(*a.add(t));
            for (q, acc) in acc.iter_mut().enumerate() {
                let bp = b.add(q * stride + t * nr);
                let ahead = bp.cast::<i8>().wrapping_add(ROW_PREFETCH);
                for line in (0..step).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
                }
                acc[0] = V::fma(ai, V::load_weights(bp), acc[0]);
                acc[1] = V::fma(ai, V::load_weights(bp.add(V::N)), acc[1]);
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            store::<1, V>(&[*acc], c.add(q * nr), 0, kb > 0);
        }
    }
}

/// Panels the one-row kernels read at once: 2-8 ran alike on an Intel Xeon, all faster than
/// one; 4 keeps the AVX2 instance's accumulators (8) and operands within its 16 registers.
pub(in crate::kernels::packed) const ROW_PANELS: usize = 4;

/// Bytes ahead of each panel stream the one-row kernels prefetch (512-2048 ran alike).
const ROW_PREFETCH: usize = 1024;

/// [`fma_row_panels`] with AVX-512 (`NR` 32) for `panels` (at most [`ROW_PANELS`]) panels.
///
/// # Safety
/// As [`fma_row_panels`], with AVX-512 F/VL.
pub(in crate::kernels::packed) unsafe fn row_by_panels_512<W: BLoad>(
    panels: usize,
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
) {
    match panels {
        1 => row_panels_512::<1, W>(kk, a, b, stride, c),
        2 => row_panels_512::<2, W>(kk, a, b, stride, c),
        3 => row_panels_512::<3, W>(kk, a, b, stride, c),
        4 => row_panels_512::<4, W>(kk, a, b, stride, c),
        p => unreachable!("{p} panels at once; the one-row kernel takes 1 to {ROW_PANELS}"),
    }
}

#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn row_panels_512<const P: usize, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
) {
    fma_row_panels::<P, __m512, W>(kk, a, b, stride, c)
}

/// [`fma_row_panels`] with AVX2 (`NR` 16) for `panels` (at most [`ROW_PANELS`]) panels.
///
/// # Safety
/// As [`fma_row_panels`], with AVX2 and FMA.
pub(in crate::kernels::packed) unsafe fn row_by_panels_256<W: BLoad>(
    panels: usize,
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
) {
    match panels {
        1 => row_panels_256::<1, W>(kk, a, b, stride, c),
        2 => row_panels_256::<2, W>(kk, a, b, stride, c),
        3 => row_panels_256::<3, W>(kk, a, b, stride, c),
        4 => row_panels_256::<4, W>(kk, a, b, stride, c),
        p => unreachable!("{p} panels at once; the one-row kernel takes 1 to {ROW_PANELS}"),
    }
}

#[target_feature(enable = "avx2,fma")]
unsafe fn row_panels_256<const P: usize, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
) {
    fma_row_panels::<P, __m256, W>(kk, a, b, stride, c)
}

/// One row of bf16 pairs against `panels` (at most [`ROW_PANELS`]) neighbouring panels of
/// pairs (`stride` values apart) at once: [`fma_row_panels`] with `vdpbf16ps`, the blocks of
/// `KC` pairs summed as [`tile_dp`] sums them.
///
/// # Safety
/// The processor has AVX-512 F/VL and BF16; `a` holds `kk` pairs, each panel `kk * 64` values
/// and `c` `panels * 32` (checked by the caller).
pub(in crate::kernels::packed) unsafe fn row_by_panels_dp(
    panels: usize,
    kk: usize,
    a: *const u32,
    b: *const bf16,
    stride: usize,
    c: *mut f32,
) {
    match panels {
        1 => row_panels_dp::<1>(kk, a, b, stride, c),
        2 => row_panels_dp::<2>(kk, a, b, stride, c),
        3 => row_panels_dp::<3>(kk, a, b, stride, c),
        4 => row_panels_dp::<4>(kk, a, b, stride, c),
        p => unreachable!("{p} panels at once; the one-row kernel takes 1 to {ROW_PANELS}"),
    }
}

#[target_feature(enable = "avx512bf16,avx512f,avx512vl,avx2,fma")]
unsafe fn row_panels_dp<const P: usize>(
    kk: usize,
    a: *const u32,
    b: *const bf16,
    stride: usize,
    c: *mut f32,
) {
    for kb in (0..kk).step_by(KC) {
        let mut acc = [[_mm512_setzero_ps(); 2]; P];
        for t in kb..kk.min(kb + KC) {
            let ai = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(*a.add(t) as i32));
            for (q, acc) in acc.iter_mut().enumerate() {
                let bp = b.add(q * stride + t * 64);
                let ahead = bp.cast::<i8>().wrapping_add(ROW_PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                acc[0] = _mm512_dpbf16_ps(acc[0], ai, bh(bp));
                acc[1] = _mm512_dpbf16_ps(acc[1], ai, bh(bp.add(32)));
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            store::<1, __m512>(&[*acc], c.add(q * 32), 0, kb > 0);
        }
    }
}
