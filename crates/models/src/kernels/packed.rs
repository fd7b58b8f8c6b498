//! `y = x Wᵀ` against a weight packed once, at load, into the layout the micro-kernels read:
//! the linears of every forward (prefill, decode, any batch), on the CPU.
//!
//! A general GEMM library (the `gemm` crate under candle) repacks `W` on every call, and in bf16
//! candle also widens all of `W` to f32 first: at prefill sizes (128 rows against a 2048 x 5632
//! weight) it ran at half this kernel's rate in f32 and a seventh in bf16 (benches/README.md,
//! `packed_throughput`). Here `W` (`[n, k]`) is stored as panels of
//! `NR` output columns, each panel `k`-major (`[k][NR]`), so a micro-kernel streams one panel
//! contiguously while it keeps an `MR x NR` tile of `y` in registers. The same layout serves a
//! one-row decode step (one contiguous stream per panel, at the memory's rate) and a prefill
//! (each panel slice reused by every block of rows while it sits in cache); no second copy of
//! the weights is kept.
//!
//! Paths, picked at run time ([`Isa`], [`Bf16Path`]): f32 FMAs on AVX-512 (`NR` 32, `MR` up to
//! 12) and AVX2 (`NR` 16, `MR` up to 6), the baseline target (`NR` 16, `MR` 4); bf16 weights
//! multiplied with AVX512_BF16 `vdpbf16ps` (`k` packed in pairs, `[k/2][NR][2]`), with AMX
//! `tdpbf16ps` on the same layout for blocks of 16 rows or more where the processor has it
//! (`amx.rs`; 32 x 32 tiles), or widened to f32 in registers on the other paths. Every path
//! accumulates in f32.

use half::bf16;
use rayon::prelude::*;

use super::bf16::{has_avx512_bf16, Bf16Path, Weight};
use crate::isa::Isa;
pub(crate) use amx::has_amx;
#[cfg(test)]
use blocking::SMALL_WEIGHT;
use blocking::{balanced_chunks, MC};

/// How a weight is packed and multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PackPath {
    /// f32 weights, f32 FMAs of this width.
    F32(Isa),
    /// bf16 weights.
    Bf16(Bf16Path),
}

impl PackPath {
    /// The fastest path on this processor for an f32 or a bf16 weight.
    pub fn current(bf16: bool) -> Self {
        if bf16 {
            Self::Bf16(Bf16Path::for_isa(Isa::current()))
        } else {
            Self::F32(Isa::current())
        }
    }

    /// Output columns per panel: [`PackedWeight::matmul_into`] writes whole panels.
    pub fn panel_width(self) -> usize {
        self.nr()
    }

    /// Rows an f32 micro-kernel takes at once: products of a multiple of it leave no partial
    /// block (a 4-row block runs its FMAs at a third of a 12-row one's rate).
    pub fn row_block(self) -> usize {
        self.kernel(1).tile().1
    }

    /// Output columns per panel (every kernel of a path shares them).
    fn nr(self) -> usize {
        self.kernel(1).tile().0
    }

    /// The micro-kernel a product of `m` rows runs (a path the processor lacks runs as the
    /// widest it has).
    fn kernel(self, m: usize) -> Kernel {
        match self {
            Self::F32(isa) | Self::Bf16(Bf16Path::Widen(isa)) => Kernel::Fma(isa.usable()),
            Self::Bf16(_) if !self.pairs() => Kernel::Fma(Isa::best()),
            Self::Bf16(Bf16Path::Amx) if has_amx() && m >= AMX_MIN_ROWS => Kernel::Amx,
            Self::Bf16(_) => Kernel::Dp,
        }
    }

    /// Whether `k` is packed in pairs for `vdpbf16ps` and AMX.
    fn pairs(self) -> bool {
        matches!(self, Self::Bf16(Bf16Path::Avx512Bf16 | Bf16Path::Amx))
            && has_avx512_bf16()
            && Isa::best() == Isa::Avx512
    }

