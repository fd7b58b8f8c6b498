//! Tensor-parallel building blocks of the decoder (Megatron layout): column-parallel
//! linears split the output features, row-parallel ones the input features (their partial sums
//! are all-reduced by the caller), and the embedding and lm_head are split over the vocabulary.

use candle_core::{DType, Device, Result, Tensor, D};
use candle_nn::VarBuilder;
use half::bf16;

pub(crate) use crate::linear::with_cpu_slice;
pub use crate::linear::Linear;

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

/// The decoder's linears (no bias anywhere in DeepSeek LLM), loaded as this rank's shard.
impl Linear {
    /// Rows `[start, start + len)` of the full `[out, in]` weight: a column-parallel shard.
    pub fn column(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        rows: (usize, usize),
    ) -> Result<Self> {
        Self::new(column_rows(vb, name, (out, inp), rows)?.contiguous()?, None)
    }

    /// Columns `[start, start + len)` of the full `[out, in]` weight: a row-parallel shard.
    pub fn row(
        vb: &VarBuilder,
        name: &str,
        (out, inp): (usize, usize),
        cols: (usize, usize),
    ) -> Result<Self> {
        let w = vb.get((out, inp), name)?;
        let w = if cols == (0, inp) { w } else { w.narrow(1, cols.0, cols.1)?.contiguous()? };
        Self::new(w, None)
    }
}

/// Rows `[start, start + len)` of the full `[out, in]` weight `name` (a view; the whole
/// weight when the rows cover it): this rank's column-parallel shard.
fn column_rows(
    vb: &VarBuilder,
    name: &str,
    shape: (usize, usize),
    rows: (usize, usize),
) -> Result<Tensor> {
    vb.get(shape, name)?.narrow(0, rows.0, rows.1)
}

/// Column-parallel linears that read the same input (`q`, `k`, `v`; `gate`, `up`) as one
/// product over their shards' rows stacked, split after (vLLM's `QKVParallelLinear` and
/// `MergedColumnParallelLinear`). Each output column is the same dot product as alone, so the
/// results are bit-identical to separate linears. On the CPU a batch-1 decode step then runs 4
/// products a layer instead of 7, each long enough to keep both threads streaming weights to
/// its end, and a prefill reads its rows once for the three (or two).
#[derive(Debug, Clone)]
pub struct FusedColumns<const P: usize> {
    linear: Linear,
    /// Output features of each part, in order.
    widths: [usize; P],
}

/// One part of a [`FusedColumns`]: tensor name, full `[out, in]` shape, this rank's rows.
pub type ColumnPart<'a> = (&'a str, (usize, usize), (usize, usize));

impl<const P: usize> FusedColumns<P> {
    /// Loads each part's shard (as [`Linear::column`] would) and stacks them.
    pub fn new(vb: &VarBuilder, parts: [ColumnPart; P]) -> Result<Self> {
        let shards = parts
            .iter()
            .map(|&(name, shape, rows)| column_rows(vb, name, shape, rows))
            .collect::<Result<Vec<_>>>()?;
        let weight = Tensor::cat(&shards, 0)?;
        Ok(Self { linear: Linear::new(weight, None)?, widths: parts.map(|(_, _, rows)| rows.1) })
    }

    /// Each part's output, `[.., width]` in the parts' order.
    pub fn forward(&self, x: &Tensor) -> Result<[Tensor; P]> {
        self.split(&self.joint(x)?)
    }

    /// The parts' outputs side by side, `[.., sum of widths]` (what fused kernels read).
    pub fn joint(&self, x: &Tensor) -> Result<Tensor> {
        candle_core::Module::forward(&self.linear, x)
    }

