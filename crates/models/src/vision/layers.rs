//! Building blocks shared by the towers: patch embedding, LayerNorm2d, per-branch Normalize and
//! separable linear resampling.

use candle_core::{DType, Device, Module, Result, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::config::Normalize;
use super::conv;

/// `Conv2d(3 -> width, kernel = stride = patch)` over non-overlapping patches, computed as one
/// matmul over the unfolded patches (the same sum as the conv, in one large GEMM).
#[derive(Debug, Clone)]
pub struct PatchEmbed {
    /// `[width, 3 * patch * patch]`, transposed once at load.
    weight_t: Tensor,
    bias: Tensor,
    patch: usize,
}

impl PatchEmbed {
    /// Loads `proj.weight` `[width, 3, p, p]` and `proj.bias` `[width]`.
    pub fn new(width: usize, patch: usize, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((width, 3, patch, patch), "proj.weight")?;
        let bias = vb.get(width, "proj.bias")?;
        let weight_t = weight.reshape((width, 3 * patch * patch))?.t()?.contiguous()?;
        Ok(Self { weight_t, bias, patch })
    }

    /// `[B, 3, H, W]` to `[B, H/p, W/p, width]` (NHWC, the layout both towers continue in).
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let p = self.patch;
        let (gh, gw) = (h / p, w / p);
        let patches = x
            .reshape((b, c, gh, p, gw, p))?
            .permute((0, 2, 4, 1, 3, 5))?
            .contiguous()?
            .reshape((b * gh * gw, c * p * p))?;
        let out = patches.matmul(&self.weight_t)?.broadcast_add(&self.bias)?;
        out.reshape((b, gh, gw, ()))
    }
}

/// `torchvision.transforms.Normalize` in the working dtype: the constants are rounded to that
/// dtype and the subtract and divide run in it, as the reference does under bf16.
pub fn normalize(x: &Tensor, n: &Normalize) -> Result<Tensor> {
    let dev = x.device();
    let mean =
        Tensor::new(&n.mean.map(|v| v as f32), dev)?.to_dtype(x.dtype())?.reshape((1, 3, 1, 1))?;
    let std =
        Tensor::new(&n.std.map(|v| v as f32), dev)?.to_dtype(x.dtype())?.reshape((1, 3, 1, 1))?;
    x.broadcast_sub(&mean)?.broadcast_div(&std)
}

/// SAM's LayerNorm2d: normalises over channels of an NCHW tensor with the explicit element-wise
/// formula (no fp32 upcast), `w[c] * (x - u) / sqrt(var + eps) + b[c]`.
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    /// Loads `weight` and `bias` of `channels`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get(channels, "weight")?.reshape((1, channels, 1, 1))?;
        let bias = vb.get(channels, "bias")?.reshape((1, channels, 1, 1))?;
        Ok(Self { weight, bias, eps })
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let u = mean_over_channels(x)?;
        let centred = x.broadcast_sub(&u)?;
        let var = mean_over_channels(&centred.sqr()?)?;
        let y = centred.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        y.broadcast_mul(&self.weight)?.broadcast_add(&self.bias)
    }
}

/// `x.mean(1, keepdim=True)` with PyTorch's numerics: accumulated in f32, rounded once to the
/// working dtype (candle's CPU reductions would accumulate in bf16).
fn mean_over_channels(x: &Tensor) -> Result<Tensor> {
    x.to_dtype(DType::F32)?.mean_keepdim(1)?.to_dtype(x.dtype())
}

/// A 1-D linear resampling as a dense `[out, in]` matrix; two of them make a separable 2-D
/// resize that runs as matmuls on any device.
#[derive(Debug, Clone)]
pub struct ResampleMatrix {
    /// `[in, out]`, ready to right-multiply rows.
    transposed: Tensor,
}

impl ResampleMatrix {
    /// PyTorch `interpolate(mode="bilinear", align_corners=False, antialias=False)` along one
    /// axis: `src = (dst + 0.5) * in/out - 0.5` clamped at 0, two taps.
    pub fn bilinear(in_size: usize, out_size: usize, dev: &Device) -> Result<Self> {
        let scale = in_size as f32 / out_size as f32;
        let mut m = vec![0f32; out_size * in_size];
        for o in 0..out_size {
            let src = ((o as f32 + 0.5) * scale - 0.5).max(0.0);
            let i0 = (src as usize).min(in_size - 1);
            let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
            let l1 = src - i0 as f32;
            m[o * in_size + i0] += 1.0 - l1;
            m[o * in_size + i1] += l1;
        }
        Self::from_rows(m, in_size, out_size, dev)
    }

