//! Image preprocessing, bit-exact with the reference `VLMImageProcessor`.
//!
//! Steps, in the reference's order: decode to RGB ([`decode_rgb`]); resize so the longer side
//! is `image_size` and the shorter `max(int(short / long * image_size), min_size)` with Pillow's
//! antialiased bicubic ([`resample`]); paste centred (floor on top/left) onto a square canvas of
//! `background_color = int(mean * 255)`; rescale by `rescale_factor` (computed in f64, stored as
//! f32, as transformers' `rescale` does); normalise only when `do_normalize` is set (the 7B
//! checkpoints leave normalisation to the towers).

mod decode;
mod gif;
pub mod resample;

use std::path::Path;

use dsvl_core::ImageLimits;
use serde::Deserialize;

pub use decode::{decode_rgb, RgbImage};

/// Why an image was refused. Every variant names the problem in its message.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Zero bytes were given.
    #[error("empty image: zero bytes")]
    Empty,
    /// More encoded bytes than allowed.
    #[error("image is {bytes} bytes, over the limit of {limit} bytes")]
    InputTooLarge {
        /// Encoded size.
        bytes: usize,
        /// The limit.
        limit: usize,
    },
    /// The bytes do not start like any known image format.
    #[error("unrecognised image format (supported: PNG, JPEG, WebP, GIF)")]
    UnknownFormat,
    /// A known format this build does not decode.
    #[error("unsupported image format {0} (supported: PNG, JPEG, WebP, GIF)")]
    UnsupportedFormat(String),
    /// The header claims dimensions over the limits; refused before decoding.
    #[error("image is {width}x{height}, over the limit of {max_width}x{max_height}")]
    DimensionsTooLarge {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
        /// Allowed width.
        max_width: u32,
        /// Allowed height.
        max_height: u32,
    },
    /// The header claims more pixels than the budget (a decompression bomb); refused before
    /// decoding.
    #[error("image is {width}x{height} ({pixels} pixels), over the budget of {max_pixels} pixels")]
    TooManyPixels {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
        /// Their product.
        pixels: u64,
        /// The budget.
        max_pixels: u64,
    },
    /// The header claims an empty image.
    #[error("image has no pixels ({width}x{height})")]
    ZeroSized {
        /// Claimed width.
        width: u32,
        /// Claimed height.
        height: u32,
    },
    /// The decoder would have to allocate more than allowed.
    #[error("decoding the image would exceed the memory limit")]
    AllocationLimit,
    /// The stream is corrupt or truncated.
    #[error("corrupt {format} image: {reason}")]
    Corrupt {
        /// Format the bytes claimed to be.
        format: String,
        /// What the decoder reported.
        reason: String,
    },
    /// Reading an image file failed.
    #[error("cannot read image {path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
}

/// The fields of `preprocessor_config.json` the reference `VLMImageProcessor` reads, with its
/// constructor defaults. Unknown keys (`background_color`, `processor_class`, ...) are ignored,
/// as the reference ignores them: the pad colour is derived from `image_mean`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct PreprocessConfig {
    /// Side of the square output.
    pub image_size: u32,
    /// Smallest side after resizing.
    #[serde(default = "default_min_size")]
    pub min_size: u32,
    /// Per-channel mean; also sets the pad colour. `null` means a (127,127,127) pad.
    #[serde(default = "default_mean")]
    pub image_mean: Option<[f64; 3]>,
    /// Per-channel std, used only when `do_normalize`.
    #[serde(default = "default_std")]
    pub image_std: Option<[f64; 3]>,
    /// Multiplier from u8 to float.
    #[serde(default = "default_rescale")]
    pub rescale_factor: f64,
    /// Whether the processor normalises (false for the 7B hybrid, which normalises in-model).
    #[serde(default = "default_true")]
    pub do_normalize: bool,
}

fn default_min_size() -> u32 {
    14
}
fn default_mean() -> Option<[f64; 3]> {
    Some([0.48145466, 0.4578275, 0.40821073])
}
fn default_std() -> Option<[f64; 3]> {
    Some([0.26862954, 0.26130258, 0.27577711])
}
fn default_rescale() -> f64 {
    1.0 / 255.0
}
fn default_true() -> bool {
    true
}

impl PreprocessConfig {
    /// Reads `preprocessor_config.json`.
    pub fn from_json(text: &str) -> Result<Self, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The canvas colour: `int(mean * 255)` per channel, or 127 without a mean.
    pub fn background_color(&self) -> [u8; 3] {
        match self.image_mean {
            Some(m) => m.map(|v| (v * 255.0) as u8),
            None => [127; 3],
        }
    }

