//! The few-row kernels: a decode step's products, `c = a · W` for one block of up to a few
//! rows, reading several panels of `W` at once. One panel at a time leaves the weights to a
//! single stream per thread; four streams ran the one-row product 20-45 % faster on an Intel
//! Xeon (benches/README.md). Each kernel sums the `KC` blocks of `k` row by row as the tiles
//! do, so a row's result is the same whatever rows it is multiplied with.

use std::arch::x86_64::*;

use half::bf16;

use super::super::blocking::{KC, KC_PAIRS};
use super::{bh, store, BLoad, Lanes};

/// Bytes ahead of each panel stream the few-row kernels prefetch (512-2048 ran alike).
const ROW_PREFETCH: usize = 1024;

/// Panels the few-row kernels read at once for `rows` rows: at most four (2-8 ran alike at one
/// row on an Intel Xeon, all faster than one), and as many as leave the accumulators (`2 x
/// rows x panels`) and the operands within the registers: 24 of 32 with AVX-512, 12 of 16
/// with AVX2. 1 where a second panel's accumulators would not fit: those blocks keep the tile,
/// one panel at a time.
pub(in crate::kernels::packed) fn panels_at_once(avx512: bool, rows: usize) -> usize {
    match (avx512, rows) {
        (_, 1) => 4,
        (true, 2 | 3) => 4,
        (true, 4) => 3,
        (true, 5 | 6) | (false, 3) => 2,
        (false, 2) => 3,
        _ => 1,
    }
}

/// Evaluates `$call` with const `$mr` and `$p` for the `(rows, panels)` pairs
/// [`panels_at_once`] allows (and fewer panels, for a run's last group).
macro_rules! with_rows_and_panels {
    ($rows:expr, $panels:expr, [$(($m:literal, [$($n:literal),*])),*], |$mr:ident, $p:ident| $call:expr) => {
        match ($rows, $panels) {
            $($(($m, $n) => {
                const $mr: usize = $m;
                const $p: usize = $n;
                $call
            })*)*
            (r, p) => unreachable!("{p} panels of {r} rows at once"),
        }
    };
}

/// [`with_rows_and_panels`] over the pairs [`panels_at_once`] allows with AVX-512 (24
/// accumulators).
macro_rules! with_avx512_rows_and_panels {
    ($rows:expr, $panels:expr, |$mr:ident, $p:ident| $call:expr) => {
        with_rows_and_panels!(
            $rows,
            $panels,
            [
                (1, [1, 2, 3, 4]),
                (2, [1, 2, 3, 4]),
                (3, [1, 2, 3, 4]),
                (4, [1, 2, 3]),
                (5, [1, 2]),
                (6, [1, 2])
            ],
            |$mr, $p| $call
        )
    };
}