    /// What `k` is padded to a multiple of: pairs, and whole AMX tiles where AMX runs.
    fn k_multiple(self) -> usize {
        match self {
            Self::Bf16(Bf16Path::Amx) if self.pairs() && has_amx() => 2 * amx::PAIRS,
            _ if self.pairs() => 2,
            _ => 1,
        }
    }

    /// A short name for logs and benchmark output.
    pub fn name(self) -> String {
        match self {
            Self::F32(_) => format!("f32-{}", self.isa_name()),
            Self::Bf16(_) if self.kernel(AMX_MIN_ROWS) == Kernel::Amx => "bf16-amx".into(),
            Self::Bf16(_) if self.pairs() => "bf16-avx512-bf16".into(),
            Self::Bf16(_) => format!("bf16-{}-widen", self.isa_name()),
        }
    }

    fn isa_name(self) -> &'static str {
        match self.kernel(1) {
            Kernel::Fma(isa) => isa.name(),
            Kernel::Dp | Kernel::Amx => Isa::Avx512.name(),
        }
    }
}

/// Rows from which a bf16 product runs on AMX: fewer would leave most of a 16-row tile empty,
/// where `vdpbf16ps` streams the weights as fast.
const AMX_MIN_ROWS: usize = 16;

/// A micro-kernel, with the tile of `y` it computes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kernel {
    /// f32 FMAs (bf16 weights widened in registers) of this width.
    Fma(Isa),
    /// AVX512_BF16 `vdpbf16ps` on `k` pairs.
    Dp,
    /// AMX `tdpbf16ps`.
    Amx,
}

impl Kernel {
    /// Output columns per panel, and the most rows one call takes.
    fn tile(self) -> (usize, usize) {
        match self {
            Self::Fma(Isa::Avx512) | Self::Dp => (32, 12),
            Self::Fma(Isa::Avx2) => (16, 6),
            Self::Fma(Isa::Scalar) => (16, 4),
            Self::Amx => (amx::ROWS, amx::ROWS),
        }
    }

    /// How a block of rows is laid out for this kernel.
    fn layout(self) -> Layout {
        match self {
            Self::Fma(_) => Layout::F32,
            Self::Dp => Layout::Pairs,
            Self::Amx => Layout::Tiles,
        }
    }
}

/// The packed values.
#[derive(Debug, Clone)]
enum Data {
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
}

/// A `[n, k]` weight packed for `y = x Wᵀ`.
#[derive(Debug, Clone)]
pub struct PackedWeight {
    n: usize,
    k: usize,
    path: PackPath,
    data: Data,
}

/// An activation element: f32, or the bf16 of a bf16 model.
pub trait Activation: Copy + Send + Sync {
    /// The value as f32 (exact for bf16).
    fn to_f32(self) -> f32;
    /// The value rounded to bf16 (exact for bf16, and for f32 holding a bf16 value).
    fn to_bf16(self) -> bf16;
    /// The values themselves where they are f32.
    fn as_f32(xs: &[Self]) -> Option<&[f32]> {
        let _ = xs;
        None
    }
}

impl Activation for f32 {
    fn to_f32(self) -> f32 {
        self
    }
    fn as_f32(xs: &[Self]) -> Option<&[f32]> {
        Some(xs)
    }
    fn to_bf16(self) -> bf16 {
        bf16::from_f32(self)
    }
}

impl Activation for bf16 {
    fn to_f32(self) -> f32 {
        self.widen()
    }
    fn to_bf16(self) -> bf16 {
        self
    }
}

impl PackedWeight {
    /// Packs an f32 `[n, k]` weight (row-major) for the f32 kernels of `isa`.
    pub fn pack_f32(w: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        let path = PackPath::F32(isa);
        Self { n, k, path, data: Data::F32(pack(w, n, k, path, true)) }
    }

    /// [`Self::pack_f32`] on the calling thread: for an operand packed inside a task of a
    /// parallel loop (attention's keys, a head a task).
    pub fn pack_f32_on_this_thread(w: &[f32], n: usize, k: usize, isa: Isa) -> Self {
        let path = PackPath::F32(isa);
        Self { n, k, path, data: Data::F32(pack(w, n, k, path, false)) }
    }