    /// Target `(width, height)` of the resize step for an input of `width x height`, with the
    /// reference's float64 arithmetic and `int()` truncation.
    pub fn resized_size(&self, width: usize, height: usize) -> (usize, usize) {
        let max_side = width.max(height) as f64;
        let side = |v: usize| {
            ((v as f64 / max_side * f64::from(self.image_size)) as usize)
                .max(self.min_size as usize)
        };
        (side(width), side(height))
    }
}

/// Where the resized image landed on the canvas; useful for reporting and tests.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Geometry {
    /// Decoded `(width, height)`.
    pub original: (usize, usize),
    /// After the resize, `(width, height)`.
    pub resized: (usize, usize),
    /// Paste offset `(x, y)` on the canvas.
    pub offset: (usize, usize),
    /// Canvas side.
    pub side: usize,
}

/// One preprocessed image: `pixel_values` is `[3, side, side]` f32, channel-major.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// `3 * side * side` floats.
    pub pixel_values: Vec<f32>,
    /// How the image was placed.
    pub geometry: Geometry,
}

/// Turns image bytes into the model's `pixel_values`. Cheap to clone; holds only the config,
/// the limits and a 256-entry lookup table.
#[derive(Debug, Clone)]
pub struct Preprocessor {
    config: PreprocessConfig,
    limits: ImageLimits,
    /// `u8 -> f32` after rescale (and normalisation, per channel).
    lut: [[f32; 256]; 3],
}

pub use dsvl_core::cache_key::PREPROCESS_VERSION;

impl Preprocessor {
    /// Builds a preprocessor for `config` that refuses images over `limits`.
    pub fn new(config: PreprocessConfig, limits: ImageLimits) -> Self {
        let mut lut = [[0f32; 256]; 3];
        for (c, table) in lut.iter_mut().enumerate() {
            for (v, out) in table.iter_mut().enumerate() {
                // transformers' rescale: float64 multiply, then float32.
                let x = (v as f64 * config.rescale_factor) as f32;
                *out = match (config.do_normalize, config.image_mean, config.image_std) {
                    (true, Some(m), Some(s)) => (x - m[c] as f32) / s[c] as f32,
                    _ => x,
                };
            }
        }
        Self { config, limits, lut }
    }

    /// The configuration in use.
    pub fn config(&self) -> &PreprocessConfig {
        &self.config
    }

    /// The image limits in use.
    pub fn limits(&self) -> &ImageLimits {
        &self.limits
    }

    /// Decodes and preprocesses encoded image bytes.
    ///
    /// # Errors
    /// [`ImageError`] for anything the decoder refuses.
    pub fn preprocess_bytes(&self, bytes: &[u8]) -> Result<Preprocessed, ImageError> {
        let rgb = decode_rgb(bytes, &self.limits)?;
        Ok(self.preprocess_rgb(&rgb))
    }

    /// Reads an image file and preprocesses it.
    pub fn preprocess_file(&self, path: &Path) -> Result<Preprocessed, ImageError> {
        let bytes = std::fs::read(path)
            .map_err(|source| ImageError::Io { path: path.display().to_string(), source })?;
        self.preprocess_bytes(&bytes)
    }

    /// Resizes and pads a decoded image to the `[3, side, side]` u8 canvas (before rescale).
    pub fn canvas_u8(&self, rgb: &RgbImage) -> (Vec<u8>, Geometry) {
        let (rw, rh) = self.config.resized_size(rgb.width, rgb.height);
        let resized = resample::resize_bicubic_rgb8(&rgb.data, rgb.width, rgb.height, rw, rh);
        let side = rw.max(rh);
        let offset = if rw > rh { (0, (rw - rh) / 2) } else { ((rh - rw) / 2, 0) };
        let bg = self.config.background_color();
        let plane = side * side;
        let mut chw = vec![0u8; 3 * plane];
        for (c, channel) in chw.chunks_exact_mut(plane).enumerate() {
            channel.fill(bg[c]);
            for y in 0..rh {
                let dst = &mut channel[(offset.1 + y) * side + offset.0..][..rw];
                let src = &resized[y * rw * 3..(y + 1) * rw * 3];
                for (x, d) in dst.iter_mut().enumerate() {
                    *d = src[x * 3 + c];
                }
            }
        }
        let geometry =
            Geometry { original: (rgb.width, rgb.height), resized: (rw, rh), offset, side };
        (chw, geometry)
    }

    /// Resizes, pads and rescales a decoded image.
    pub fn preprocess_rgb(&self, rgb: &RgbImage) -> Preprocessed {
        let (chw, geometry) = self.canvas_u8(rgb);
        let plane = geometry.side * geometry.side;
        let mut pixel_values = Vec::with_capacity(chw.len());
        for (c, channel) in chw.chunks_exact(plane).enumerate() {
            let lut = &self.lut[c];
            pixel_values.extend(channel.iter().map(|&v| lut[v as usize]));
        }
        Preprocessed { pixel_values, geometry }
    }
}
