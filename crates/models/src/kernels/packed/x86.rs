//! The x86 micro-kernels: an `MR x NR` tile of `y` held in vector registers while `k` streams
//! by. AVX-512: two zmm per row (`NR` 32), up to 12 rows (24 accumulators of 32 registers);
//! AVX2: two ymm per row (`NR` 16), up to 6 rows (12 of 16). Each row's value is broadcast and
//! multiplied into both halves of the panel row with FMAs (or, in bf16 pairs, `vdpbf16ps`).
//!
//! The row count is a const generic so the accumulators are named registers; `by_rows_*` picks
//! the instance for a block's row count.

use std::arch::x86_64::*;

use half::bf16;

use super::BLoad;

impl BLoad for f32 {
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        _mm256_loadu_ps(p)
    }
}

impl BLoad for bf16 {
    /// bf16 is the top half of an f32: zero-extend to 32 bits and shift left by 16 (exact).
    #[inline(always)]
    unsafe fn load16(p: *const Self) -> __m512 {
        let h = _mm256_loadu_si256(p.cast());
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
    }
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        let h = _mm_loadu_si128(p.cast());
        _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(h)))
    }
}

/// Evaluates `$call` with the const `$mr` = `$rows`, one of the listed values (the kernels'
/// row count is a const generic).
macro_rules! with_rows {
    ($rows:expr, [$($n:literal),*], |$mr:ident| $call:expr) => {
        match $rows {
            $($n => {
                const $mr: usize = $n;
                $call
            })*
            r => unreachable!("a block of {r} rows for a kernel of at most {} rows", [$($n),*].len()),
        }
    };
}

/// AVX-512 f32 FMA tile, `b` f32 or bf16: `c[rows x 32] (+)= a[kc x rows] · b[kc x 32]`.
///
/// # Safety
/// The processor has AVX-512 F/VL; `a` holds `kc * rows`, `b` `kc * 32` values and `c`
/// `(rows - 1) * ldc + 32` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_rows_512<W: BLoad>(
    rows: usize,
    kc: usize,
    a: &[f32],
    b: &[W],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_rows!(rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |MR| tile_512::<MR, W>(
        kc, a, b, c, ldc, accumulate
    ))
}

#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile_512<const MR: usize, W: BLoad>(
    kc: usize,
    a: *const f32,
    b: *const W,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = W::load16(b.add(p * 32));
        let b1 = W::load16(b.add(p * 32 + 16));
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = _mm512_set1_ps(*a.add(p * MR + i));
            acc[0] = _mm512_fmadd_ps(ai, b0, acc[0]);
            acc[1] = _mm512_fmadd_ps(ai, b1, acc[1]);
        }
    }
    store_512(&acc, c, ldc, accumulate);
}

/// AVX512_BF16 tile: `a` `[kc][rows]` bf16 pairs (u32), `b` `[kc][32][2]` bf16.
///
/// # Safety
/// The processor has AVX-512 F/VL and BF16; `a` holds `kc * rows` pairs, `b` `kc * 64` values
/// and `c` `(rows - 1) * ldc + 32` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_rows_dp(
    rows: usize,
    kc: usize,
    a: &[u32],
    b: &[bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_rows!(rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |MR| tile_dp::<MR>(
        kc, a, b, c, ldc, accumulate
    ))
}

#[target_feature(enable = "avx512bf16,avx512f,avx512vl,avx2,fma")]
unsafe fn tile_dp<const MR: usize>(
    kc: usize,
    a: *const u32,
    b: *const bf16,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm512_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = bh(b.add(p * 64));
        let b1 = bh(b.add(p * 64 + 32));
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = std::mem::transmute::<__m512i, __m512bh>(_mm512_set1_epi32(
                *a.add(p * MR + i) as i32,
            ));
            acc[0] = _mm512_dpbf16_ps(acc[0], ai, b0);
            acc[1] = _mm512_dpbf16_ps(acc[1], ai, b1);
        }
    }
    store_512(&acc, c, ldc, accumulate);
}

/// 32 bf16 at `p` as a `vdpbf16ps` operand.
#[inline(always)]
unsafe fn bh(p: *const bf16) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
}

#[inline(always)]
unsafe fn store_512<const MR: usize>(
    acc: &[[__m512; 2]; MR],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    for (i, acc) in acc.iter().enumerate() {
        let ci = c.add(i * ldc);
        let (mut r0, mut r1) = (acc[0], acc[1]);
        if accumulate {
            r0 = _mm512_add_ps(r0, _mm512_loadu_ps(ci));
            r1 = _mm512_add_ps(r1, _mm512_loadu_ps(ci.add(16)));
        }
        _mm512_storeu_ps(ci, r0);
        _mm512_storeu_ps(ci.add(16), r1);
    }
}

/// AVX2 f32 FMA tile, `b` f32 or bf16: `c[rows x 16] (+)= a[kc x rows] · b[kc x 16]`.
///
/// # Safety
/// The processor has AVX2 and FMA; `a` holds `kc * rows`, `b` `kc * 16` values and `c`
/// `(rows - 1) * ldc + 16` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_rows_256<W: BLoad>(
    rows: usize,
    kc: usize,
    a: &[f32],
    b: &[W],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_rows!(rows, [1, 2, 3, 4, 5, 6], |MR| tile_256::<MR, W>(kc, a, b, c, ldc, accumulate))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_256<const MR: usize, W: BLoad>(
    kc: usize,
    a: *const f32,
    b: *const W,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[_mm256_setzero_ps(); 2]; MR];
    for p in 0..kc {
        let b0 = W::load8(b.add(p * 16));
        let b1 = W::load8(b.add(p * 16 + 8));
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = _mm256_set1_ps(*a.add(p * MR + i));
            acc[0] = _mm256_fmadd_ps(ai, b0, acc[0]);
            acc[1] = _mm256_fmadd_ps(ai, b1, acc[1]);
        }
    }
    for (i, acc) in acc.iter().enumerate() {
        let ci = c.add(i * ldc);
        let (mut r0, mut r1) = (acc[0], acc[1]);
        if accumulate {
            r0 = _mm256_add_ps(r0, _mm256_loadu_ps(ci));
            r1 = _mm256_add_ps(r1, _mm256_loadu_ps(ci.add(8)));
        }
        _mm256_storeu_ps(ci, r0);
        _mm256_storeu_ps(ci.add(8), r1);
    }
}
