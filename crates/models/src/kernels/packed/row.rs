//! The products of one block of rows (decode steps): where the x86 kernels can hold the
//! accumulators, they read several panels at once ([`x86::panels_at_once`] weight streams per
//! task instead of one); otherwise each panel streams in one run through the tile.

#[cfg(target_arch = "x86_64")]
use super::x86;
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_imports))]
use super::{BLoad, Data, Gemm, Isa, Kernel, RowBlock};

impl Gemm<'_> {
    /// The only row block (`m` rows, at most one kernel's `MR`) by `panels`, into `c` (the
    /// first panel's columns at 0, rows `ldc` apart).
    pub(super) fn block_by_panels(
        &self,
        panels: std::ops::Range<usize>,
        c: &mut [f32],
        ldc: usize,
    ) {
        let (nr, kk, rows) = (self.nr, self.kk, self.blocks[0].1);
        #[cfg(target_arch = "x86_64")]
        {
            let at_once = match self.kernel {
                Kernel::Fma(isa @ (Isa::Avx512 | Isa::Avx2)) => {
                    x86::panels_at_once(isa == Isa::Avx512, rows)
                }
                Kernel::Dp => x86::panels_at_once(true, rows),
                _ => 1,
            };
            if at_once > 1 {
                assert!(c.len() >= (rows - 1) * ldc + panels.len() * nr, "output too short");
                for p0 in panels.clone().step_by(at_once) {
                    let count = at_once.min(panels.end - p0);
                    let out = (c[(p0 - panels.start) * nr..].as_mut_ptr(), ldc);
                    // SAFETY: the kernel's instructions run here (`Kernel::Fma` holds a usable
                    // ISA, pairs are only packed where AVX512_BF16 runs); `a` holds the block
                    // (`kk * rows`, checked below), `c` was checked above, and every panel up
                    // to `panels.end` holds `kk * nr` values (pairs: `2 * kk * nr`).
                    unsafe {
                        match (self.kernel, self.rows.block(0), &self.w.data) {
                            (Kernel::Fma(isa), RowBlock::F32(a), Data::F32(w)) => {
                                fma_rows(isa, (rows, count), kk, a, &w[p0 * kk * nr..], nr, out)
                            }
                            (Kernel::Fma(isa), RowBlock::F32(a), Data::Bf16(w)) => {
                                fma_rows(isa, (rows, count), kk, a, &w[p0 * kk * nr..], nr, out)
                            }
                            (Kernel::Dp, RowBlock::Pairs(a), Data::Bf16(w)) => {
                                assert!(a.len() >= kk * rows, "rows too short");
                                let b = (w[2 * p0 * kk * nr..].as_ptr(), 2 * kk * nr);
                                x86::rows_by_panels_dp((rows, count), kk, a.as_ptr(), b, out)
                            }
                            _ => unreachable!("a kernel with its own rows' layout"),
                        }
                    }
                }
                return;
            }
        }
        for p in panels.clone() {
            self.rows_by_panels(0..1, p..p + 1, &mut c[(p - panels.start) * nr..], 0, ldc);
        }
    }
}

/// The FMA few-row kernel of `isa` (AVX-512 or AVX2): `rows` rows by `count` panels of `w`
/// (`kk * nr` values apart).
///
/// # Safety
/// As [`x86::rows_by_panels_512`] and [`x86::rows_by_panels_256`], the processor having `isa`.
#[cfg(target_arch = "x86_64")]
unsafe fn fma_rows<W: BLoad>(
    isa: Isa,
    (rows, count): (usize, usize),
    kk: usize,
    a: &[f32],
    w: &[W],
    nr: usize,
    out: (*mut f32, usize),
) {
    assert!(a.len() >= kk * rows && w.len() >= count * kk * nr, "operands too short");
    let b = (w.as_ptr(), kk * nr);
    if isa == Isa::Avx512 {
        x86::rows_by_panels_512((rows, count), kk, a.as_ptr(), b, out)
    } else {
        x86::rows_by_panels_256((rows, count), kk, a.as_ptr(), b, out)
    }
}
