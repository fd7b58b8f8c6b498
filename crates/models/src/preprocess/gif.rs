//! GIF decoded as the reference's `PIL.Image.open(..).convert("RGB")` sees it: the first frame
//! only, as palette indices laid out on the logical screen, then looked up in the palette.
//!
//! Pillow's rules (`GifImagePlugin`, checked against Pillow 13 with the fixtures of
//! `tests/fixtures/extra/make_gif.py`): the image is the logical screen, grown to the first
//! frame's extent where the frame reaches past it; pixels outside the frame hold the frame's
//! transparent index when it has one and index 0 otherwise, and a transparent index shows its
//! palette colour (P to RGB ignores transparency, so nothing is composited); the frame's local
//! palette wins over the global one; an index past the end of the palette is black. A palette
//! that is a grey ramp (entry `i` is `(i, i, i)`) counts as none: a local one gives way to the
//! global palette, and with neither left Pillow opens the frame as mode "L", where every index
//! is its own grey, past the palette's end too. A GIF with no colour table at all reads the same
//! way; the `gif` crate refuses a frame without one, so such a file is handed to it with a grey
//! ramp as its global table (see [`with_grey_ramp_if_no_global_table`]), which those rules then
//! drop again.
//!
//! Safety: the screen and first-frame descriptors are read first and the image's size checked
//! against [`ImageLimits`] before the frame's pixels are decoded; the `gif` crate's own memory
//! limit is set to `max_alloc` as a second fence.

use std::num::NonZeroU64;

use dsvl_core::ImageLimits;

use super::decode::{check_dimensions, RgbImage};
use super::ImageError;

fn corrupt(reason: impl std::fmt::Display) -> ImageError {
    ImageError::Corrupt { format: "Gif".into(), reason: reason.to_string() }
}

/// Decodes the first frame of a GIF to RGB the way Pillow does, under `limits`.
pub(super) fn decode_gif_like_pillow(
    bytes: &[u8],
    limits: &ImageLimits,
) -> Result<RgbImage, ImageError> {
    let mut options = gif::DecodeOptions::new();
    options.set_color_output(gif::ColorOutput::Indexed);
    if let Some(bytes) = NonZeroU64::new(limits.max_alloc) {
        options.set_memory_limit(gif::MemoryLimit::Bytes(bytes));
    }
    let bytes = with_grey_ramp_if_no_global_table(bytes);
    let mut decoder = options.read_info(&bytes[..]).map_err(map_gif_error)?;
    let screen = (usize::from(decoder.width()), usize::from(decoder.height()));
    let global = decoder.global_palette().map(<[u8]>::to_vec);
    let frame = decoder
        .next_frame_info()
        .map_err(map_gif_error)?
        .ok_or_else(|| corrupt("no image in the file"))?;
    let (left, top) = (usize::from(frame.left), usize::from(frame.top));
    let (fw, fh) = (usize::from(frame.width), usize::from(frame.height));
    let fill = frame.transparent.unwrap_or(0);
    // `None`: grey, the index as its value (Pillow's mode "L").
    let palette =
        frame.palette.clone().filter(|p| !is_grey_ramp(p)).or(global.filter(|p| !is_grey_ramp(p)));
    let (width, height) = (screen.0.max(left + fw), screen.1.max(top + fh));
    check_dimensions(width as u32, height as u32, limits)?;

    let mut indices = vec![0u8; fw * fh];
    decoder.read_into_buffer(&mut indices).map_err(map_gif_error)?;
    let mut canvas = vec![fill; width * height];
    for (y, row) in indices.chunks_exact(fw.max(1)).enumerate().take(fh) {
        let at = (top + y) * width + left;
        canvas[at..at + fw].copy_from_slice(row);
    }
    let data = canvas
        .iter()
        .flat_map(|&i| {
            let at = usize::from(i) * 3;
            match &palette {
                Some(p) => p.get(at..at + 3).map_or([0, 0, 0], |c| [c[0], c[1], c[2]]),
                None => [i, i, i],
            }
        })
        .collect();
    Ok(RgbImage { width, height, data })
}

/// `bytes` with a 256-entry grey ramp inserted as the global colour table when the logical
/// screen descriptor declares none (flag bit 7 of byte 10 clear), `bytes` as they are otherwise.
///
/// A frame with neither a local nor a global table is refused by the `gif` crate ("no color
/// table available"), where Pillow opens it as mode "L". A grey-ramp table counts as no table
/// under Pillow's rules (and [`is_grey_ramp`] here), so the frame still reads as grey levels,
/// and a local table, if the frame has one, still wins. The LZW data is untouched.
fn with_grey_ramp_if_no_global_table(bytes: &[u8]) -> std::borrow::Cow<'_, [u8]> {
    const SCREEN_END: usize = 13; // "GIF89a", width, height, flags, background, aspect
    match bytes.get(10) {
        Some(flags) if flags & 0x80 == 0 && bytes.len() >= SCREEN_END => {
            let mut patched = Vec::with_capacity(bytes.len() + 768);
            patched.extend_from_slice(&bytes[..SCREEN_END]);
            patched[10] |= 0x80 | 7; // a global table of 2 << 7 = 256 entries
            patched.extend((0..=255u8).flat_map(|i| [i, i, i]));
            patched.extend_from_slice(&bytes[SCREEN_END..]);
            patched.into()
        }
        _ => bytes.into(),
    }
}

/// Whether every entry `i` of an RGB `palette` is `(i, i, i)`: Pillow's
/// `GifImagePlugin._is_palette_needed` is false for it, and the frame reads as grey levels.
fn is_grey_ramp(palette: &[u8]) -> bool {
    palette.chunks(3).enumerate().all(|(i, c)| c.iter().all(|&v| usize::from(v) == i))
}

fn map_gif_error(err: gif::DecodingError) -> ImageError {
    use gif::DecodingError as E;
    match err {
        E::MemoryLimit | E::OutOfMemory => ImageError::AllocationLimit,
        E::UnexpectedEof => corrupt("truncated"),
        E::Io(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => corrupt("truncated"),
        other => corrupt(other),
    }
}