    /// Packs a bf16 `[n, k]` weight (row-major) for `path`; it stays bf16.
    pub fn pack_bf16(w: &[bf16], n: usize, k: usize, path: Bf16Path) -> Self {
        let path = PackPath::Bf16(path);
        Self { n, k, path, data: Data::Bf16(pack(w, n, k, path, true)) }
    }

    /// `(n, k)`: output and input features.
    pub fn dims(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The path it was packed for.
    pub fn path(&self) -> PackPath {
        self.path
    }

    /// Packs `W = vᵀ` for the f32 kernels of `isa`, `v` being `[k, n]` row-major: attention's
    /// `P V` with `V` `[keys, head_dim]`. A panel's step `t` is `nr` columns of `v`'s row `t`,
    /// so packing copies contiguous runs (no transpose).
    pub fn pack_f32_transposed(v: &[f32], k: usize, n: usize, isa: Isa) -> Self {
        assert_eq!(v.len(), k * n, "v is not [k, n]");
        let path = PackPath::F32(isa);
        let nr = path.nr();
        let mut out = vec![0f32; n.div_ceil(nr) * k * nr];
        for (p, panel) in out.chunks_exact_mut(k * nr).enumerate() {
            let cols = p * nr..n.min((p + 1) * nr);
            for (t, step) in panel.chunks_exact_mut(nr).enumerate() {
                step[..cols.len()].copy_from_slice(&v[t * n..][cols.clone()]);
            }
        }
        Self { n, k, path, data: Data::F32(out) }
    }

    /// Packs a `[n, k]` weight for the f32 kernels of `isa` from `fill(panel, values)`, which
    /// writes panel `panel`'s `[k][nr]` values ([`PackPath::panel_width`] columns of `Wᵀ` a
    /// step, those past `n` left zero), the panels in parallel: for an operand built straight
    /// into the layout, like a convolution's unfolded input.
    pub fn pack_f32_with(
        n: usize,
        k: usize,
        isa: Isa,
        fill: impl Fn(usize, &mut [f32]) + Sync,
    ) -> Self {
        let path = PackPath::F32(isa);
        let nr = path.nr();
        let mut out = vec![0f32; n.div_ceil(nr) * k * nr];
        if k > 0 {
            out.par_chunks_mut(k * nr).enumerate().for_each(|(p, panel)| fill(p, panel));
        }
        Self { n, k, path, data: Data::F32(out) }
    }

    /// Columns [`Self::matmul_into`] writes: `n` rounded up to whole panels.
    pub fn padded_n(&self) -> usize {
        self.n.div_ceil(self.path.nr()) * self.path.nr()
    }

    /// `[m, k] x Wᵀ` on the calling thread, for products inside the tasks of a parallel loop
    /// (attention, a head a task). `x`'s rows are `ldx` apart; `out` gets `m` rows `ldc` apart,
    /// each [`Self::padded_n`] wide (the padding columns zero). f32 weights only.
    pub fn matmul_into(&self, x: &[f32], ldx: usize, m: usize, out: &mut [f32], ldc: usize) {
        assert!(matches!(self.path, PackPath::F32(_)), "matmul_into takes f32 weights");
        assert!(ldx >= self.k && ldc >= self.padded_n(), "row strides too small");
        assert!(m == 0 || x.len() >= (m - 1) * ldx + self.k, "x is not [m, k]");
        assert!(m == 0 || out.len() >= (m - 1) * ldc + self.padded_n(), "out is not [m, n]");
        if m == 0 || self.n == 0 {
            return;
        }
        let kernel = self.path.kernel(m);
        let (nr, mr) = kernel.tile();
        let blocks: Vec<(usize, usize)> = (0..m).step_by(mr).map(|r| (r, mr.min(m - r))).collect();
        let rows = PackedRows::Strided(x, ldx);
        let gemm = Gemm { w: self, rows: &rows, blocks: &blocks, kernel, nr, kk: self.k };
        gemm.chunk_by_panels(0..blocks.len(), 0..self.n.div_ceil(nr), out, ldc);
    }

    /// `[m, k] x Wᵀ -> [m, n]`, f32 out.
    pub fn matmul<A: Activation>(&self, x: &[A], m: usize) -> Vec<f32> {
        assert_eq!(x.len(), m * self.k, "x is not [m, k] for k = {}", self.k);
        if m == 0 || self.n == 0 {
            return Vec::new();
        }
        let kernel = self.path.kernel(m);
        let (nr, mr) = kernel.tile();
        let panels = self.n.div_ceil(nr);
        // Steps of `k` per panel row: `k`, or its pairs (padded as the panels are).
        let kk = self.k.div_ceil(self.path.k_multiple()) * self.path.k_multiple();
        let kk = if self.path.pairs() { kk / 2 } else { kk };
        // Rows in blocks of `mr`, laid out as the kernel reads them.
        let blocks: Vec<(usize, usize)> = (0..m).step_by(mr).map(|r| (r, mr.min(m - r))).collect();
        let rows = PackedRows::new(x, self.k, kk, &blocks, kernel.layout());
        let gemm = Gemm { w: self, rows: &rows, blocks: &blocks, kernel, nr, kk };
        // The output, `panels * nr` columns wide (the last panel's padding dropped at the end).
        let ldp = panels * nr;
        let per_chunk = gemm.chunk_blocks();
        let threads = rayon::current_num_threads();
        let y = if blocks.len().div_ceil(MC.div_ceil(mr)) >= 2 * threads {
            // Many rows (a long prefill, a vision tower): tasks own chunks of rows, each
            // writing its rows of `y` in place, all panels streaming past its rows in L2.
            let mut y = super::zeroed(m * ldp);
            let chunks = balanced_chunks(blocks.len(), per_chunk, threads);
            let mut outs = Vec::with_capacity(chunks.len());
            let mut rest = &mut y[..];
            for chunk in &chunks {
                let rows = blocks[chunk.clone()].iter().map(|b| b.1).sum::<usize>();
                let (out, tail) = rest.split_at_mut(rows * ldp);
                outs.push(out);
                rest = tail;
            }
            chunks.into_par_iter().zip(outs).for_each(|(chunk, out)| {
                gemm.chunk_by_panels(chunk, 0..panels, out, ldp);
            });
            y
        } else {
            // Few rows (decode, a short prefill): tasks own runs of panels.
            let per_task = panels.div_ceil(threads * 4).max(1);
            let parts: Vec<Vec<f32>> = (0..panels.div_ceil(per_task))
                .into_par_iter()
                .map(|t| {
                    let p = t * per_task..panels.min((t + 1) * per_task);
                    let ldc = p.len() * nr;
                    let mut c = vec![0f32; m * ldc];
                    if blocks.len() == 1 {
                        // A few rows (a decode step): the panels stream from memory, several
                        // at once where the kernel allows.
                        gemm.block_by_panels(p, &mut c, ldc);
                    } else {
                        for chunk in (0..blocks.len()).step_by(per_chunk) {
                            let chunk = chunk..blocks.len().min(chunk + per_chunk);
                            let r0 = blocks[chunk.start].0;
                            gemm.chunk_by_panels(chunk, p.clone(), &mut c[r0 * ldc..], ldc);
                        }
                    }
                    c
                })
                .collect();
            let mut y = super::zeroed(m * ldp);
            y.par_chunks_mut(ldp).enumerate().with_min_len(8).for_each(|(i, row)| {
                for (t, part) in parts.iter().enumerate() {
                    let ldc = part.len() / m;
                    row[t * per_task * nr..][..ldc].copy_from_slice(&part[i * ldc..][..ldc]);
                }
            });
            y
        };
        unpad(y, m, ldp, self.n)
    }
}

/// Drops the padding columns of `[m, ldp]` in place: `[m, n]`.
fn unpad(mut y: Vec<f32>, m: usize, ldp: usize, n: usize) -> Vec<f32> {
    if ldp != n {
        for i in 1..m {
            y.copy_within(i * ldp..i * ldp + n, i * n);
        }
        y.truncate(m * n);
    }
    y
}

/// One product's operands, for the loops over its tiles.
struct Gemm<'a> {
    w: &'a PackedWeight,
    rows: &'a PackedRows<'a>,
    blocks: &'a [(usize, usize)],
    kernel: Kernel,
    nr: usize,
    /// Steps of `k` per panel row: `k`, or `k / 2` rounded up for pairs.
    kk: usize,
}

