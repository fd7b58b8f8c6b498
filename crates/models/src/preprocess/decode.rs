//! Decoding untrusted image bytes to 8-bit RGB, the way the reference's
//! `PIL.Image.open(..).convert("RGB")` sees them.
//!
//! Conversion rules (checked against Pillow 13, which the golden fixtures were made with):
//! grayscale is replicated to three channels; alpha is dropped, never composited (the RGB hidden
//! under transparent pixels shows); 16-bit RGB(A) and gray+alpha keep the high byte; 16-bit
//! grayscale (Pillow mode `I;16`) is clipped to 255. EXIF orientation is not applied, as
//! `Image.open` does not apply it either.
//!
//! JPEG goes through libjpeg-turbo's decoder (the `mozjpeg` crate: MozJPEG is a fork of
//! libjpeg-turbo with the same decoder) with libjpeg's defaults, the accurate integer IDCT and
//! fancy upsampling: what Pillow's bundled libjpeg-turbo does, so JPEG pixels are the reference's
//! bit for bit (the `image` crate's pure-Rust decoder differed by up to 2 levels). CMYK and YCCK
//! JPEGs are decoded to CMYK by libjpeg and converted with Pillow's own formula, after inverting
//! the samples as Pillow does for every four-layer JPEG; PNG and WebP take the `image` crate's
//! path.
//!
//! Safety: the header is read first and its dimensions checked against [`ImageLimits`] before
//! any pixel buffer exists; the `image` decoders then run under `image::Limits` as a second
//! fence, and libjpeg's buffers follow from the checked dimensions.

use std::io::Cursor;

use dsvl_core::ImageLimits;
use image::{DynamicImage, ImageFormat, ImageReader};

use super::ImageError;

/// A decoded image: packed RGB8, row-major.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// `width * height * 3` bytes.
    pub data: Vec<u8>,
}

/// Formats the decoder accepts. Anything else is refused with [`ImageError::UnsupportedFormat`].
const SUPPORTED: [ImageFormat; 4] =
    [ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::WebP, ImageFormat::Gif];

/// Decodes `bytes` (PNG, JPEG, WebP or GIF: its first frame) under `limits`.
///
/// # Errors
/// [`ImageError`] naming the problem: empty input, too many bytes, unknown or unsupported format,
/// dimensions over the limits (checked from the header, before allocation), or a corrupt or
/// truncated stream.
pub fn decode_rgb(bytes: &[u8], limits: &ImageLimits) -> Result<RgbImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    if bytes.len() > limits.max_input_bytes {
        return Err(ImageError::InputTooLarge {
            bytes: bytes.len(),
            limit: limits.max_input_bytes,
        });
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnknownFormat)?;
    if !SUPPORTED.contains(&format) {
        return Err(ImageError::UnsupportedFormat(format!("{format:?}")));
    }
    if format == ImageFormat::Gif {
        return super::gif::decode_gif_like_pillow(bytes, limits);
    }
    let (width, height) = ImageReader::with_format(Cursor::new(bytes), format)
        .into_dimensions()
        .map_err(|e| map_decode_error(e, format))?;
    check_dimensions(width, height, limits)?;
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes)?;
        if let Some(img) = decode_jpeg_like_libjpeg(bytes, (width, height))? {
            return Ok(img);
        }
    }

    let mut decoder_limits = image::Limits::default();
    decoder_limits.max_image_width = Some(limits.max_width);
    decoder_limits.max_image_height = Some(limits.max_height);
    decoder_limits.max_alloc = Some(limits.max_alloc);
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    reader.limits(decoder_limits);
    let img = reader.decode().map_err(|e| map_decode_error(e, format))?;
    to_rgb_like_pillow(img)
}

/// Refuses an image whose header claims no pixels, or more than `limits` allow (before any
/// pixel buffer exists).
pub(super) fn check_dimensions(
    width: u32,
    height: u32,
    limits: &ImageLimits,
) -> Result<(), ImageError> {
    if width == 0 || height == 0 {
        return Err(ImageError::ZeroSized { width, height });
    }
    if width > limits.max_width || height > limits.max_height {
        return Err(ImageError::DimensionsTooLarge {
            width,
            height,
            max_width: limits.max_width,
            max_height: limits.max_height,
        });
    }

    let pixels = u64::from(width) * u64::from(height);
    if pixels > limits.max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            pixels,
            max_pixels: limits.max_pixels,
        });
    }
    Ok(())
}

/// libjpeg (behind Pillow) refuses a JPEG whose entropy-coded data ends early ("image file is
/// truncated"); Rust decoders tend to fill the rest with grey instead. A complete baseline or
/// progressive JPEG ends with an EOI marker (FF D9), possibly followed by trailing bytes, so we
/// require one after the first start-of-scan.
fn check_jpeg_complete(bytes: &[u8]) -> Result<(), ImageError> {
    let sos = bytes.windows(2).position(|w| w == [0xFF, 0xDA]);
    let has_eoi_after = |start: usize| bytes[start..].windows(2).any(|w| w == [0xFF, 0xD9]);
    match sos {
        Some(pos) if has_eoi_after(pos + 2) => Ok(()),
        _ => Err(ImageError::Corrupt {
            format: "Jpeg".into(),
            reason: "truncated: no end-of-image marker after the scan data".into(),
        }),
    }
}

