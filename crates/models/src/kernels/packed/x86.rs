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

mod row;
pub(super) use row::{panels_at_once, rows_by_panels_256, rows_by_panels_512, rows_by_panels_dp};

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
    fma_tile::<MR, __m512, W, _>(kc, Packed::<MR>(a), b, c, ldc, accumulate)
}

/// [`by_rows_512`] with the rows read in place: row `i`'s step `t` at `a.0[i * a.1 + t]`.
///
/// # Safety
/// The processor has AVX-512 F/VL; `a.0` holds `(rows - 1) * a.1 + kc`, `b` `kc * 32` values
/// and `c` `(rows - 1) * ldc + 32` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_rows_512_strided(
    rows: usize,
    kc: usize,
    (a, lda): (&[f32], usize),
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_rows!(rows, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], |MR| tile_512_strided::<MR>(
        kc,
        Strided::<MR>(a, lda),
        b,
        c,
        ldc,
        accumulate
    ))
}

#[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
unsafe fn tile_512_strided<const MR: usize>(
    kc: usize,
    a: Strided<MR>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    fma_tile::<MR, __m512, f32, _>(kc, a, b, c, ldc, accumulate)
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
    store(&acc, c, ldc, accumulate);
}

/// 32 bf16 at `p` as a `vdpbf16ps` operand.
#[inline(always)]
unsafe fn bh(p: *const bf16) -> __m512bh {
    std::mem::transmute::<__m512i, __m512bh>(_mm512_loadu_si512(p.cast()))
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
    fma_tile::<MR, __m256, W, _>(kc, Packed::<MR>(a), b, c, ldc, accumulate)
}

/// [`by_rows_256`] with the rows read in place, as [`by_rows_512_strided`].
///
/// # Safety
/// The processor has AVX2 and FMA; `a.0` holds `(rows - 1) * a.1 + kc`, `b` `kc * 16` values
/// and `c` `(rows - 1) * ldc + 16` (checked by the caller).
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn by_rows_256_strided(
    rows: usize,
    kc: usize,
    (a, lda): (&[f32], usize),
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (a, b, c) = (a.as_ptr(), b.as_ptr(), c.as_mut_ptr());
    with_rows!(rows, [1, 2, 3, 4, 5, 6], |MR| tile_256_strided::<MR>(
        kc,
        Strided::<MR>(a, lda),
        b,
        c,
        ldc,
        accumulate
    ))
}

#[target_feature(enable = "avx2,fma")]
unsafe fn tile_256_strided<const MR: usize>(
    kc: usize,
    a: Strided<MR>,
    b: *const f32,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    fma_tile::<MR, __m256, f32, _>(kc, a, b, c, ldc, accumulate)
}

/// Where a tile reads its rows' values.
trait RowSource: Copy {
    /// Row `i`'s value at step `p`.
    unsafe fn value(self, p: usize, i: usize) -> f32;
    /// A hint to bring the rows' values some steps after `p` into L1.
    unsafe fn prefetch(self, p: usize);
}

/// A block of `MR` rows packed `[kc][MR]`.
#[derive(Clone, Copy)]
struct Packed<const MR: usize>(*const f32);

impl<const MR: usize> RowSource for Packed<MR> {
    #[inline(always)]
    unsafe fn value(self, p: usize, i: usize) -> f32 {
        *self.0.add(p * MR + i)
    }

    /// The rows' values `PREFETCH_A` steps ahead (48 bytes a step at 12 rows): up to 5 % at
    /// the decoder's 1024-row prefill shapes on an Intel Xeon, where a row block's first tile
    /// in each `KC` step reads its rows from L2 or L3 (the group's other panels then find them
    /// in L1).
    #[inline(always)]
    unsafe fn prefetch(self, p: usize) {
        _mm_prefetch::<_MM_HINT_T0>(self.0.wrapping_add((p + PREFETCH_A) * MR).cast::<i8>());
    }
}

/// `MR` rows in place, `.1` values apart.
#[derive(Clone, Copy)]
struct Strided<const MR: usize>(*const f32, usize);

impl<const MR: usize> RowSource for Strided<MR> {
    #[inline(always)]
    unsafe fn value(self, p: usize, i: usize) -> f32 {
        *self.0.add(i * self.1 + p)
    }