impl Gemm<'_> {
    /// One micro-kernel call: row block `bi` against `panel`, over `k` steps `[kb, kb + kc)`
    /// (the first block of steps overwrites the tile, the others add to it).
    fn tile(&self, bi: usize, panel: usize, kb: usize, c: &mut [f32], ldc: usize) {
        let (nr, rows, kc) = (self.nr, self.blocks[bi].1, self.kernel.kc().min(self.kk - kb));
        // The panel's slice for these steps: `[kc][nr]` values, or `[kc][nr][2]` pairs; and
        // this block's rows for them.
        let b = (panel * self.kk + kb) * nr;
        let steps = kb * rows..(kb + kc) * rows;
        let acc = kb > 0;
        let isa = match self.kernel {
            Kernel::Fma(isa) => isa,
            Kernel::Dp | Kernel::Amx => Isa::Avx512,
        };
        match (&self.w.data, self.rows.block(bi)) {
            (Data::F32(w), RowBlock::F32(a)) => {
                f32_tile(isa, rows, kc, &a[steps], &w[b..][..kc * nr], c, ldc, acc)
            }
            (Data::F32(w), RowBlock::Strided(x, ld)) => {
                let a = &x[self.blocks[bi].0 * ld + kb..];
                f32_tile_strided(isa, rows, kc, (a, ld), &w[b..][..kc * nr], c, ldc, acc)
            }
            (Data::Bf16(w), RowBlock::F32(a)) => {
                f32_tile(isa, rows, kc, &a[steps], &w[b..][..kc * nr], c, ldc, acc)
            }
            (Data::Bf16(w), RowBlock::Pairs(a)) => {
                pairs_tile(rows, kc, &a[steps], &w[2 * b..][..2 * kc * nr], c, ldc, acc)
            }
            (Data::Bf16(w), RowBlock::Tiles(a)) => {
                let a = &a[kb / amx::PAIRS * amx::STEP..][..kc / amx::PAIRS * amx::STEP];
                amx_tile(rows, kc, a, &w[2 * b..][..2 * kc * nr], c, ldc, acc)
            }
            (Data::F32(_), RowBlock::Pairs(_) | RowBlock::Tiles(_)) => {
                unreachable!("f32 weights are never packed in pairs")
            }
            (Data::Bf16(_), RowBlock::Strided(..)) => {
                unreachable!("rows are read in place for f32 weights only")
            }
        }
    }
}

