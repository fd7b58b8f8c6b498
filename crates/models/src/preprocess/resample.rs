//! Pillow-compatible antialiased bicubic resampling of 8-bit RGB images.
//!
//! The reference resizes with `torchvision.transforms.functional.resize(pil, BICUBIC,
//! antialias=True)`, which for a PIL image is Pillow's `Image.resize(.., BICUBIC)`. To get the same
//! bytes we follow Pillow's resampler exactly (its `Resample.c` 8-bit path, re-derived here):
//!
//! * a separable filter: a horizontal pass into a temporary image, then a vertical pass, each
//!   skipped when that axis keeps its size; the horizontal pass only computes the rows the
//!   vertical pass will read;
//! * per output pixel, taps in `[xmin, xmin + n)` from the window centred on `(x + 0.5) * scale`,
//!   where `scale = in / out` and the kernel support grows with the downscale factor
//!   (`support = 2 * max(scale, 1)` for bicubic), with `int()` truncation of the bounds;
//! * Keys cubic with `a = -0.5`, weights normalised in f64, then converted to signed fixed point
//!   with 22 fractional bits (rounding half away from zero);
//! * integer accumulation starting at one half (`1 << 21`), then clipping to `0..=255`, which
//!   rounds and clamps between the two passes.

use rayon::prelude::*;

/// Fractional bits of the fixed-point coefficients (32 - 8 - 2, as in Pillow).
const PRECISION_BITS: u32 = 22;
/// Bicubic kernel support in input pixels at scale 1.
const BICUBIC_SUPPORT: f64 = 2.0;

/// Keys cubic convolution kernel with `a = -0.5`.
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// Fixed-point filter taps for one axis.
struct AxisCoefficients {
    /// Taps per output sample (the stride of `weights`).
    ksize: usize,
    /// For each output sample: first input index and number of taps.
    bounds: Vec<(usize, usize)>,
    /// `ksize` fixed-point weights per output sample.
    weights: Vec<i32>,
}

impl AxisCoefficients {
    fn new(in_size: usize, out_size: usize) -> Self {
        let scale = in_size as f64 / out_size as f64;
        let filterscale = scale.max(1.0);
        let support = BICUBIC_SUPPORT * filterscale;
        let ksize = support.ceil() as usize * 2 + 1;
        let mut bounds = Vec::with_capacity(out_size);
        let mut weights = vec![0i32; out_size * ksize];
        let mut taps = vec![0f64; ksize];
        for xx in 0..out_size {
            let center = (xx as f64 + 0.5) * scale;
            let ss = 1.0 / filterscale;
            // C's (int) cast truncates toward zero; negative starts are clamped right after.
            let xmin = ((center - support + 0.5) as i64).max(0) as usize;
            let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let n = xmax - xmin;
            let mut total = 0.0;
            for (x, tap) in taps.iter_mut().enumerate().take(n) {
                let w = bicubic((x as f64 + xmin as f64 - center + 0.5) * ss);
                *tap = w;
                total += w;
            }
            let row = &mut weights[xx * ksize..(xx + 1) * ksize];
            for (x, tap) in taps.iter().enumerate().take(n) {
                let w = if total != 0.0 { tap / total } else { *tap };
                let fixed = w * f64::from(1u32 << PRECISION_BITS);
                row[x] = if w < 0.0 { (fixed - 0.5) as i32 } else { (fixed + 0.5) as i32 };
            }
            bounds.push((xmin, n));
        }
        Self { ksize, bounds, weights }
    }

    fn taps(&self, out_index: usize) -> (usize, &[i32]) {
        let (xmin, n) = self.bounds[out_index];
        let start = out_index * self.ksize;
        (xmin, &self.weights[start..start + n])
    }
}

/// Round-and-clip a fixed-point accumulator to a byte, as Pillow's `clip8` lookup does:
/// `floor(acc / 2^22)` clamped to `0..=255` (the accumulator starts at one half, so this rounds).
#[inline]
fn clip8(acc: i32) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);
const CHANNELS: usize = 3;

