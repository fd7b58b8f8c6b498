//! Tensor-parallel building blocks of the decoder (Megatron layout): column-parallel
//! linears split the output features, row-parallel ones the input features (their partial sums
//! are all-reduced by the caller), and the embedding and lm_head are split over the vocabulary.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;

/// This rank's place in the tensor-parallel group.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    /// Rank.
    pub rank: usize,
    /// Group size.
    pub world: usize,
}

impl Shard {
    /// The whole model on one rank.
    pub const SINGLE: Self = Self { rank: 0, world: 1 };

    /// `[start, start + len)` of an axis of `size` split evenly over the group.
    pub fn range(&self, size: usize) -> (usize, usize) {
        let len = size / self.world;
        (self.rank * len, len)
    }
}

/// Up to this many rows a linear multiplies `W x^T` rather than `x W^T` (measured crossover).
const SMALL_BATCH_ROWS: usize = 96;

/// Up to this many rows a bf16 linear on the CPU runs as a GEMV over the bf16 weights.
pub const GEMV_ROWS_BF16: usize = 16;

/// Runs `f` on the elements of a contiguous CPU tensor of element type `T`, without a copy.
pub(crate) fn with_cpu_slice<T: candle_core::WithDType, R>(
    t: &Tensor,
    f: impl FnOnce(&[T]) -> R,
) -> Result<R> {
    let (guard, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*guard else {
        candle_core::bail!("a CPU tensor was expected. This is a bug.")
    };
    let Some((start, end)) = layout.contiguous_offsets() else {
        candle_core::bail!("a contiguous tensor was expected. This is a bug.")
    };
    Ok(f(&cpu.as_slice::<T>()?[start..end]))
}

/// `y = x W^T` with `W` `[out, in]` (no bias anywhere in DeepSeek LLM).
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Tensor,
}

impl Linear {
    /// Rows `[start, start + len)` of the full `[out, in]` weight: a column-parallel shard.
    pub fn column(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        rows: (usize, usize),
    ) -> Result<Self> {
        let w = vb.get((out, inp), name)?;
        let weight =
            if rows == (0, out) { w } else { w.narrow(0, rows.0, rows.1)?.contiguous()? };
        Ok(Self { weight })
    }

    /// Columns `[start, start + len)` of the full `[out, in]` weight: a row-parallel shard.
    pub fn row(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        cols: (usize, usize),
    ) -> Result<Self> {
        let w = vb.get((out, inp), name)?;
        let weight =
            if cols == (0, inp) { w } else { w.narrow(1, cols.0, cols.1)?.contiguous()? };
        Ok(Self { weight })
    }

    /// `x`: `[N, in]`. On the CPU, decode-sized inputs run as a GEMV that streams the weights
    /// once (f32 at batch 1; bf16 up to [`GEMV_ROWS_BF16`] rows, where candle would widen the
    /// whole weight to f32 on every call). Other few-row inputs are computed as `(W xᵀ)ᵀ`: the
    /// GEMM then packs the small `x` instead of re-packing all of `W` on every call, which at
    /// 4-64 rows is 2-4x faster on the CPU (measured; see benches/README.md). Long inputs
    /// (prefill) use `x Wᵀ`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, k) = x.dims2()?;
        let n = self.weight.dim(0)?;
        if x.device().is_cpu() && x.dtype() == self.weight.dtype() {
            match x.dtype() {
                DType::F32 if rows == 1 => {
                    let xs = x.flatten_all()?.to_vec1::<f32>()?;
                    let y = with_cpu_slice(&self.weight, |w: &[f32]| {
                        crate::kernels::gemv(&xs, w, rows, n, k)
                    })?;
                    return Tensor::from_vec(y, (rows, n), x.device());
                }
                DType::BF16 if rows <= GEMV_ROWS_BF16 => {
                    let xs = x.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
                    let y = with_cpu_slice(&self.weight, |w: &[half::bf16]| {
                        crate::kernels::gemv_bf16(&xs, w, rows, n, k)
                    })?;
                    return Tensor::from_vec(y, (rows, n), x.device())?.to_dtype(DType::BF16);
                }
                _ => {}
            }
        }
        if rows <= SMALL_BATCH_ROWS {
            return self.weight.matmul(&x.t()?)?.t()?.contiguous();
        }
        x.matmul(&self.weight.t()?)
    }

    /// The weight `[out_local, in_local]`.
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }
}