    /// PyTorch `interpolate(mode="bilinear", antialias=True)` along one axis (the separable
    /// triangle filter of `_upsample_bilinear2d_aa`, support = scale when downscaling).
    pub fn bilinear_antialias(in_size: usize, out_size: usize, dev: &Device) -> Result<Self> {
        // f32 throughout, in PyTorch's order: its weights carry f32 rounding (~1e-5 on the
        // centre), and matching them is what makes the output agree to ~1e-7.
        let scale = in_size as f32 / out_size as f32;
        let (support, invscale) = if scale >= 1.0 { (scale, 1.0 / scale) } else { (1.0, 1.0) };
        let mut m = vec![0f32; out_size * in_size];
        for o in 0..out_size {
            let center = scale * (o as f32 + 0.5);
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let taps: Vec<f32> = (xmin..xmax)
                .map(|j| {
                    let x = ((j as f32 - center + 0.5) * invscale).abs();
                    if x < 1.0 {
                        1.0 - x
                    } else {
                        0.0
                    }
                })
                .collect();
            let total: f32 = taps.iter().sum();
            for (k, w) in taps.iter().enumerate() {
                m[o * in_size + xmin + k] = if total != 0.0 { w / total } else { *w };
            }
        }
        Self::from_rows(m, in_size, out_size, dev)
    }

    fn from_rows(m: Vec<f32>, in_size: usize, out_size: usize, dev: &Device) -> Result<Self> {
        let transposed = Tensor::from_vec(m, (out_size, in_size), dev)?.t()?.contiguous()?;
        Ok(Self { transposed })
    }

    /// Resamples the last axis of `x` (f32).
    fn apply_last(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let n = dims[dims.len() - 1];
        let rows = x.elem_count() / n;
        let out = x.contiguous()?.reshape((rows, n))?.matmul(&self.transposed)?;
        let mut new_dims = dims;
        *new_dims.last_mut().expect("tensor has at least one axis") = self.transposed.dim(1)?;
        out.reshape(new_dims)
    }
}

/// Resizes the two trailing axes of an NCHW tensor: width first, then height (PyTorch's order),
/// computed in f32 whatever the input dtype and cast back, as the reference does.
pub fn resize_2d(x: &Tensor, rows: &ResampleMatrix, cols: &ResampleMatrix) -> Result<Tensor> {
    let dtype = x.dtype();
    let x = x.to_dtype(DType::F32)?;
    let x = cols.apply_last(&x)?;
    let x =
        rows.apply_last(&x.transpose(D::Minus1, D::Minus2)?)?.transpose(D::Minus1, D::Minus2)?;
    x.contiguous()?.to_dtype(dtype)
}

/// A bias-free 2-D convolution. On the CPU it runs in f32 through the packed-GEMM conv
/// (`conv.rs`); a bf16 conv rounds the result once, which is also what a bf16 cuDNN conv does
/// (f32 accumulation). On other devices candle's conv runs in the working dtype.
#[derive(Debug, Clone)]
pub struct Conv2d {
    weight: Tensor,
    cfg: Conv2dConfig,
}

impl Conv2d {
    /// Loads `weight` `[out, in, k, k]`.
    pub fn no_bias(
        in_ch: usize,
        out_ch: usize,
        k: usize,
        cfg: Conv2dConfig,
        vb: VarBuilder,
    ) -> Result<Self> {
        Ok(Self { weight: vb.get((out_ch, in_ch, k, k), "weight")?, cfg })
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let c = &self.cfg;
        if x.device().is_cpu() && c.dilation == 1 && c.groups == 1 {
            // The packed-GEMM conv, in f32 (a bf16 conv rounds its f32 result once).
            let w = self.weight.to_dtype(DType::F32)?;
            let y = conv::conv2d(&x.to_dtype(DType::F32)?, &w, c)?;
            return y.to_dtype(x.dtype());
        }
        x.conv2d(&self.weight, c.padding, c.stride, c.dilation, c.groups)
    }
}
