//! The one-row product (a decode step's GEMV): the x86 kernels read several panels at once
//! ([`x86::ROW_PANELS`] weight streams per task instead of one).

#[cfg(target_arch = "x86_64")]
use super::x86;
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
use super::{Data, Gemm, Isa, Kernel, RowBlock};

impl Gemm<'_> {
    /// The one row of a GEMV by `panels`, into `c` (the first panel's columns at 0): the x86
    /// kernels read [`x86::ROW_PANELS`] panels at a time, the portable one a panel at a time.
    pub(super) fn row_by_panels(&self, panels: std::ops::Range<usize>, c: &mut [f32]) {
        let (nr, kk) = (self.nr, self.kk);
        #[cfg(target_arch = "x86_64")]
        if let (Kernel::Fma(isa @ (Isa::Avx512 | Isa::Avx2)), RowBlock::F32(a)) =
            (self.kernel, self.rows.block(0))
        {
            assert!(a.len() >= kk && c.len() >= panels.len() * nr, "GEMV operands too short");
            for p0 in panels.clone().step_by(x86::ROW_PANELS) {
                let count = x86::ROW_PANELS.min(panels.end - p0);
                let out = c[(p0 - panels.start) * nr..].as_mut_ptr();
                let at = p0 * kk * nr;
                // SAFETY: the processor has `isa` (`Kernel::Fma` only holds a usable one), `a`
                // and `c` were checked above, and the weight holds `kk * nr` values for every
                // panel up to `panels.end`.
                unsafe {
                    match &self.w.data {
                        Data::F32(w) => fma_rows(isa, count, kk, a, &w[at..], kk * nr, out),
                        Data::Bf16(w) => fma_rows(isa, count, kk, a, &w[at..], kk * nr, out),
                    }
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if let (Kernel::Dp, RowBlock::Pairs(a), Data::Bf16(w)) =
            (self.kernel, self.rows.block(0), &self.w.data)
        {
            assert!(a.len() >= kk && c.len() >= panels.len() * nr, "GEMV operands too short");
            for p0 in panels.clone().step_by(x86::ROW_PANELS) {
                let count = x86::ROW_PANELS.min(panels.end - p0);
                let out = c[(p0 - panels.start) * nr..].as_mut_ptr();
                let b = w[2 * p0 * kk * nr..].as_ptr();
                // SAFETY: pairs are only packed where AVX512_BF16 runs (`PackPath::pairs`);
                // `a` and `c` were checked above, and every panel holds `2 * kk * nr` values.
                unsafe { x86::row_by_panels_dp(count, kk, a.as_ptr(), b, 2 * kk * nr, out) };
            }
            return;
        }
        for p in panels.clone() {
            self.rows_by_panels(0..1, p..p + 1, &mut c[(p - panels.start) * nr..], 0, nr);
        }
    }
}

/// The FMA one-row kernel of `isa` (AVX-512 or AVX2) for `count` panels of `w`.
///
/// # Safety
/// As [`x86::row_by_panels_512`] and [`x86::row_by_panels_256`], the processor having `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn fma_rows<W: super::BLoad>(
    isa: Isa,
    count: usize,
    kk: usize,
    a: &[f32],
    w: &[W],
    stride: usize,
    out: *mut f32,
) {
    if isa == Isa::Avx512 {
        x86::row_by_panels_512(count, kk, a.as_ptr(), w.as_ptr(), stride, out)
    } else {
        x86::row_by_panels_256(count, kk, a.as_ptr(), w.as_ptr(), stride, out)
    }
}