/// `w` (`[n, k]`) as panels of `nr` columns, `[k][nr]` each, or `[k/2][nr][2]` for pairs;
/// columns past `n` and the odd `k`'s partner are zero. Panels in parallel, or on the calling
/// thread.
fn pack<W: Copy + Default + Send + Sync>(
    w: &[W],
    n: usize,
    k: usize,
    path: PackPath,
    parallel: bool,
) -> Vec<W> {
    assert_eq!(w.len(), n * k, "weight is not [n, k]");
    let nr = path.nr();
    let step = if path.pairs() { 2 } else { 1 };
    let kk = k.div_ceil(path.k_multiple()) * path.k_multiple();
    let mut out = vec![W::default(); n.div_ceil(nr) * kk * nr];
    let fill = |(p, panel): (usize, &mut [W])| {
        let rows: Vec<&[W]> = (p * nr..n.min((p + 1) * nr)).map(|j| &w[j * k..][..k]).collect();
        if step == 2 {
            gather::<2, W>(panel, &rows, nr);
        } else {
            gather::<1, W>(panel, &rows, nr);
        }
    };
    if parallel {
        out.par_chunks_mut(kk * nr).enumerate().for_each(fill);
    } else {
        out.chunks_mut(kk * nr).enumerate().for_each(fill);
    }
    out
}

