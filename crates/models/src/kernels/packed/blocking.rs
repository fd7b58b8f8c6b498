//! How a product's micro-kernel calls are ordered over the caches: `k` in blocks of [`KC`]
//! steps, rows in chunks (one task each when tasks own rows), panels in groups, sized from
//! this core's L2 where the weight streams from memory.
//!
//! The order within a chunk is `KC` step, then row block, then panel: a row block's slice of
//! `k` stays in L1 while the group's panel slices pass over it from L2, and the chunk's tiles
//! of `y` stay in L2 across the `KC` steps. For the decoder's weights this, with `KC` 512 and
//! chunks of a third of L2, ran the 1024-row products 5-10 % faster on an Intel Xeon than
//! panel slices held in L1 while 16 row blocks passed (benches/README.md).

use std::ops::Range;

use super::{Data, Gemm, Kernel};

/// Steps of `k` per cache block for the FMA tiles: a 12-row block's slice (24 KiB in f32)
/// stays in L1 while a group's panel slices (64 KiB each at `NR` 32) stream past from L2.
pub(super) const KC: usize = 512;

/// Pairs of `k` per cache block for `vdpbf16ps` and AMX (the blocking they were tuned on).
pub(super) const KC_PAIRS: usize = 256;

/// Rows per chunk where the weight stays in a near cache, and for the bf16 pair kernels:
/// `MC x KC` of the packed rows stay in L2 while a task's panels pass over them. Also the
/// chunk size that decides when tasks own rows rather than panels.
pub(super) const MC: usize = 192;

/// Panels per group for the bf16 pair kernels: the chunk's `MC x NC * NR` tiles of `y` stay in
/// L2 across the `KC` steps.
const NC: usize = 8;

/// Packed weights up to this size count as cache-resident for [`Gemm::blocking`].
pub(super) const SMALL_WEIGHT: usize = 16 << 20;

/// This CPU's share of L2 in bytes (1 MiB where it is not known).
fn l2_bytes() -> usize {
    crate::cpu_caches::share_of(2).unwrap_or(1 << 20)
}

/// `blocks` row blocks split into chunks of at most `per_chunk`, as many as a multiple of
/// `threads` and as even as blocks allow: a prefill of 8 x 128 rows in chunks of 192 would
/// leave one of two threads a third of a chunk to run alone (the product about 11 % longer).
pub(super) fn balanced_chunks(
    blocks: usize,
    per_chunk: usize,
    threads: usize,
) -> Vec<Range<usize>> {
    let count = blocks.div_ceil(per_chunk).div_ceil(threads) * threads;
    let count = count.clamp(1, blocks.max(1));
    (0..count).map(|i| i * blocks / count..(i + 1) * blocks / count).collect()
}

impl Kernel {
    /// Steps of `k` (or pairs) per cache block.
    pub(super) fn kc(self) -> usize {
        match self {
            Self::Fma(_) => KC,
            Self::Dp | Self::Amx => KC_PAIRS,
        }
    }
}

impl Gemm<'_> {
    /// Whether the weight stays in a near cache (up to [`SMALL_WEIGHT`]: the vision towers').
    fn small_weight(&self) -> bool {
        let bytes = match &self.w.data {
            Data::F32(w) => std::mem::size_of_val(&w[..]),
            Data::Bf16(w) => std::mem::size_of_val(&w[..]),
        };
        bytes <= SMALL_WEIGHT
    }

    /// Row blocks per chunk: for an FMA product streaming its weight from memory, as many rows
    /// as fill a third of L2 with one `KC` step of them (28 blocks of 12 with a 2 MiB L2), as
    /// each chunk reads the whole weight. At 1024 rows on an Intel Xeon, chunks of 22-43 blocks
    /// (4 or 2 chunks) ran 5-10 % faster than of 11-16 (8 or 6). Otherwise `MC` rows.
    pub(super) fn chunk_blocks(&self) -> usize {
        let mr = self.kernel.tile().1;
        match self.kernel {
            Kernel::Fma(_) if !self.small_weight() => (l2_bytes() / 3 / (KC * 4 * mr)).max(1),
            _ => MC.div_ceil(mr),
        }
    }

    /// Row blocks per sub-chunk and panels per group.
    ///
    /// - A cache-resident weight under the FMA tiles is worth re-reading for every few row
    ///   blocks, so the sub-chunk's tiles of `y` (72 x 32) stay in L1 across the `KC` steps: 6
    ///   blocks by one panel ran the vision shapes 4-20 % faster than 16 by 8 on an Intel Xeon.
    /// - A larger one under the FMA tiles: the whole chunk by as many panels as fill an eighth
    ///   of L2 with one `KC` step of them (4 at `NR` 32 in f32 with a 2 MiB L2; 4 ran best of
    ///   2-24), read from memory once per chunk.
    /// - The bf16 pair kernels keep the blocking they were tuned on: `MC` rows by `NC` panels.
    fn blocking(&self) -> (usize, usize) {
        let elem = match &self.w.data {
            Data::F32(_) => 4,
            Data::Bf16(_) => 2,
        };
        match self.kernel {
            Kernel::Fma(_) if self.small_weight() => (6, 1),
            Kernel::Fma(_) => (usize::MAX, (l2_bytes() / 8 / (KC * self.nr * elem)).max(1)),
            Kernel::Dp | Kernel::Amx => (MC.div_ceil(self.kernel.tile().1), NC),
        }
    }

    /// The tiles of row blocks `chunk` by `panels`, written to `out` (the chunk's first row,
    /// the first panel's column; `ldc` apart), in sub-chunks and panel groups sized for the
    /// weight ([`Gemm::blocking`]).
    pub(super) fn chunk_by_panels(
        &self,
        chunk: Range<usize>,
        panels: Range<usize>,
        out: &mut [f32],
        ldc: usize,
    ) {
        let r0 = self.blocks[chunk.start].0;
        let (sub, group) = self.blocking();
        for s in chunk.clone().step_by(sub) {
            let rows = s..chunk.end.min(s.saturating_add(sub));
            let rs = self.blocks[s].0;
            for g in panels.clone().step_by(group) {
                let at = (rs - r0) * ldc + (g - panels.start) * self.nr;
                let group = g..panels.end.min(g + group);
                self.rows_by_panels(rows.clone(), group, &mut out[at..], rs, ldc);
            }
        }
    }

    /// The tiles of row blocks `chunk` (the first at row `r0`) by panels `panels`, written to
    /// `out` (row `r0`, column of the first panel; `ldc` apart): `KC` steps outermost, then row
    /// blocks, then panels. The bf16 pair kernels run faster in this order too (AMX 3-20 %,
    /// `vdpbf16ps` 5 % at 1024 rows on an Intel Xeon) than each panel's slice passing over the
    /// row blocks, on their own blocking.
    pub(super) fn rows_by_panels(
        &self,
        chunk: Range<usize>,
        panels: Range<usize>,
        out: &mut [f32],
        r0: usize,
        ldc: usize,
    ) {
        for kb in (0..self.kk).step_by(self.kernel.kc()) {
            for bi in chunk.clone() {
                let row = (self.blocks[bi].0 - r0) * ldc;
                for panel in panels.clone() {
                    let c = &mut out[row + (panel - panels.start) * self.nr..];
                    self.tile(bi, panel, kb, c, ldc);
                }
            }
        }
    }
}