/// Vocabulary-parallel embedding: this rank owns rows `[start, start + len)`; ids outside give
/// zero rows, and the all-reduce over ranks assembles the full lookup.
#[derive(Debug, Clone)]
pub struct VocabEmbedding {
    table: Tensor,
    start: usize,
    len: usize,
}

impl VocabEmbedding {
    /// Loads this rank's rows of `[vocab, hidden]`.
    pub fn new(
        vb: &VarBuilder,
        name: &str,
        (vocab, hidden): (usize, usize),
        shard: Shard,
    ) -> Result<Self> {
        let (start, len) = shard.range(vocab);
        let full = vb.get((vocab, hidden), name)?;
        let table = if len == vocab { full } else { full.narrow(0, start, len)?.contiguous()? };
        Ok(Self { table, start, len })
    }

    /// Local lookup of `ids` (`[N]`, all `< vocab`): `[N, hidden]`, zero rows for ids owned by
    /// other ranks.
    pub fn forward(&self, ids: &[u32]) -> Result<Tensor> {
        let dev = self.table.device();
        let local: Vec<u32> = ids
            .iter()
            .map(|&i| {
                (i as usize).checked_sub(self.start).filter(|&l| l < self.len).unwrap_or(0) as u32
            })
            .collect();
        let rows = self.table.index_select(&Tensor::new(local, dev)?, 0)?;
        if self.len == self.table.dim(0)?
            && self.start == 0
            && ids.iter().all(|&i| (i as usize) < self.len)
        {
            return Ok(rows);
        }
        let mask: Vec<f32> = ids
            .iter()
            .map(|&i| {
                f32::from(u8::from((self.start..self.start + self.len).contains(&(i as usize))))
            })
            .collect();
        let mask = Tensor::from_vec(mask, (ids.len(), 1), dev)?.to_dtype(rows.dtype())?;
        rows.broadcast_mul(&mask)
    }

    /// The local table, for a tied lm_head.
    pub fn table(&self) -> &Tensor {
        &self.table
    }
}

/// HF `LlamaRMSNorm`: `w * (x32 * rsqrt(mean(x32^2) + eps)).to(dtype)`; the cast back to the
/// working dtype happens before the weight multiply.
#[derive(Debug, Clone)]
pub struct RmsNorm {
    weight: Tensor,
    eps: f64,
}

impl RmsNorm {
    /// Loads `weight` `[hidden]`.
    pub fn new(vb: &VarBuilder, name: &str, hidden: usize, eps: f64) -> Result<Self> {
        Ok(Self { weight: vb.get(hidden, name)?, eps })
    }

    /// Normalises the last axis.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.dtype() == DType::F32 && x.device().is_cpu() {
            let x = x.contiguous()?;
            let mut out = vec![0f32; x.elem_count()];
            with_cpu_slice(&x, |src: &[f32]| {
                with_cpu_slice(&self.weight, |w: &[f32]| {
                    crate::kernels::rms_norm(&mut out, src, w, self.eps as f32)
                })
            })??;
            return Tensor::from_vec(out, x.shape(), x.device());
        }
        if x.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        let x32 = x.to_dtype(DType::F32)?;
        let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + self.eps)?.sqrt()?.recip()?;
        x32.broadcast_mul(&inv)?.to_dtype(x.dtype())?.broadcast_mul(&self.weight)
    }
}