/// Fills a panel in its own order (`[t / STEP][j][t % STEP]` for weight row `j`, `k` step
/// `t`): the writes are sequential and the rows' cache lines, read 32 bytes at a time each,
/// stay in L1.
#[inline(always)]
fn gather<const STEP: usize, W: Copy>(panel: &mut [W], rows: &[&[W]], nr: usize) {
    let k = rows.first().map_or(0, |r| r.len());
    for t0 in (0..k).step_by(STEP) {
        let out = &mut panel[t0 * nr..][..nr * STEP];
        for (j, row) in rows.iter().enumerate() {
            for e in 0..STEP.min(k - t0) {
                out[j * STEP + e] = row[t0 + e];
            }
        }
    }
}

/// How a kernel reads a block of rows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Layout {
    /// `[k][rows]` f32.
    F32,
    /// `[k/2][rows]` bf16 pairs.
    Pairs,
    /// bf16 AMX tiles: per 32 values of `k`, `[32 rows][32]` (zero-padded rows).
    Tiles,
}

/// The rows of `x`, block by block, in the order the kernels read them.
enum PackedRows<'a> {
    F32(Vec<Vec<f32>>),
    /// f32 rows read in place, `.1` apart (the FMA tiles only): for products whose rows would
    /// cost as much to lay out as to multiply, like attention's `p v` (`k` = keys, a few panels).
    Strided(&'a [f32], usize),
    /// bf16 pairs as one u32 (low half the even `k`), what `vdpbf16ps` broadcasts.
    Pairs(Vec<Vec<u32>>),
    /// bf16 rows, what AMX loads as tiles.
    Tiles(Vec<Vec<bf16>>),
}

