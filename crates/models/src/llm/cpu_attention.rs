//! The CPU kernels of the paged KV cache: writing a step's new keys and values into the pool
//! (one in-place copy per layer), and causal attention of the whole step's queries over the
//! pool, read in place through the block tables.
//!
//! Attention threads over (sequence, query head, block of query rows); a work item computes its
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
use crate::kernels::{dot, softmax_row};

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
}

/// Causal attention of `q` `[N, heads, head_dim]` over the key and value pools
/// (`[slots, kv_heads, head_dim]`); returns `[N, heads, head_dim]` in the working dtype.
pub(crate) struct PagedAttention<'a> {
    pub meta: &'a StepMeta,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub scale: f32,
}

/// Query rows per work item: small enough to spread a long prefill chunk over the threads,
/// large enough that a decode token is one item.
const ROWS_PER_ITEM: usize = 16;

struct Item {
    seq: usize,
    head: usize,
    first_row: usize,
    rows: usize,
}

impl PagedAttention<'_> {
    fn items(&self) -> Vec<Item> {
        let mut items = Vec::new();
        for (seq, s) in self.meta.seqs.iter().enumerate() {
            for head in 0..self.heads {
                let mut first_row = 0;
                while first_row < s.q_len {
                    let rows = ROWS_PER_ITEM.min(s.q_len - first_row);
                    items.push(Item { seq, head, first_row, rows });
                    first_row += rows;
                }
            }
        }
        items
    }

    /// The output rows of one item, `[rows, head_dim]`.
    #[inline(always)]
    fn item<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        let (d, kvh, bs) = (self.head_dim, self.kv_heads, self.meta.block_size);
        let s = &self.meta.seqs[it.seq];
        let g = it.head / (self.heads / kvh);
        let mut out = Vec::with_capacity(it.rows * d);
        let (mut qf, mut kf, mut acc) = (vec![0f32; d], vec![0f32; d], vec![0f32; d]);
        let mut scores = Vec::with_capacity(s.ctx_len);
        for i in it.first_row..it.first_row + it.rows {
            let row = s.q_start + i;
            for (f, &x) in qf.iter_mut().zip(&q[(row * self.heads + it.head) * d..][..d]) {
                *f = x.load();
            }
            let last = s.ctx_len - s.q_len + i; // attends to positions 0..=last
            scores.clear();
            for (b, &block) in s.blocks.iter().enumerate() {
                let first = b * bs;
                if first > last {
                    break;
                }
                let base = block as usize * bs;
                for slot in base..base + bs.min(last + 1 - first) {
                    let key = &k[(slot * kvh + g) * d..][..d];
                    let raw = if std::any::TypeId::of::<T>() == std::any::TypeId::of::<f32>() {
                        // SAFETY: T is f32 (checked just above); same layout.
                        dot(&qf, unsafe { std::slice::from_raw_parts(key.as_ptr().cast(), d) })
                    } else {
                        for (f, &x) in kf.iter_mut().zip(key) {
                            *f = x.load();
                        }
                        dot(&qf, &kf)
                    };
                    scores.push(T::round(T::round(raw) * self.scale));
                }
            }
            softmax_row(&mut scores);
            acc.fill(0.0);
            for (j, &p) in scores.iter().enumerate() {
                let slot = s.blocks[j / bs] as usize * bs + j % bs;
                let p = T::round(p);
                for (a, &x) in acc.iter_mut().zip(&v[(slot * kvh + g) * d..][..d]) {
                    *a += p * x.load();
                }
            }
            out.extend(acc.iter().map(|&a| T::store(a)));
        }
        out
    }

    fn run<T: Elem>(&self, q: &[T], k: &[T], v: &[T]) -> Result<Vec<T>> {
        let (d, h) = (self.head_dim, self.heads);
        let n = self.meta.num_tokens;
        if q.len() != n * h * d {
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
        let items = self.items();
        let parts: Vec<Vec<T>> = items.par_iter().map(|it| self.dispatch(it, q, k, v)).collect();
        let mut out = vec![T::store(0.0); n * h * d];
        for (it, part) in items.iter().zip(parts) {
            let s = &self.meta.seqs[it.seq];
            for (r, row) in part.chunks_exact(d).enumerate() {
                let at = ((s.q_start + it.first_row + r) * h + it.head) * d;
                out[at..at + d].copy_from_slice(row);
            }
        }
        Ok(out)
    }

    fn dispatch<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        #[cfg(target_arch = "x86_64")]
        {
            if std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports the features the function was compiled for.
                return unsafe { self.item_avx2(it, q, k, v) };
            }
        }
        self.item(it, q, k, v)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn item_avx2<T: Elem>(&self, it: &Item, q: &[T], k: &[T], v: &[T]) -> Vec<T> {
        self.item(it, q, k, v)
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
}

/// Whether the CPU kernels take this dtype.
pub(crate) fn supports(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}
