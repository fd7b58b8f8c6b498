//! Limits applied to untrusted images before and during decoding.

/// Bounds on an image accepted from a user. Width and height are checked against the decoder's
/// header before any pixel buffer is allocated (the `image` crate treats them as strict limits);
/// `max_alloc` caps what a decoder may allocate on top of that.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ImageLimits {
    /// Largest accepted encoded size in bytes.
    pub max_input_bytes: usize,
    /// Largest accepted width in pixels.
    pub max_width: u32,
    /// Largest accepted height in pixels.
    pub max_height: u32,
    /// Largest allocation a decoder may make, in bytes.
    pub max_alloc: u64,
    /// Most pixels (width x height) an image may have: the decompression-bomb budget, checked
    /// from the header like Pillow's `MAX_IMAGE_PIXELS`.
    pub max_pixels: u64,
}

/// Pillow's `Image.MAX_IMAGE_PIXELS` (about 89.5 Mpx, a 3-channel 8-bit image of 256 MiB).
pub const PILLOW_MAX_IMAGE_PIXELS: u64 = 89_478_485;

impl Default for ImageLimits {
    /// 32 MiB of encoded bytes and 16384 px a side (Pillow's own bomb threshold is ~89 Mpx; a
    /// 16384² RGBA image is 1 GiB decoded, so `max_alloc` is set just above that).
    fn default() -> Self {
        Self {
            max_input_bytes: 32 << 20,
            max_width: 16_384,
            max_height: 16_384,
            max_alloc: 1 << 30,
            max_pixels: PILLOW_MAX_IMAGE_PIXELS,
        }
    }
}