/// One block of [`PackedRows`].
enum RowBlock<'a> {
    F32(&'a [f32]),
    /// All of `x` and its row stride.
    Strided(&'a [f32], usize),
    Pairs(&'a [u32]),
    Tiles(&'a [bf16]),
}

impl PackedRows<'_> {
    fn block(&self, i: usize) -> RowBlock<'_> {
        match self {
            Self::F32(b) => RowBlock::F32(&b[i]),
            Self::Strided(x, ld) => RowBlock::Strided(x, *ld),
            Self::Pairs(b) => RowBlock::Pairs(&b[i]),
            Self::Tiles(b) => RowBlock::Tiles(&b[i]),
        }
    }

    /// `x` (`[m, k]`) in `blocks`, for a kernel of `layout` taking `kk` steps of `k` (the
    /// padding past `k` zero).
    fn new<A: Activation>(
        x: &[A],
        k: usize,
        kk: usize,
        blocks: &[(usize, usize)],
        layout: Layout,
    ) -> Self {
        let row = |r: usize| &x[r * k..][..k];
        match layout {
            Layout::Pairs => Self::Pairs(
                blocks
                    .par_iter()
                    .map(|&(r0, rows)| {
                        let mut out = vec![0u32; kk * rows];
                        for i in 0..rows {
                            for (t, v) in row(r0 + i).iter().enumerate() {
                                let bits = u32::from(v.to_bf16().to_bits());
                                out[(t / 2) * rows + i] |= bits << (16 * (t % 2));
                            }
                        }
                        out
                    })
                    .collect(),
            ),
            Layout::Tiles => Self::Tiles(
                blocks
                    .par_iter()
                    .map(|&(r0, rows)| {
                        const W: usize = 2 * amx::PAIRS;
                        let mut out = vec![bf16::ZERO; amx::ROWS * 2 * kk];
                        for i in 0..rows {
                            for (s, vs) in row(r0 + i).chunks(W).enumerate() {
                                let o = &mut out[s * amx::STEP + i * W..][..vs.len()];
                                for (o, v) in o.iter_mut().zip(vs) {
                                    *o = v.to_bf16();
                                }
                            }
                        }
                        out
                    })
                    .collect(),
            ),
            Layout::F32 => Self::F32(blocks.par_iter().map(|&b| f32_block(x, k, kk, b)).collect()),
        }
    }
}

/// One block of `rows` rows from `r0` of `x` (`[m, k]`) as `[kk][rows]` f32, the steps past `k`
/// zero.
fn f32_block<A: Activation>(x: &[A], k: usize, kk: usize, (r0, rows): (usize, usize)) -> Vec<f32> {
    let mut out = vec![0f32; kk * rows];
    match A::as_f32(&x[r0 * k..(r0 + rows) * k]) {
        Some(src) => transpose::rows_to_steps(src, k, rows, &mut out),
        None => {
            for i in 0..rows {
                for (t, v) in x[(r0 + i) * k..][..k].iter().enumerate() {
                    out[t * rows + i] = v.to_f32();
                }
            }
        }
    }
    out
}

/// One `rows x NR` tile: `c = a · b` (or `c += a · b` with `accumulate`) over `kc` steps, `a`
/// `[kc][rows]`, `b` `[kc][NR]` f32 or bf16 (widened in registers).
#[allow(clippy::too_many_arguments)]
fn f32_tile<W: Weight + BLoad>(
    isa: Isa,
    rows: usize,
    kc: usize,
    a: &[f32],
    b: &[W],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (nr, _) = Kernel::Fma(isa).tile();
    assert!(a.len() >= kc * rows && b.len() >= kc * nr, "tile operands too short");
    assert!(c.len() >= (rows - 1) * ldc + nr, "tile output too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is usable (`PackPath::isa`), and the lengths were checked above.
        Isa::Avx512 => unsafe { x86::by_rows_512(rows, kc, a, b, c, ldc, accumulate) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::by_rows_256(rows, kc, a, b, c, ldc, accumulate) },
        _ => portable_tile(rows, kc, |t, i| a[t * rows + i], b, c, ldc, accumulate),
    }
}

/// [`f32_tile`] with the rows read in place: row `i`'s step `t` at `a.0[i * a.1 + t]`.
#[allow(clippy::too_many_arguments)]
fn f32_tile_strided(
    isa: Isa,
    rows: usize,
    kc: usize,
    (a, lda): (&[f32], usize),
    b: &[f32],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    let (nr, _) = Kernel::Fma(isa).tile();
    assert!(a.len() >= (rows - 1) * lda + kc && b.len() >= kc * nr, "tile operands too short");
    assert!(c.len() >= (rows - 1) * ldc + nr, "tile output too short");
    match isa {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `isa` is usable (`PackPath::isa`), and the lengths were checked above.
        Isa::Avx512 => unsafe {
            x86::by_rows_512_strided(rows, kc, (a, lda), b, c, ldc, accumulate)
        },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Isa::Avx2 => unsafe { x86::by_rows_256_strided(rows, kc, (a, lda), b, c, ldc, accumulate) },
        _ => portable_tile(rows, kc, |t, i| a[i * lda + t], b, c, ldc, accumulate),
    }
}

/// The `vdpbf16ps` tile: `a` `[kc][rows]` bf16 pairs, `b` `[kc][32][2]` bf16.
#[allow(clippy::too_many_arguments)]
fn pairs_tile(
    rows: usize,
    kc: usize,
    a: &[u32],
    b: &[bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    assert!(a.len() >= kc * rows && b.len() >= kc * 64, "tile operands too short");
    assert!(c.len() >= (rows - 1) * ldc + 32, "tile output too short");
    #[cfg(target_arch = "x86_64")]
    // SAFETY: pairs are only packed when the processor has AVX-512 and AVX512_BF16
    // (`PackPath::pairs`); lengths checked above.
    unsafe {
        x86::by_rows_dp(rows, kc, a, b, c, ldc, accumulate)
    }
    #[cfg(not(target_arch = "x86_64"))]
    unreachable!("pairs are only packed on x86-64")
}

/// The AMX tile: `a` this block of steps' `A` tiles, `b` `[kc][32][2]` bf16; a block of fewer
/// than 32 rows goes through a full tile of its own.
fn amx_tile(
    rows: usize,
    kc: usize,
    a: &[bf16],
    b: &[bf16],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    const R: usize = amx::ROWS;
    assert!(
        kc.is_multiple_of(amx::PAIRS) && a.len() >= kc / amx::PAIRS * amx::STEP,
        "tile operands short"
    );
    assert!(b.len() >= kc * 64 && c.len() >= (rows - 1) * ldc + R, "tile output too short");
    assert!(has_amx(), "AMX rows are only packed where AMX runs");
    if rows == R {
        // SAFETY: AMX runs here (checked above), and the lengths were checked above.
        unsafe { amx::tile(kc, a.as_ptr(), b.as_ptr(), c.as_mut_ptr(), ldc, accumulate) };
        return;
    }
    let mut tile = [0f32; R * R];
    if accumulate {
        for (t, c) in tile.chunks_exact_mut(R).zip(c.chunks(ldc)).take(rows) {
            t.copy_from_slice(&c[..R]);
        }
    }
    // SAFETY: as above, `tile` being a whole tile.
    unsafe { amx::tile(kc, a.as_ptr(), b.as_ptr(), tile.as_mut_ptr(), R, accumulate) };
    for (t, c) in tile.chunks_exact(R).zip(c.chunks_mut(ldc)).take(rows) {
        c[..R].copy_from_slice(t);
    }
}

/// The baseline target's tile: `NR` 16, plain multiply and add (no FMA there).
fn portable_tile<W: Weight>(
    rows: usize,
    kc: usize,
    a: impl Fn(usize, usize) -> f32,
    b: &[W],
    c: &mut [f32],
    ldc: usize,
    accumulate: bool,
) {
    for r0 in (0..rows).step_by(4) {
        let mr = 4.min(rows - r0);
        let mut acc = [[0f32; 16]; 4];
        for p in 0..kc {
            let bp = &b[p * 16..][..16];
            for (i, acc) in acc.iter_mut().enumerate().take(mr) {
                let ai = a(p, r0 + i);
                for (o, w) in acc.iter_mut().zip(bp) {
                    *o += ai * w.widen();
                }
            }
        }
        for (i, acc) in acc.iter().enumerate().take(mr) {
            let out = &mut c[(r0 + i) * ldc..][..16];
            for (o, v) in out.iter_mut().zip(acc) {
                *o = if accumulate { *o + v } else { *v };
            }
        }
    }
}

/// Loading a panel's values into vector registers (f32 as is, bf16 widened).
pub(crate) trait BLoad: Copy {
    /// 16 values at `p` as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load16(p: *const Self) -> std::arch::x86_64::__m512;
    /// 8 values at `p` as f32 lanes.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> std::arch::x86_64::__m256;
}

#[cfg(target_arch = "x86_64")]
mod amx;
/// No AMX off x86-64: the path falls back to the others and its kernel is never called.
#[cfg(not(target_arch = "x86_64"))]
mod amx {
    pub(super) const ROWS: usize = 32;
    pub(super) const PAIRS: usize = 16;
    pub(super) const STEP: usize = ROWS * 2 * PAIRS;
    pub(crate) fn has_amx() -> bool {
        false
    }
    pub(super) unsafe fn tile(
        _: usize,
        _: *const half::bf16,
        _: *const half::bf16,
        _: *mut f32,
        _: usize,
        _: bool,
    ) {
        unreachable!("AMX is x86-64 only")
    }
}
#[cfg(target_arch = "x86_64")]
mod x86;
#[cfg(not(target_arch = "x86_64"))]
impl BLoad for f32 {}
#[cfg(not(target_arch = "x86_64"))]
impl BLoad for bf16 {}

mod blocking;
mod row;
#[cfg(test)]
mod tests;
mod transpose;