/// `rows` rows (`a` `[kk][rows]`) against `P` neighbouring panels (`stride` values apart) at
/// once: `c[rows x P * NR] = a · b`, rows `ldc` apart, summed in blocks of `KC` steps exactly
/// as the tile sums each row (each block from zero, then added to `c`).
///
/// # Safety
/// The processor has the instructions of `V`; `a` holds `kk * MR` values, each of the `P`
/// panels `kk * NR` and `c` `(MR - 1) * ldc + P * NR` (checked by the caller).
#[inline(always)]
unsafe fn fma_rows_panels<const MR: usize, const P: usize, V: Lanes, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
    ldc: usize,
) {
    let nr = 2 * V::N;
    let step = nr * std::mem::size_of::<W>();
    for kb in (0..kk).step_by(KC) {
        let mut acc = [[[V::zero(); 2]; MR]; P];
        for t in kb..kk.min(kb + KC) {
            for (q, acc) in acc.iter_mut().enumerate() {
                let bp = b.add(q * stride + t * nr);
                let ahead = bp.cast::<i8>().wrapping_add(ROW_PREFETCH);
                for line in (0..step).step_by(64) {
                    _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
                }
                let (b0, b1) = (V::load_weights(bp), V::load_weights(bp.add(V::N)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = V::splat(*a.add(t * MR + i));
                    acc[0] = V::fma(ai, b0, acc[0]);
                    acc[1] = V::fma(ai, b1, acc[1]);
                }
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            store::<MR, V>(acc, c.add(q * nr), ldc, kb > 0);
        }
    }
}

/// [`fma_rows_panels`] with AVX-512 (`NR` 32): `rows` rows by `panels` panels (at most
/// [`panels_at_once`]).
///
/// # Safety
/// As [`fma_rows_panels`], with AVX-512 F/VL.
pub(in crate::kernels::packed) unsafe fn rows_by_panels_512<W: BLoad>(
    (rows, panels): (usize, usize),
    kk: usize,
    a: *const f32,
    (b, stride): (*const W, usize),
    (c, ldc): (*mut f32, usize),
) {
    with_avx512_rows_and_panels!(rows, panels, |MR, P| rows_panels_512::<MR, P, W>(
        kk, a, b, stride, c, ldc
    ))
}

#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn rows_panels_512<const MR: usize, const P: usize, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
    ldc: usize,
) {
    fma_rows_panels::<MR, P, __m512, W>(kk, a, b, stride, c, ldc)
}

/// [`fma_rows_panels`] with AVX2 (`NR` 16): `rows` rows by `panels` panels (at most
/// [`panels_at_once`]).
///
/// # Safety
/// As [`fma_rows_panels`], with AVX2 and FMA.
pub(in crate::kernels::packed) unsafe fn rows_by_panels_256<W: BLoad>(
    (rows, panels): (usize, usize),
    kk: usize,
    a: *const f32,
    (b, stride): (*const W, usize),
    (c, ldc): (*mut f32, usize),
) {
    with_rows_and_panels!(
        rows,
        panels,
        [(1, [1, 2, 3, 4]), (2, [1, 2, 3]), (3, [1, 2])],
        |MR, P| rows_panels_256::<MR, P, W>(kk, a, b, stride, c, ldc)
    )
}

#[target_feature(enable = "avx2,fma")]
unsafe fn rows_panels_256<const MR: usize, const P: usize, W: BLoad>(
    kk: usize,
    a: *const f32,
    b: *const W,
    stride: usize,
    c: *mut f32,
    ldc: usize,
) {
    fma_rows_panels::<MR, P, __m256, W>(kk, a, b, stride, c, ldc)
}

/// `rows` rows of bf16 pairs (`a` `[kk][rows]`) against `panels` (at most
/// [`panels_at_once`]) neighbouring panels of pairs (`stride` values apart) at once:
/// [`fma_rows_panels`] with `vdpbf16ps`, the blocks of `KC_PAIRS` pairs summed as `tile_dp` sums
/// them.
///
/// # Safety
/// The processor has AVX-512 F/VL and BF16; `a` holds `kk * rows` pairs, each panel `kk * 64`
/// values and `c` `(rows - 1) * ldc + panels * 32` (checked by the caller).
pub(in crate::kernels::packed) unsafe fn rows_by_panels_dp(
    (rows, panels): (usize, usize),
    kk: usize,
    a: *const u32,
    (b, stride): (*const bf16, usize),
    (c, ldc): (*mut f32, usize),
) {
    with_avx512_rows_and_panels!(rows, panels, |MR, P| rows_panels_dp::<MR, P>(
        kk, a, b, stride, c, ldc
    ))
}

#[target_feature(enable = "avx512bf16,avx512f,avx512vl,avx2,fma")]
unsafe fn rows_panels_dp<const MR: usize, const P: usize>(
    kk: usize,
    a: *const u32,
    b: *const bf16,
    stride: usize,
    c: *mut f32,
    ldc: usize,
) {
    for kb in (0..kk).step_by(KC_PAIRS) {
        let mut acc = [[[_mm512_setzero_ps(); 2]; MR]; P];
        for t in kb..kk.min(kb + KC_PAIRS) {
            for (q, acc) in acc.iter_mut().enumerate() {
                let bp = b.add(q * stride + t * 64);
                let ahead = bp.cast::<i8>().wrapping_add(ROW_PREFETCH);
                _mm_prefetch::<_MM_HINT_T0>(ahead);
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(64));
                let (b0, b1) = (bh(bp), bh(bp.add(32)));
                for (i, acc) in acc.iter_mut().enumerate() {
                    let ai = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                        *a.add(t * MR + i) as i32,
                    ));
                    acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
                    acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
                }
            }
        }
        for (q, acc) in acc.iter().enumerate() {
            store::<MR, __m512>(acc, c.add(q * 32), ldc, kb > 0);
        }
    }
}