/// Rotate-half RoPE (HF/NeoX layout) with tables for every position.
#[derive(Debug, Clone)]
pub struct Rope {
    /// `[max_pos, head_dim]`: `cos(concat(freqs, freqs))`, in the working dtype.
    cos: Tensor,
    sin: Tensor,
}

impl Rope {
    /// `inv_freq[i] = 1 / theta^(2i/d)` and `freqs = pos * inv_freq`, in f32 like the reference,
    /// then cast to `dtype` (the reference's cos/sin are in the activation dtype).
    pub fn new(
        head_dim: usize,
        max_pos: usize,
        theta: f64,
        dtype: DType,
        dev: &Device,
    ) -> Result<Self> {
        let half = head_dim / 2;
        let inv: Vec<f32> = (0..half)
            .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
            .collect();
        let mut cos = Vec::with_capacity(max_pos * head_dim);
        let mut sin = Vec::with_capacity(max_pos * head_dim);
        for p in 0..max_pos {
            // emb = concat(freqs, freqs): the same angles for both halves.
            for _ in 0..2 {
                for f in &inv {
                    let angle = p as f32 * f;
                    cos.push(angle.cos());
                    sin.push(angle.sin());
                }
            }
        }
        let cos = Tensor::from_vec(cos, (max_pos, head_dim), dev)?.to_dtype(dtype)?;
        let sin = Tensor::from_vec(sin, (max_pos, head_dim), dev)?.to_dtype(dtype)?;
        Ok(Self { cos, sin })
    }

    /// Applies the rotation to `x` `[N, heads, head_dim]` where row `n` is at `positions[n]`.
    pub fn apply(&self, x: &Tensor, positions: &Tensor) -> Result<Tensor> {
        let (_, heads, d) = x.dims3()?;
        if x.dtype() == DType::F32 && x.device().is_cpu() && self.cos.dtype() == DType::F32 {
            let x = x.contiguous()?;
            let pos = positions.to_vec1::<u32>()?;
            let mut out = vec![0f32; x.elem_count()];
            with_cpu_slice(&x, |src: &[f32]| {
                with_cpu_slice(&self.cos, |cos: &[f32]| {
                    with_cpu_slice(&self.sin, |sin: &[f32]| {
                        crate::kernels::rope(&mut out, src, cos, sin, &pos, heads)
                    })
                })
            })???;
            return Tensor::from_vec(out, x.shape(), x.device());
        }
        let cos = self.cos.index_select(positions, 0)?.unsqueeze(1)?;
        let sin = self.sin.index_select(positions, 0)?.unsqueeze(1)?;
        let x1 = x.narrow(D::Minus1, 0, d / 2)?;
        let x2 = x.narrow(D::Minus1, d / 2, d / 2)?;
        let rotated = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
        x.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_ranges_cover_the_axis() {
        let covered: Vec<(usize, usize)> =
            (0..4).map(|r| Shard { rank: r, world: 4 }.range(102400)).collect();
        assert_eq!(covered, vec![(0, 25600), (25600, 25600), (51200, 25600), (76800, 25600)]);
    }

    #[test]
    fn rope_at_position_zero_is_identity_and_preserves_norm() -> Result<()> {
        let dev = Device::Cpu;
        let rope = Rope::new(8, 16, 10000.0, DType::F32, &dev)?;
        let x = Tensor::arange(0f32, 16., &dev)?.reshape((2, 1, 8))?;
        let pos = Tensor::new(&[0u32, 5], &dev)?;
        let y = rope.apply(&x, &pos)?;
        assert_eq!(y.get(0)?.to_vec2::<f32>()?, x.get(0)?.to_vec2::<f32>()?);
        let n = |t: &Tensor| -> Result<f32> { t.sqr()?.sum_all()?.to_scalar::<f32>() };
        assert!((n(&y.get(1)?)? - n(&x.get(1)?)?).abs() < 1e-3);
        Ok(())
    }
}
