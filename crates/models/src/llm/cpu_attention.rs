//! The CPU kernels of the paged KV cache: writing a step's new keys and values into the pool
//! (one in-place copy per layer), and causal attention of the whole step's queries over the
//! pool, read in place through the block tables.
//!
//! Attention threads over (sequence, KV head, block of query rows); a work item computes, for
//! the query heads sharing that KV head (read once for all of them), its
//! score rows against the sequence's context only (positions `0..=p` of query at position `p`,
//! so the causal mask is the loop bound: nothing is masked, built or uploaded). Scores, softmax
//! and the weighted sum run in f32; for bf16/f16 models the intermediate results are rounded to
//! the working dtype where the reference's eager attention rounds them (after `q k^T`, after the
//! scaling, after the softmax), so the kernel keeps the old matmul path's numerics.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp3, DType, InplaceOp2, Layout, Result, Shape};
use half::{bf16, f16};
use rayon::prelude::*;

use super::step::StepMeta;
use crate::isa::Isa;
use crate::kernels::{dot_impl, softmax_row_impl};

/// Element types of the pool and the activations.
trait Elem: Copy + Send + Sync + 'static {
    fn load(self) -> f32;
    fn store(x: f32) -> Self;
    /// `x` rounded to this type (identity for f32).
    #[inline(always)]
    fn round(x: f32) -> f32 {
        Self::store(x).load()
    }
}

impl Elem for f32 {
    #[inline(always)]
    fn load(self) -> f32 {
        self
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        x
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        x
    }
}

impl Elem for bf16 {
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        bf16::from_f32(x)
    }
}

impl Elem for f16 {
    #[inline(always)]
    fn load(self) -> f32 {
        self.to_f32()
    }
    #[inline(always)]
    fn store(x: f32) -> Self {
        f16::from_f32(x)
    }
}

#[inline(always)]
fn is_f32<T: 'static>() -> bool {
    std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>()
}

/// `src` as f32: the slice itself for f32 data, else converted into `buf` (which must then be
/// as long as `src`).
#[inline(always)]
fn as_f32<'a, T: Elem>(src: &'a [T], buf: &'a mut [f32]) -> &'a [f32] {
    if is_f32::<T>() {
        // SAFETY: T is f32 (checked just above): same size, alignment and bit validity.
        return unsafe { std::slice::from_raw_parts(src.as_ptr().cast(), src.len()) };
    }
    for (f, &x) in buf.iter_mut().zip(src) {
        *f = x.load();
    }
    buf
}

fn contiguous<'a, T>(data: &'a [T], layout: &Layout, what: &str) -> Result<&'a [T]> {
    match layout.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("paged attention: {what} must be contiguous"),
    }
}

/// Writes the step's new rows (`[N, kv_heads, head_dim]`) into the pool at `meta.slots`.
pub(crate) struct WriteKv<'a> {
    pub meta: &'a StepMeta,
}

fn write_rows<T: Copy>(pool: &mut [T], src: &[T], slots: &[u32]) -> Result<()> {
    let width = src.len() / slots.len().max(1);
    for (row, &slot) in src.chunks_exact(width).zip(slots) {
        let at = slot as usize * width;
        let Some(dst) = pool.get_mut(at..at + width) else {
            candle_core::bail!("KV slot {slot} is outside the pool")
        };
        dst.copy_from_slice(row);
    }
    Ok(())
}