    /// [`Self::joint`]'s output split into the parts (views).
    pub fn split(&self, y: &Tensor) -> Result<[Tensor; P]> {
        let mut start = 0;
        let mut out = Vec::with_capacity(P);
        for w in self.widths {
            out.push(y.narrow(D::Minus1, start, w)?);
            start += w;
        }
        Ok(out.try_into().expect("one output per part"))
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

/// Whether every tensor is bf16 on the CPU: the case the fused bf16 kernels take over from
/// candle's op-by-op bf16 (`kernels::decoder_bf16`).
pub(crate) fn bf16_on_cpu(ts: &[&Tensor]) -> bool {
    ts.iter().all(|t| t.dtype() == DType::BF16 && t.device().is_cpu())
}

/// The residual add `a + b`, fused for bf16 on the CPU.
pub(crate) fn residual_add(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    if !bf16_on_cpu(&[a, b]) || a.shape() != b.shape() {
        return a + b;
    }
    let (a, b) = (a.contiguous()?, b.contiguous()?);
    let mut out = vec![bf16::ZERO; a.elem_count()];
    with_cpu_slice(&a, |x: &[bf16]| {
        with_cpu_slice(&b, |y: &[bf16]| crate::kernels::add_bf16(&mut out, x, y))
    })??;
    Tensor::from_vec(out, a.shape(), a.device())
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
        if bf16_on_cpu(&[x, &self.weight]) {
            let x = x.contiguous()?;
            let mut out = vec![bf16::ZERO; x.elem_count()];
            with_cpu_slice(&x, |src: &[bf16]| {
                with_cpu_slice(&self.weight, |w: &[bf16]| {
                    crate::kernels::rms_norm_bf16(&mut out, src, w, self.eps as f32)
                })
            })??;
            return Tensor::from_vec(out, x.shape(), x.device());
        }
        if x.dtype() == DType::F32 {
            return candle_nn::ops::rms_norm(&x.contiguous()?, &self.weight, self.eps as f32);
        }
        #[cfg(feature = "cuda")]
        if x.device().is_cuda() && x.dtype() == DType::BF16 && self.weight.dtype() == DType::BF16 {
            return crate::cuda::rms_norm::rms_norm_bf16(x, &self.weight, self.eps);
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

    /// The `[max_pos, head_dim]` cos and sin tables (what fused kernels read).
    #[cfg_attr(not(feature = "cuda"), allow(dead_code))]
    pub(crate) fn tables(&self) -> (&Tensor, &Tensor) {
        (&self.cos, &self.sin)
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
        if bf16_on_cpu(&[x, &self.cos]) {
            let x = x.contiguous()?;
            let pos = positions.to_vec1::<u32>()?;
            let mut out = vec![bf16::ZERO; x.elem_count()];
            with_cpu_slice(&x, |src: &[bf16]| {
                with_cpu_slice(&self.cos, |cos: &[bf16]| {
                    with_cpu_slice(&self.sin, |sin: &[bf16]| {
                        crate::kernels::rope_bf16(&mut out, src, cos, sin, &pos, heads)
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

    /// Stacked column shards give, bit for bit, what each shard gives alone: at one row (the
    /// few-row kernels), at many (the tiles), in f32 and bf16, and for each rank of two.
    #[test]
    fn fused_columns_equal_the_separate_linears() -> Result<()> {
        let dev = Device::Cpu;
        let (a, b, inp) = (96, 64, 80);
        let tensors = std::collections::HashMap::from([
            ("a".to_string(), Tensor::randn(0f32, 1.0, (a, inp), &dev)?),
            ("b".to_string(), Tensor::randn(0f32, 1.0, (b, inp), &dev)?),
        ]);
        for dtype in [DType::F32, DType::BF16] {
            let vb = VarBuilder::from_tensors(tensors.clone(), dtype, &dev);
            for shard in [Shard::SINGLE, Shard { rank: 0, world: 2 }, Shard { rank: 1, world: 2 }] {
                let (ra, rb) = (shard.range(a), shard.range(b));
                let fused = FusedColumns::new(&vb, [("a", (a, inp), ra), ("b", (b, inp), rb)])?;
                let alone = [
                    Linear::column(&vb, "a", (a, inp), ra)?,
                    Linear::column(&vb, "b", (b, inp), rb)?,
                ];
                for rows in [1, 3, 40] {
                    let x = Tensor::randn(0f32, 1.0, (rows, inp), &dev)?.to_dtype(dtype)?;
                    let got = fused.forward(&x)?;
                    for (got, alone) in got.iter().zip(&alone) {
                        let want = candle_core::Module::forward(alone, &x)?;
                        assert_eq!(got.dims(), want.dims());
                        let bits =
                            |t: &Tensor| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>();
                        assert_eq!(bits(got)?, bits(&want)?, "{dtype:?} {shard:?} {rows} rows");
                    }
                }
            }
        }
        Ok(())
    }

    /// The fused bf16 paths give what candle's op-by-op bf16 chain gives where both round at
    /// the same points (RMSNorm, RoPE, the residual add): the layers take the fused kernels
    /// and nothing is lost in the wiring.
    #[test]
    fn fused_bf16_layers_match_the_op_by_op_chain() -> Result<()> {
        let dev = Device::Cpu;
        let (n, heads, d) = (5, 3, 16);
        let x = Tensor::randn(0f32, 2.0, (n, heads * d), &dev)?.to_dtype(DType::BF16)?;
        let w = Tensor::randn(1f32, 0.5, heads * d, &dev)?.to_dtype(DType::BF16)?;
        let norm = RmsNorm { weight: w.clone(), eps: 1e-6 };
        let x32 = x.to_dtype(DType::F32)?;
        let inv = (x32.sqr()?.mean_keepdim(D::Minus1)? + 1e-6)?.sqrt()?.recip()?;
        let chain = x32.broadcast_mul(&inv)?.to_dtype(DType::BF16)?.broadcast_mul(&w)?;
        let (got, want) = (norm.forward(&x)?.to_dtype(DType::F32)?, chain.to_dtype(DType::F32)?);
        // One bf16 step at most (the mean's summation order).
        let step = (want.abs()? * 2f64.powi(-7))?;
        assert_eq!((got - &want)?.abs()?.gt(&step)?.sum_all()?.to_scalar::<u8>()?, 0);

        let rope = Rope::new(d, 32, 10000.0, DType::BF16, &dev)?;
        let q = x.reshape((n, heads, d))?;
        let pos = Tensor::new(&[0u32, 3, 31, 7, 7], &dev)?;
        let cos = rope.cos.index_select(&pos, 0)?.unsqueeze(1)?;
        let sin = rope.sin.index_select(&pos, 0)?.unsqueeze(1)?;
        let rotated =
            Tensor::cat(&[&q.narrow(2, d / 2, d / 2)?.neg()?, &q.narrow(2, 0, d / 2)?], 2)?;
        let chain = (q.broadcast_mul(&cos)? + rotated.broadcast_mul(&sin)?)?;
        let got = rope.apply(&q, &pos)?;
        assert_eq!(
            got.to_dtype(DType::F32)?.to_vec3::<f32>()?,
            chain.to_dtype(DType::F32)?.to_vec3::<f32>()?
        );

        let y = Tensor::randn(0f32, 2.0, (n, heads * d), &dev)?.to_dtype(DType::BF16)?;
        let got = residual_add(&x, &y)?.to_dtype(DType::F32)?.to_vec2::<f32>()?;
        assert_eq!(got, (&x + &y)?.to_dtype(DType::F32)?.to_vec2::<f32>()?);
        Ok(())
    }
}
