//! `y = x Wᵀ (+ b)`, the one linear layer of every model here: on the CPU its f32 or bf16
//! weight is packed once at load ([`PackedWeight`]) and multiplied by dsvl's micro-kernels at
//! any batch size; on other devices (CUDA) it is candle's matmul. A drop-in for
//! `candle_nn::Linear` (same `weight` / `bias` tensor names, same [`Module`] shape rules: any
//! leading dimensions, features last).

use std::sync::Arc;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::isa::Isa;
use crate::kernels::{Bf16Path, PackedWeight};

/// Up to this many rows a linear off the CPU multiplies `W xᵀ` rather than `x Wᵀ`: the GEMM
/// then packs the small `x` instead of all of `W` on every call (the measured crossover on the
/// CPU before packed weights replaced both there).
const SMALL_BATCH_ROWS: usize = 96;

/// A linear layer.
#[derive(Debug, Clone)]
pub struct Linear {
    weight: Weight,
    /// `[out]`, in f32 on the CPU (added to the f32 product before rounding to the dtype).
    bias: Option<Tensor>,
}

/// The weight as its device multiplies it best.
#[derive(Debug, Clone)]
enum Weight {
    /// On the CPU (f32 or bf16): packed for the micro-kernels; the tensor is not kept.
    Packed(Arc<PackedWeight>),
    /// Elsewhere: the `[out, in]` tensor.
    Tensor(Tensor),
}

/// `candle_nn::linear` with dsvl's [`Linear`]: `weight` `[out, in]` and `bias` `[out]` at `vb`.
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out, inp), "weight")?;
    let bias = vb.get(out, "bias")?;
    Linear::new(weight, Some(bias))
}

impl Linear {
    /// A linear from its `[out, in]` weight and optional `[out]` bias.
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let (n, k) = weight.dims2()?;
        let weight = match (weight.device().is_cpu(), weight.dtype()) {
            (true, DType::F32) => {
                Weight::Packed(Arc::new(with_cpu_slice(&weight, |w: &[f32]| {
                    PackedWeight::pack_f32(w, n, k, Isa::current())
                })?))
            }
            (true, DType::BF16) => {
                Weight::Packed(Arc::new(with_cpu_slice(&weight, |w: &[half::bf16]| {
                    PackedWeight::pack_bf16(w, n, k, Bf16Path::for_isa(Isa::current()))
                })?))
            }
            _ => Weight::Tensor(weight),
        };
        let bias = match (&weight, bias) {
            (Weight::Packed(_), Some(b)) => Some(b.to_dtype(DType::F32)?),
            (_, b) => b,
        };
        Ok(Self { weight, bias })
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let Some((&k, lead)) = dims.split_last() else {
            candle_core::bail!("a linear needs at least one dimension")
        };
        let rows = lead.iter().product::<usize>();
        let x2 = x.reshape((rows, k))?;
        let y = match &self.weight {
            Weight::Packed(w) => {
                let x2 = x2.contiguous()?;
                let n = w.dims().0;
                let mut y = match x2.dtype() {
                    DType::F32 => with_cpu_slice(&x2, |xs: &[f32]| w.matmul(xs, rows))?,
                    DType::BF16 => with_cpu_slice(&x2, |xs: &[half::bf16]| w.matmul(xs, rows))?,
                    dt => candle_core::bail!("a linear on the CPU takes f32 or bf16, not {dt:?}"),
                };
                if let Some(b) = &self.bias {
                    with_cpu_slice(b, |b: &[f32]| {
                        for row in y.chunks_exact_mut(n) {
                            row.iter_mut().zip(b).for_each(|(v, b)| *v += b);
                        }
                    })?;
                }
                return Tensor::from_vec(y, [lead, &[n]].concat(), x.device())?.to_dtype(x.dtype());
            }
            Weight::Tensor(w) if rows <= SMALL_BATCH_ROWS => w.matmul(&x2.t()?)?.t()?,
            Weight::Tensor(w) => x2.matmul(&w.t()?)?,
        };
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        y.reshape([lead, &[y.dim(1)?]].concat())
    }
}

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

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn reference(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
        candle_nn::Linear::new(w.clone(), b.cloned()).forward(x)
    }

    #[test]
    fn matches_candle_nn_linear_for_any_leading_shape_and_dtype() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (37, 70), &dev)?;
        let b = Tensor::randn(0f32, 1.0, 37, &dev)?;
        for shape in [vec![3, 70], vec![2, 5, 70], vec![2, 3, 4, 70]] {
            let x = Tensor::randn(0f32, 1.0, shape.as_slice(), &dev)?;
            // bf16: candle rounds the product to bf16 before adding the bias, dsvl (like
            // PyTorch's addmm) rounds once: up to one bf16 ulp (2^-8 relative) apart.
            for (dtype, rel) in [(DType::F32, 1e-6), (DType::BF16, 1.0 / 128.0)] {
                let (x, w, b) = (x.to_dtype(dtype)?, w.to_dtype(dtype)?, b.to_dtype(dtype)?);
                for bias in [None, Some(&b)] {
                    let got = Linear::new(w.clone(), bias.cloned())?.forward(&x)?;
                    let want = reference(&x, &w, bias)?;
                    assert_eq!(got.dims(), want.dims(), "{shape:?} {dtype:?}");
                    assert_eq!(got.dtype(), dtype);
                    let want = want.to_dtype(DType::F32)?;
                    let max = |t: &Tensor| t.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>();
                    let diff = max(&(got.to_dtype(DType::F32)? - &want)?)?;
                    let tol = rel * max(&want)?;
                    assert!(diff <= tol, "{shape:?} {dtype:?} bias {}: {diff}", bias.is_some());
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_strided_input_is_read_as_its_values() -> Result<()> {
        let dev = Device::Cpu;
        let w = Tensor::randn(0f32, 1.0, (5, 8), &dev)?;
        let x = Tensor::randn(0f32, 1.0, (8, 6), &dev)?.t()?;
        let got = Linear::new(w.clone(), None)?.forward(&x)?;
        let want = x.contiguous()?.matmul(&w.t()?)?;
        let diff = (got - want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