impl InplaceOp2 for WriteKv<'_> {
    fn name(&self) -> &'static str {
        "paged-kv-write"
    }

    fn cpu_fwd(
        &self,
        pool: &mut CpuStorage,
        pl: &Layout,
        src: &CpuStorage,
        sl: &Layout,
    ) -> Result<()> {
        let Some((p0, p1)) = pl.contiguous_offsets() else {
            candle_core::bail!("paged-kv-write: the pool must be contiguous")
        };
        let slots = &self.meta.slots;
        if sl.shape().elem_count() != slots.len() * (pl.shape().elem_count() / pl.dims()[0]) {
            candle_core::bail!("paged-kv-write: {:?} rows for {} slots", sl.shape(), slots.len());
        }
        match (pool, src) {
            (CpuStorage::F32(p), CpuStorage::F32(s)) => {
                write_rows(&mut p[p0..p1], contiguous(s, sl, "the new rows")?, slots)
            }
            (CpuStorage::BF16(p), CpuStorage::BF16(s)) => {
                write_rows(&mut p[p0..p1], contiguous(s, sl, "the new rows")?, slots)
            }
            (CpuStorage::F16(p), CpuStorage::F16(s)) => {
                write_rows(&mut p[p0..p1], contiguous(s, sl, "the new rows")?, slots)
            }
            (p, s) => candle_core::bail!(
                "paged-kv-write: pool {:?} and rows {:?} differ",
                p.dtype(),
                s.dtype()
            ),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        pool: &mut candle_core::CudaStorage,
        pl: &Layout,
        src: &candle_core::CudaStorage,
        sl: &Layout,
    ) -> Result<()> {
        crate::cuda::kv_write::write_rows(pool, pl, src, sl, &self.meta.on_device()?.slots)
    }
}

/// Causal attention of `q` `[N, heads, head_dim]` over the key and value pools
/// (`[slots, kv_heads, head_dim]`); returns `[N, heads, head_dim]` in the working dtype.
pub(crate) struct PagedAttention<'a> {
    pub meta: &'a StepMeta,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
    /// The vector instructions to run on ([`Isa::current`] but in tests).
    pub isa: Isa,
}

/// Query rows per work item: small enough to spread a long prefill chunk over the threads,
/// large enough that a decode token is one item.
const ROWS_PER_ITEM: usize = 16;

/// Query rows (x heads) up to which scores are plain dot products; above, keys are transposed
/// a block at a time and scores accumulated as vectorised runs.
const FEW_ROWS: usize = 16;

/// Keys per register-resident run of scores in the prefill path.
const KEYS: usize = 32;

/// One work item: rows `first_row..first_row + rows` of sequence `seq`, for the query heads
/// that share KV head `kv_head` (their keys and values are read once for all of them).
struct Item {
    seq: usize,
    kv_head: usize,
    first_row: usize,
    rows: usize,
}

/// The output buffer, written by the work items at disjoint spans.
struct Out<T>(*mut T);

// SAFETY: items write disjoint spans (distinct (row, KV head) pairs) and the buffer outlives
// the parallel loop.
unsafe impl<T: Send> Send for Out<T> {}
unsafe impl<T: Send> Sync for Out<T> {}