/// Resizes a packed RGB8 image (`width * height * 3` bytes, row-major) to `out_w x out_h` with
/// Pillow's antialiased bicubic filter. Returns the packed RGB8 result.
///
/// # Panics
/// If `rgb.len() != width * height * 3` or any size is zero; callers validate sizes first.
pub fn resize_bicubic_rgb8(
    rgb: &[u8],
    width: usize,
    height: usize,
    out_w: usize,
    out_h: usize,
) -> Vec<u8> {
    assert_eq!(
        rgb.len(),
        width * height * CHANNELS,
        "RGB buffer size does not match its dimensions"
    );
    assert!(width > 0 && height > 0 && out_w > 0 && out_h > 0, "image sizes must be positive");
    let need_horizontal = out_w != width;
    let need_vertical = out_h != height;
    let vert = AxisCoefficients::new(height, out_h);

    // Rows of the source the vertical pass reads, so the horizontal pass skips the rest.
    let (first_row, last_row) = if need_vertical {
        let first = vert.bounds[0].0;
        let (lx, ln) = vert.bounds[out_h - 1];
        (first, lx + ln)
    } else {
        (0, height)
    };

    let (stage, stage_first_row) = if need_horizontal {
        let horiz = AxisCoefficients::new(width, out_w);
        let rows = last_row - first_row;
        let mut tmp = vec![0u8; rows * out_w * CHANNELS];
        tmp.par_chunks_mut(out_w * CHANNELS).enumerate().for_each(|(r, out_row)| {
            let src =
                &rgb[(first_row + r) * width * CHANNELS..(first_row + r + 1) * width * CHANNELS];
            for (xx, px) in out_row.chunks_exact_mut(CHANNELS).enumerate() {
                let (xmin, k) = horiz.taps(xx);
                let mut acc = [HALF; CHANNELS];
                for (s, &w) in src[xmin * CHANNELS..].chunks_exact(CHANNELS).zip(k) {
                    for c in 0..CHANNELS {
                        acc[c] += i32::from(s[c]) * w;
                    }
                }
                for c in 0..CHANNELS {
                    px[c] = clip8(acc[c]);
                }
            }
        });
        (tmp, first_row)
    } else {
        (rgb.to_vec(), 0)
    };
    if !need_vertical {
        return stage;
    }

    let row_len = out_w * CHANNELS;
    let mut out = vec![0u8; out_h * row_len];
    out.par_chunks_mut(row_len).enumerate().for_each(|(yy, out_row)| {
        let (ymin, k) = vert.taps(yy);
        let ymin = ymin - stage_first_row;
        // Accumulate whole rows (contiguous, vectorisable); integer sums are order-independent,
        // so this equals Pillow's per-pixel loop exactly.
        let mut acc = vec![HALF; row_len];
        for (y, &w) in k.iter().enumerate() {
            let src = &stage[(ymin + y) * row_len..][..row_len];
            for (a, &v) in acc.iter_mut().zip(src) {
                *a += i32::from(v) * w;
            }
        }
        for (px, &a) in out_row.iter_mut().zip(&acc) {
            *px = clip8(a);
        }
    });
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identity_size_is_a_copy() {
        let img: Vec<u8> = (0..4 * 3 * 3).map(|v| v as u8).collect();
        assert_eq!(resize_bicubic_rgb8(&img, 4, 3, 4, 3), img);
    }

    #[test]
    fn constant_image_stays_constant() {
        // Normalised weights sum to one, so a flat image must stay flat in both directions.
        let img = vec![77u8; 37 * 23 * 3];
        for (w, h) in [(10, 5), (100, 60), (37, 90), (1, 1)] {
            let out = resize_bicubic_rgb8(&img, 37, 23, w, h);
            assert!(out.iter().all(|&v| v == 77), "{w}x{h}");
        }
    }

    #[test]
    fn clip_saturates_and_rounds() {
        assert_eq!(clip8(-5), 0);
        assert_eq!(clip8(HALF + (3 << PRECISION_BITS)), 3);
        assert_eq!(clip8(300 << PRECISION_BITS), 255);
        assert_eq!(clip8((256 << PRECISION_BITS) - 1), 255);
    }

    #[test]
    fn weights_are_normalised() {
        for (i, o) in [(640, 1024), (1600, 1024), (300, 192), (1024, 14)] {
            let c = AxisCoefficients::new(i, o);
            for xx in 0..o {
                let (_, k) = c.taps(xx);
                let sum: i64 = k.iter().map(|&w| i64::from(w)).sum();
                assert!(
                    (sum - (1 << PRECISION_BITS)).abs() <= k.len() as i64,
                    "{i}->{o} at {xx}: {sum}"
                );
            }
        }
    }
}