    /// Every 16 steps (a cache line of each row), the rows' lines `PREFETCH_A` steps ahead.
    #[inline(always)]
    unsafe fn prefetch(self, p: usize) {
        if p.is_multiple_of(16) {
            for i in 0..MR {
                let at = self.0.wrapping_add(i * self.1 + p + PREFETCH_A);
                _mm_prefetch::<_MM_HINT_T0>(at.cast::<i8>());
            }
        }
    }
}

/// The FMA tile at the width of `V`, two vectors per row: inlined into the `target_feature`
/// functions above, which give it its instructions.
#[inline(always)]
unsafe fn fma_tile<const MR: usize, V: Lanes, W: BLoad, A: RowSource>(
    kc: usize,
    a: A,
    b: *const W,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    let mut acc = [[V::zero(); 2]; MR];
    // Bytes of panel per step of `k`: one or two cache lines.
    let step = 2 * V::N * std::mem::size_of::<W>();
    for p in 0..kc {
        // The panel row `PREFETCH` steps ahead into L1: the GEMM ran 5-10 % faster with it at
        // prefill and vision shapes on an Intel Xeon (benches/README.md), where the tile alone
        // in L1 ran 40 % faster than inside the GEMM. Prefetches never fault; the address past
        // the slice's end is only a hint.
        let ahead = b.cast::<i8>().wrapping_add((p + PREFETCH) * step);
        for line in (0..step).step_by(64) {
            _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(line));
        }
        a.prefetch(p);
        let b0 = V::load_weights(b.add(p * 2 * V::N));
        let b1 = V::load_weights(b.add(p * 2 * V::N + V::N));
        for (i, acc) in acc.iter_mut().enumerate() {
            let ai = V::splat(a.value(p, i));
            acc[0] = V::fma(ai, b0, acc[0]);
            acc[1] = V::fma(ai, b1, acc[1]);
        }
    }
    store(&acc, c, ldc, accumulate);
}

/// Steps of `k` the FMA tiles prefetch their panel ahead (16 steps: about 200 cycles of FMAs
/// at 12 rows, an L2 or near-L3 latency).
const PREFETCH: usize = 16;
/// Steps of `k` the FMA tiles prefetch their rows ahead (32: 1.5 KiB at 12 rows; 64 ran the
/// same, 128 slower).
const PREFETCH_A: usize = 32;

/// A tile's rows to `c` (`ldc` apart), added to what is there with `accumulate`.
#[inline(always)]
unsafe fn store<const MR: usize, V: Lanes>(
    acc: &[[V; 2]; MR],
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    for (i, acc) in acc.iter().enumerate() {
        let ci = c.add(i * ldc);
        for (half, &r) in acc.iter().enumerate() {
            let out = ci.add(half * V::N);
            V::store(if accumulate { V::add(r, V::load(out)) } else { r }, out);
        }
    }
}

/// A vector register of f32 lanes, with what a tile does to it.
trait Lanes: Copy {
    /// f32 lanes.
    const N: usize;
    unsafe fn zero() -> Self;
    unsafe fn splat(v: f32) -> Self;
    /// `a * b + c`, fused.
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self;
    unsafe fn add(a: Self, b: Self) -> Self;
    unsafe fn load(p: *const f32) -> Self;
    unsafe fn store(v: Self, p: *mut f32);
    /// `N` panel values (f32, or bf16 widened).
    unsafe fn load_weights<W: BLoad>(p: *const W) -> Self;
}

impl Lanes for __m512 {
    const N: usize = 16;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm512_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        _mm512_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm512_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(v: Self, p: *mut f32) {
        _mm512_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_weights<W: BLoad>(p: *const W) -> Self {
        W::load16(p)
    }
}

impl Lanes for __m256 {
    const N: usize = 8;
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        _mm256_set1_ps(v)
    }
    #[inline(always)]
    unsafe fn fma(a: Self, b: Self, c: Self) -> Self {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn add(a: Self, b: Self) -> Self {
        _mm256_add_ps(a, b)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        _mm256_loadu_ps(p)
    }
    #[inline(always)]
    unsafe fn store(v: Self, p: *mut f32) {
        _mm256_storeu_ps(p, v)
    }
    #[inline(always)]
    unsafe fn load_weights<W: BLoad>(p: *const W) -> Self {
        W::load8(p)
    }
}