impl PagedAttention<'_> {
    fn items(&self) -> Vec<Item> {
        let mut items = Vec::new();
        for (seq, s) in self.meta.seqs.iter().enumerate() {
            for kv_head in 0..self.kv_heads {
                let mut first_row = 0;
                while first_row < s.q_len {
                    let rows = ROWS_PER_ITEM.min(s.q_len - first_row);
                    items.push(Item { seq, kv_head, first_row, rows });
                    first_row += rows;
                }
            }
        }
        items
    }

    /// Computes one item and writes its `[rows, group, head_dim]` outputs into `out`.
    ///
    /// Keys and values are read a block at a time, converted to f32 once per block; scores are
    /// accumulated as `q[r][c] * k^T[c][..]` runs (vectorised over the block's keys, no
    /// horizontal sums), for all the item's query rows and heads against each block.
    #[inline(always)]
    fn item<T: Elem, const L: usize>(&self, it: &Item, q: &[T], k: &[T], v: &[T], out: &Out<T>) {
        let (d, kvh, bs, h) = (self.head_dim, self.kv_heads, self.meta.block_size, self.heads);
        let group = h / kvh;
        let s = &self.meta.seqs[it.seq];
        let rows = it.rows * group; // row r: query row first_row + r / group, head r % group
                                    // Row r attends to positions 0..len(r).
        let base_len = s.ctx_len - s.q_len + it.first_row + 1;
        let len = |r: usize| base_len + r / group;
        let width = len(rows - 1);
        let mut qf = vec![0f32; rows * d];
        for i in 0..it.rows {
            let at = ((s.q_start + it.first_row + i) * h + it.kv_head * group) * d;
            for (f, &x) in qf[i * group * d..][..group * d].iter_mut().zip(&q[at..at + group * d]) {
                *f = x.load();
            }
        }
        let mut scores = vec![0f32; rows * width];
        let mut block_f32 = vec![0f32; bs * d];
        let mut kt = vec![0f32; d * bs];
        for (b, &block) in s.blocks.iter().enumerate() {
            let j0 = b * bs;
            if j0 >= width {
                break;
            }
            let nb = bs.min(width - j0);
            let key_at = |j: usize| ((block as usize * bs + j) * kvh + it.kv_head) * d;
            if rows <= FEW_ROWS {
                // Decode: a dot product per key and row (transposing would cost as much).
                for j in 0..nb {
                    let key = as_f32(&k[key_at(j)..][..d], &mut block_f32[..d]);
                    for r in 0..rows {
                        if j0 + j < len(r) {
                            scores[r * width + j0 + j] =
                                dot_impl::<L>(&qf[r * d..(r + 1) * d], key);
                        }
                    }
                }
                continue;
            }
            // Prefill: the block's keys of this KV head, transposed (kt[c][j]), then runs of
            // `q[r][c] * kt[c][..]` over the block's keys.
            for j in 0..nb {
                for (c, &x) in k[key_at(j)..][..d].iter().enumerate() {
                    kt[c * bs + j] = x.load();
                }
            }
            for r in 0..rows {
                let n = nb.min(len(r).saturating_sub(j0));
                let q_row = &qf[r * d..(r + 1) * d];
                let row = &mut scores[r * width + j0..][..n];
                let mut j = 0;
                // 32 keys at a time in a fixed-size accumulator (four vector registers).
                while j + KEYS <= n {
                    let mut sums = [0f32; KEYS];
                    for (c, &a) in q_row.iter().enumerate() {
                        let keys: &[f32; KEYS] =
                            kt[c * bs + j..c * bs + j + KEYS].try_into().expect("KEYS long");
                        for (sv, &kv) in sums.iter_mut().zip(keys) {
                            *sv += a * kv;
                        }
                    }
                    row[j..j + KEYS].copy_from_slice(&sums);
                    j += KEYS;
                }
                for (c, &a) in q_row.iter().enumerate() {
                    for (sv, &kv) in row[j..].iter_mut().zip(&kt[c * bs + j..c * bs + n]) {
                        *sv += a * kv;
                    }
                }
            }
        }
        for r in 0..rows {
            let row = &mut scores[r * width..r * width + len(r)];
            for sv in row.iter_mut() {
                *sv = T::round(T::round(*sv) * self.scale);
            }
            softmax_row_impl::<L>(row);
            for sv in row.iter_mut() {
                *sv = T::round(*sv);
            }
        }
        let mut acc = vec![0f32; rows * d];
        for (b, &block) in s.blocks.iter().enumerate() {
            let j0 = b * bs;
            if j0 >= width {
                break;
            }
            let nb = bs.min(width - j0);
            let value_at = |j: usize| ((block as usize * bs + j) * kvh + it.kv_head) * d;
            if !is_f32::<T>() {
                for j in 0..nb {
                    as_f32(&v[value_at(j)..][..d], &mut block_f32[j * d..(j + 1) * d]);
                }
            }
            for r in 0..rows {
                let n = nb.min(len(r).saturating_sub(j0));
                let a = &mut acc[r * d..(r + 1) * d];
                for (j, &p) in scores[r * width + j0..][..n].iter().enumerate() {
                    let value = if is_f32::<T>() {
                        as_f32(&v[value_at(j)..][..d], &mut [])
                    } else {
                        &block_f32[j * d..(j + 1) * d]
                    };
                    for (x, &y) in a.iter_mut().zip(value) {
                        *x += p * y;
                    }
                }
            }
        }
        for i in 0..it.rows {
            let at = ((s.q_start + it.first_row + i) * h + it.kv_head * group) * d;
            // SAFETY: this item alone writes these heads of this query row.
            let dst = unsafe { std::slice::from_raw_parts_mut(out.0.add(at), group * d) };
            for (o, &a) in dst.iter_mut().zip(&acc[i * group * d..(i + 1) * group * d]) {
                *o = T::store(a);
            }
        }
    }

    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        let (d, h) = (self.head_dim, self.heads);
        let n = self.meta.num_tokens;
        if q.len() != n * h * d || self.kv_heads == 0 || h % self.kv_heads != 0 {
            candle_core::bail!("paged attention: {} query values for {n} tokens", q.len());
        }
        let slots = k.len() / (self.kv_heads * d);
        let reach = self
            .meta
            .seqs
            .iter()
            .flat_map(|s| s.blocks.iter())
            .map(|&b| (b as usize + 1) * self.meta.block_size)
            .max()
            .unwrap_or(0);
        if reach > slots || v.len() != k.len() {
            candle_core::bail!("paged attention: block tables reach past the pool of {slots}");
        }
        let mut out = vec![T::store(0.0); n * h * d];
        let dst = Out(out.as_mut_ptr());
        let items = self.items();
        if items.len() == 1 {
            self.dispatch(&items[0], q, k, v, &dst);
        } else {
            items.par_iter().for_each(|it| self.dispatch(it, q, k, v, &dst));
        }
        Ok(out)
    }

    fn dispatch<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T], out: &Out<T>) {
        match self.isa.usable() {
            // SAFETY: `usable` never returns a set the processor lacks.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => unsafe { self.item_avx512(it, q, k, v, out) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => unsafe { self.item_avx2(it, q, k, v, out) },
            _ => self.item::<T, 8>(it, q, k, v, out),
        }
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn item_avx2<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T], out: &Out<T>) {
        self.item::<T, 8>(it, q, k, v, out)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
    unsafe fn item_avx512<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T], out: &Out<T>) {
        self.item::<T, 16>(it, q, k, v, out)
    }
}

