//! 2-D convolution on the CPU as one product per image against the linears' micro-kernels:
//! `y[o, pixel] = Σ w[o, (c, ky, kx)] · x[c, iy, ix]`.
//!
//! The unfolded input (`[C * k * k, pixels]`, im2col) is written straight into the packed panel
//! layout ([`PackedWeight::pack_f32_with`]), a panel of output pixels at a time with their
//! input offsets worked out once, and the weight rows (`[O, C * k * k]`, PyTorch's own order)
//! are the product's rows, so the result comes out NCHW as the neck continues. candle's CPU
//! conv unfolds value by value with the index arithmetic per value (about 7 ns each) and then
//! multiplies through the `gemm` crate: the SAM necks and downsamples took 5.6 % of a VL-7B
//! encode that way on an AMD Zen 5.

use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};
use candle_nn::Conv2dConfig;

use crate::isa::Isa;
use crate::kernels::{PackPath, PackedWeight};

struct Conv {
    /// Padding and stride, the same on both axes.
    padding: usize,
    stride: usize,
    isa: Isa,
}

impl Conv {
    fn run(&self, x: &[f32], xl: &Layout, w: &[f32], wl: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, c, h, wd) = xl.shape().dims4()?;
        let (o, wc, k, k2) = wl.shape().dims4()?;
        let (p, s) = (self.padding, self.stride);
        if wc != c || k != k2 || k == 0 || s == 0 || h + 2 * p < k || wd + 2 * p < k {
            candle_core::bail!("conv: {:?} does not fit {:?}", wl.shape(), xl.shape());
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (wd + 2 * p - k) / s + 1);
        let (pixels, depth) = (oh * ow, c * k * k);
        let nr = PackPath::F32(self.isa).panel_width();
        let mut y = Vec::with_capacity(b * o * pixels);
        for image in x.chunks_exact(c * h * wd) {
            let cols = PackedWeight::pack_f32_with(pixels, depth, self.isa, |panel, dst| {
                // The panel's pixels: where each one's window starts in the (unpadded) input.
                let starts: Vec<(isize, isize)> = (panel * nr..pixels.min((panel + 1) * nr))
                    .map(|px| {
                        let (oy, ox) = (px / ow, px % ow);
                        ((oy * s) as isize - p as isize, (ox * s) as isize - p as isize)
                    })
                    .collect();
                for (step, row) in dst.chunks_exact_mut(nr).enumerate() {
                    let (ch, ky, kx) = (step / (k * k), step / k % k, step % k);
                    let plane = &image[ch * h * wd..][..h * wd];
                    for (v, &(y0, x0)) in row.iter_mut().zip(&starts) {
                        let (iy, ix) = (y0 + ky as isize, x0 + kx as isize);
                        *v = if (0..h as isize).contains(&iy) && (0..wd as isize).contains(&ix) {
                            plane[iy as usize * wd + ix as usize]
                        } else {
                            0.0
                        };
                    }
                }
            });
            y.extend_from_slice(&cols.matmul(w, o));
        }
        Ok((CpuStorage::F32(y), Shape::from_dims(&[b, o, oh, ow])))
    }
}

impl CustomOp2 for Conv {
    fn name(&self) -> &'static str {
        "conv2d-packed"
    }

    fn cpu_fwd<'a>(
        &self,
        s1: &'a CpuStorage,
        l1: &Layout,
        s2: &'a CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let data = |s: &'a CpuStorage, l: &Layout, name: &str| -> Result<&'a [f32]> {
            let CpuStorage::F32(data) = s else { candle_core::bail!("conv: {name} must be f32") };
            let Some((a, b)) = l.contiguous_offsets() else {
                candle_core::bail!("conv: {name} must be contiguous")
            };
            Ok(&data[a..b])
        };
        self.run(data(s1, l1, "x")?, l1, data(s2, l2, "weight")?, l2)
    }
}

/// `conv2d(x, weight)` for f32 on the CPU: `x` `[B, C, H, W]`, `weight` `[O, C, k, k]`, no bias;
/// `[B, O, OH, OW]`. `cfg`'s padding and stride apply to both axes; a dilation or groups other
/// than 1 is an error.
pub fn conv2d(x: &Tensor, weight: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    conv2d_with(Isa::current(), x, weight, cfg)
}

fn conv2d_with(isa: Isa, x: &Tensor, weight: &Tensor, cfg: &Conv2dConfig) -> Result<Tensor> {
    if cfg.dilation != 1 || cfg.groups != 1 {
        candle_core::bail!("conv: dilation {} and groups {} are not 1", cfg.dilation, cfg.groups)
    }
    let op = Conv { padding: cfg.padding, stride: cfg.stride, isa };
    x.contiguous()?.apply_op2_no_bwd(&weight.contiguous()?, &op)
}

#[cfg(test)]
mod tests {
    use candle_core::{DType, Device};

    use super::*;

    /// candle's own conv in f64 (the reference), against ours on every path: 1x1, 3x3 padded,
    /// 3x3 stride 2 (odd and even sides), more pixels than a panel and not a whole number of
    /// panels, two images.
    #[test]
    fn conv2d_matches_candle_in_f64_on_every_path() -> Result<()> {
        let dev = Device::Cpu;
        for (c, o, side, k, padding, stride) in
            [(5, 7, 9, 1, 0, 1), (6, 33, 10, 3, 1, 1), (4, 9, 13, 3, 1, 2), (3, 40, 12, 3, 1, 2)]
        {
            let x = Tensor::randn(0f32, 1.0, (2, c, side, side), &dev)?;
            let w = Tensor::randn(0f32, 0.3, (o, c, k, k), &dev)?;
            let want = x
                .to_dtype(DType::F64)?
                .conv2d(&w.to_dtype(DType::F64)?, padding, stride, 1, 1)?
                .to_dtype(DType::F32)?;
            for isa in Isa::supported() {
                let cfg = Conv2dConfig { padding, stride, ..Default::default() };
                let got = conv2d_with(isa, &x, &w, &cfg)?;
                assert_eq!(got.dims(), want.dims());
                let diff = (got - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(diff < 2e-5, "{isa:?} c {c} o {o} side {side} k {k}: max |diff| {diff}");
            }
        }
        Ok(())
    }
}