/// A JPEG decoded to RGB by libjpeg-turbo's decoder with its defaults (Pillow's: `JDCT_ISLOW`,
/// fancy upsampling, grayscale replicated); CMYK and YCCK JPEGs are decoded to CMYK and converted
/// as Pillow converts them ([`inverted_cmyk_to_rgb_like_pillow`]). `None` for colour spaces
/// libjpeg does not know. `header` is the size the header check
/// read; libjpeg must agree with it.
///
/// libjpeg reports fatal errors by unwinding out of its error handler (the crate's `unwinding`
/// build); they are caught here and become [`ImageError::Corrupt`]. Its warnings (corrupt data
/// it can decode past) are silent, as in Pillow.
fn decode_jpeg_like_libjpeg(
    bytes: &[u8],
    header: (u32, u32),
) -> Result<Option<RgbImage>, ImageError> {
    use mozjpeg::ColorSpace;
    let decode = || -> std::io::Result<Option<RgbImage>> {
        let jpeg = mozjpeg::Decompress::new_mem(bytes)?;
        let four_layers = match jpeg.color_space() {
            ColorSpace::JCS_YCbCr | ColorSpace::JCS_RGB | ColorSpace::JCS_GRAYSCALE => false,
            ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK => true,
            _ => return Ok(None),
        };
        let mut started =
            if four_layers { jpeg.to_colorspace(ColorSpace::JCS_CMYK)? } else { jpeg.rgb()? };
        let (width, height) = (started.width(), started.height());
        let mut data = started.read_scanlines::<u8>()?;
        started.finish()?;
        if four_layers {
            data = inverted_cmyk_to_rgb_like_pillow(&data);
        }
        Ok(Some(RgbImage { width, height, data }))
    };
    let corrupt = |reason: String| ImageError::Corrupt { format: "Jpeg".into(), reason };
    let img = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)) {
        Ok(Ok(img)) => img,
        Ok(Err(e)) => return Err(corrupt(e.to_string())),
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "libjpeg failed".into());
            return Err(corrupt(msg));
        }
    };
    match img {
        Some(img) if (img.width as u32, img.height as u32) != header => Err(corrupt(format!(
            "libjpeg decoded {}x{}, the header says {}x{}",
            img.width, img.height, header.0, header.1
        ))),
        Some(img) if img.data.len() != img.width * img.height * 3 => {
            Err(corrupt("truncated: libjpeg returned fewer rows than the header".into()))
        }
        other => Ok(other),
    }
}

/// Pillow's reading of a four-layer JPEG: the samples libjpeg gives as CMYK (it turns YCCK into
/// CMYK itself) are taken as Adobe-inverted, whatever the APP14 marker says (`JpegImagePlugin`'s
/// raw mode `CMYK;I`), then converted by Pillow's `cmyk2rgb`: with `nk = 255 - k`, each channel
/// is `nk - round(c * nk / 255)`, the rounded division done as `(t + (t >> 8)) >> 8` with
/// `t = c * nk + 128`. Packed CMYK in, packed RGB out.
fn inverted_cmyk_to_rgb_like_pillow(cmyk: &[u8]) -> Vec<u8> {
    let muldiv255 = |a: u32, b: u32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    cmyk.chunks_exact(4)
        .flat_map(|px| {
            let [c, m, y, k] = [px[0], px[1], px[2], px[3]].map(|v| u32::from(255 - v));
            let nk = 255 - k;
            [c, m, y].map(|v| (nk - muldiv255(v, nk)) as u8)
        })
        .collect()
}

fn map_decode_error(err: image::ImageError, format: ImageFormat) -> ImageError {
    use image::error::LimitErrorKind;
    match err {
        image::ImageError::Limits(l) => match l.kind() {
            LimitErrorKind::DimensionError => ImageError::Corrupt {
                format: format!("{format:?}"),
                reason: "dimensions exceed the limits".into(),
            },
            _ => ImageError::AllocationLimit,
        },
        image::ImageError::Unsupported(u) => {
            ImageError::UnsupportedFormat(format!("{format:?}: {u}"))
        }
        image::ImageError::IoError(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
            ImageError::Corrupt { format: format!("{format:?}"), reason: "truncated".into() }
        }
        other => {
            let msg = other.to_string();
            let lower = msg.to_ascii_lowercase();
            let truncated = ["not enough bytes", "eof", "end of file", "unexpected end"]
                .iter()
                .any(|p| lower.contains(p));
            let reason = if truncated { format!("truncated ({msg})") } else { msg };
            ImageError::Corrupt { format: format!("{format:?}"), reason }
        }
    }
}

fn to_rgb_like_pillow(img: DynamicImage) -> Result<RgbImage, ImageError> {
    let (width, height) = (img.width() as usize, img.height() as usize);
    let data: Vec<u8> = match img {
        DynamicImage::ImageRgb8(b) => b.into_raw(),
        DynamicImage::ImageRgba8(b) => {
            b.into_raw().chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect()
        }
        DynamicImage::ImageLuma8(b) => b.into_raw().into_iter().flat_map(|v| [v, v, v]).collect(),
        DynamicImage::ImageLumaA8(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| [p[0]; 3]).collect()
        }
        DynamicImage::ImageLuma16(b) => {
            b.into_raw().into_iter().flat_map(|v| [v.min(255) as u8; 3]).collect()
        }
        DynamicImage::ImageLumaA16(b) => {
            b.into_raw().chunks_exact(2).flat_map(|p| [(p[0] >> 8) as u8; 3]).collect()
        }
        DynamicImage::ImageRgb16(b) => b.into_raw().into_iter().map(|v| (v >> 8) as u8).collect(),
        DynamicImage::ImageRgba16(b) => b
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [(p[0] >> 8) as u8, (p[1] >> 8) as u8, (p[2] >> 8) as u8])
            .collect(),
        other => {
            return Err(ImageError::UnsupportedFormat(format!("pixel layout {:?}", other.color())))
        }
    };
    Ok(RgbImage { width, height, data })
}
