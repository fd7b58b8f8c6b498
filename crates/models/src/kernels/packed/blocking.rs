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
use std::sync::OnceLock;

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

/// This core's share of L2 in bytes: its size over the logical CPUs sharing it (sysfs on
/// Linux; 1 MiB where it cannot be read).
fn l2_bytes() -> usize {
    static L2: OnceLock<usize> = OnceLock::new();
    *L2.get_or_init(|| read_l2().unwrap_or(1 << 20))
}

fn read_l2() -> Option<usize> {
    let dir = std::path::Path::new("/sys/devices/system/cpu/cpu0/cache");
    (0..8).find_map(|i| {
        let index = dir.join(format!("index{i}"));
        let read = |f: &str| std::fs::read_to_string(index.join(f)).ok();
        let kind = read("type")?;
        if read("level")?.trim() != "2" || kind.trim() == "Instruction" {
            return None;
        }
        let sharing = read("shared_cpu_list").and_then(|l| count_cpus(l.trim())).unwrap_or(1);
        Some(parse_size(read("size")?.trim())? / sharing)
    })
}

/// The CPUs in a sysfs list (`0-3,8,10-11`).
fn count_cpus(list: &str) -> Option<usize> {
    let mut count = 0;
    for part in list.split(',') {
        count += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()?.checked_sub(a.parse().ok()?)? + 1,
            None => part.parse::<usize>().map(|_| 1).ok()?,
        };
    }
    (count > 0).then_some(count)
}

/// A sysfs cache size: `2048K`, `1M`, or bytes.
fn parse_size(s: &str) -> Option<usize> {
    let (digits, unit) = match s.char_indices().find(|(_, c)| !c.is_ascii_digit()) {
        Some((i, _)) => s.split_at(i),
        None => (s, ""),
    };
    let scale = match unit {
        "" => 1,
        "K" => 1 << 10,
        "M" => 1 << 20,
        _ => return None,
    };
    digits.parse::<usize>().ok().filter(|&v| v > 0).map(|v| v * scale)
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_sizes_and_cpu_lists_parse_as_sysfs_writes_them() {
        assert_eq!(parse_size("2048K"), Some(2 << 20));
        assert_eq!(parse_size("1M"), Some(1 << 20));
        assert_eq!(parse_size("524288"), Some(512 << 10));
        assert_eq!(parse_size("0K"), None);
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(count_cpus("0"), Some(1));
        assert_eq!(count_cpus("0-3,8,10-11"), Some(7));
        assert_eq!(count_cpus("3-1"), None);
        assert_eq!(count_cpus(""), None);
        assert!(l2_bytes() >= 64 << 10, "L2 {} bytes", l2_bytes());
    }
}