impl CustomOp3 for PagedAttention<'_> {
    fn name(&self) -> &'static str {
        "paged-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        ql: &Layout,
        k: &CpuStorage,
        kl: &Layout,
        v: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let shape = Shape::from((self.meta.num_tokens, self.heads, self.head_dim));
        let out = match (q, k, v) {
            (CpuStorage::F32(q), CpuStorage::F32(k), CpuStorage::F32(v)) => {
                CpuStorage::F32(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "the key pool")?,
                    contiguous(v, vl, "the value pool")?,
                )?)
            }
            (CpuStorage::BF16(q), CpuStorage::BF16(k), CpuStorage::BF16(v)) => {
                CpuStorage::BF16(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "the key pool")?,
                    contiguous(v, vl, "the value pool")?,
                )?)
            }
            (CpuStorage::F16(q), CpuStorage::F16(k), CpuStorage::F16(v)) => {
                CpuStorage::F16(self.run(
                    contiguous(q, ql, "q")?,
                    contiguous(k, kl, "the key pool")?,
                    contiguous(v, vl, "the value pool")?,
                )?)
            }
            _ => candle_core::bail!(
                "paged attention: q, keys and values must share one of f32, bf16, f16 (got {:?})",
                q.dtype()
            ),
        };
        Ok((out, shape))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        q: &candle_core::CudaStorage,
        ql: &Layout,
        k: &candle_core::CudaStorage,
        kl: &Layout,
        v: &candle_core::CudaStorage,
        vl: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        crate::cuda::decoder::paged_attention(self, (q, ql), (k, kl), (v, vl))
    }
}

/// Whether the CPU kernels take this dtype.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
