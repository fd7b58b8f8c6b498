//! Hostile and unusual images: each either works like the reference or fails with a typed
//! error that names the problem.

use anyhow::Result;
use dsvl_core::ImageLimits;
use dsvl_models::preprocess::{decode_rgb, ImageError, PreprocessConfig, Preprocessor};
use dsvl_testkit::{extra_fixtures_dir, golden_dir, png_header_only, tiny_model_dir};

fn preprocessor() -> Result<Preprocessor> {
    let text = std::fs::read_to_string(tiny_model_dir().join("preprocessor_config.json"))?;
    Ok(Preprocessor::new(PreprocessConfig::from_json(&text)?, ImageLimits::default()))
}

#[test]
fn empty_input_is_refused() {
    let err = decode_rgb(&[], &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::Empty), "{err}");
    assert!(err.to_string().contains("empty"));
}

#[test]
fn random_bytes_are_an_unknown_format() {
    let bytes: Vec<u8> =
        (0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let err = decode_rgb(&bytes, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::UnknownFormat), "{err}");
}

#[test]
fn unsupported_formats_are_named() {
    for (bytes, name) in [
        (&b"II*\x00\x08\x00\x00\x00\x00\x00"[..], "Tiff"),
        (&b"BM\x1e\x00\x00\x00\x00\x00\x00\x00\x1a\x00\x00\x00"[..], "Bmp"),
    ] {
        let err = decode_rgb(bytes, &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::UnsupportedFormat(_)), "{err}");
        assert!(err.to_string().contains(name), "{err}");
    }
}

#[test]
fn truncated_jpeg_is_refused_like_pillow() -> Result<()> {
    let full = std::fs::read(golden_dir().join("rocket.jpg"))?;
    for keep in [full.len() / 2, full.len() - 2, 600] {
        let err = decode_rgb(&full[..keep], &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "{keep} bytes: {err}");
        assert!(err.to_string().contains("truncated"), "{err}");
    }
    Ok(())
}

#[test]
fn truncated_png_is_refused() -> Result<()> {
    let full = std::fs::read(golden_dir().join("chelsea.png"))?;
    let err = decode_rgb(&full[..full.len() / 3], &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::Corrupt { .. }), "{err}");
    Ok(())
}

/// A 1-KB file whose header claims 60000x60000 (10.8 GB of RGB) is refused from the header,
/// before any pixel buffer exists.
#[test]
fn decompression_bomb_header_is_refused_before_allocation() {
    let png = png_header_only(60_000, 60_000);
    assert!(png.len() < 1024);
    let err = decode_rgb(&png, &ImageLimits::default()).unwrap_err();
    match err {
        ImageError::DimensionsTooLarge { width, height, .. } => {
            assert_eq!((width, height), (60_000, 60_000))
        }
        other => panic!("expected DimensionsTooLarge, got {other}"),
    }
    // Within the dimension limits but over the allocation budget: the decoder's own fence.
    let limits = ImageLimits { max_alloc: 1 << 20, ..ImageLimits::default() };
    let err = decode_rgb(&png_header_only(4000, 4000), &limits).unwrap_err();
    assert!(matches!(err, ImageError::AllocationLimit | ImageError::Corrupt { .. }), "{err}");
}

#[test]
fn oversized_input_is_refused() {
    let limits = ImageLimits { max_input_bytes: 10, ..ImageLimits::default() };
    let err = decode_rgb(&[0u8; 11], &limits).unwrap_err();
    assert!(matches!(err, ImageError::InputTooLarge { bytes: 11, limit: 10 }), "{err}");
}

/// 4000x60, 40x900, 1x1 and 3x2 images resize exactly like Pillow (fixtures made by
/// `tests/fixtures/extra/make_extra.py`) and land where the reference pads them.
#[test]
fn extreme_aspect_ratios_match_pillow() -> Result<()> {
    let pre = preprocessor()?;
    let cases: serde_json::Value =
        serde_json::from_slice(&std::fs::read(extra_fixtures_dir().join("cases.json"))?)?;
    for (name, case) in cases.as_object().expect("cases") {
        let rgb = decode_rgb(
            &std::fs::read(extra_fixtures_dir().join(format!("{name}.png")))?,
            &ImageLimits::default(),
        )?;
        let want = decode_rgb(
            &std::fs::read(extra_fixtures_dir().join(format!("{name}.resized.png")))?,
            &ImageLimits::default(),
        )?;
        let resized: Vec<usize> = serde_json::from_value(case["resized"].clone())?;
        assert_eq!((want.width, want.height), (resized[0], resized[1]), "{name}");
        let (canvas, geometry) = pre.canvas_u8(&rgb);
        assert_eq!(geometry.resized, (want.width, want.height), "{name}: resized size");
        let (ox, oy) = geometry.offset;
        let side = geometry.side;
        let mut mismatches = 0;
        for c in 0..3 {
            for y in 0..want.height {
                for x in 0..want.width {
                    let ours = canvas[c * side * side + (oy + y) * side + ox + x];
                    mismatches += usize::from(ours != want.data[(y * want.width + x) * 3 + c]);
                }
            }
        }
        assert_eq!(mismatches, 0, "{name}: {mismatches} bytes differ from Pillow");
        // The rest of the canvas is the background colour (122, 116, 104).
        let bg = pre.config().background_color();
        if oy > 0 {
            assert_eq!(canvas[0], bg[0], "{name}");
            assert_eq!(canvas[2 * side * side], bg[2], "{name}");
        }
    }
    Ok(())
}

/// A real, complete 16384 x 16384 PNG (a quarter GiB of grey, under 2 MB on the wire, which
/// the default limits would otherwise decode into 768 MiB of RGB) is refused from its header by
/// the pixel budget (Pillow's `MAX_IMAGE_PIXELS`), at once and before any pixel buffer exists.
#[test]
fn a_real_16k_png_is_refused_by_the_pixel_budget() {
    use image::ImageEncoder;
    let side = 16_384u32;
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new_with_quality(
        &mut png,
        image::codecs::png::CompressionType::Default,
        image::codecs::png::FilterType::NoFilter,
    )
    .write_image(&vec![128u8; (side * side) as usize], side, side, image::ExtendedColorType::L8)
    .unwrap();
    assert!(png.len() < 2 << 20, "{} bytes", png.len());
    let t = std::time::Instant::now();
    let err = decode_rgb(&png, &ImageLimits::default()).unwrap_err();
    assert!(t.elapsed() < std::time::Duration::from_millis(100), "{:?}", t.elapsed());
    match err {
        ImageError::TooManyPixels { width, height, pixels, max_pixels } => {
            assert_eq!((width, height, pixels), (side, side, u64::from(side * side)));
            assert_eq!(max_pixels, dsvl_core::PILLOW_MAX_IMAGE_PIXELS);
        }
        other => panic!("expected TooManyPixels, got {other}"),
    }
    // Raising the budget lets the same header through to the decoder's own allocation fence.
    let limits =
        ImageLimits { max_pixels: u64::MAX, max_alloc: 64 << 20, ..ImageLimits::default() };
    let err = decode_rgb(&png, &limits).unwrap_err();
    assert!(matches!(err, ImageError::AllocationLimit | ImageError::Corrupt { .. }), "{err}");
}

/// libjpeg's fatal errors (bad markers, impossible tables, scans that do not fit the frame) come
/// back as errors, never a crash or a panic out of the decoder: rocket.jpg with bytes
/// overwritten at 400 spread positions (headers, tables, scan data) and with its scan data cut
/// short before the end-of-image marker. Some variants still decode (libjpeg decodes past
/// damaged entropy data, as Pillow does); those must come out at the header's size.
#[test]
fn corrupt_jpegs_are_errors_or_images_never_crashes() -> Result<()> {
    let full = std::fs::read(golden_dir().join("rocket.jpg"))?;
    let limits = ImageLimits::default();
    let (mut errors, mut decoded, mut libjpeg_fatal) = (0, 0, 0);
    for i in 0..400usize {
        let mut bytes = full.clone();
        let n = bytes.len() - 2;
        let at = (i * 7919) % n + 2; // keep the SOI marker
        bytes[at] = bytes[at].wrapping_add(97 + i as u8);
        bytes[(at * 31) % n + 2] ^= 0xFF;
        match decode_rgb(&bytes, &limits) {
            Ok(img) => {
                assert_eq!(img.data.len(), img.width * img.height * 3);
                decoded += 1;
            }
            Err(e) => {
                errors += 1;
                libjpeg_fatal += usize::from(e.to_string().contains("libjpeg fatal error"));
                println!("variant {i}: {e}");
            }
        }
    }
    // Scan data cut in the middle but with the end-of-image marker kept: libjpeg pads the
    // missing data (a warning), as Pillow does for a stream that still ends properly.
    let sos = full.windows(2).position(|w| w == [0xFF, 0xDA]).expect("a scan");
    let mut cut = full[..sos + (full.len() - sos) / 2].to_vec();
    cut.extend_from_slice(&[0xFF, 0xD9]);
    let img = decode_rgb(&cut, &limits)?;
    assert_eq!(img.data.len(), img.width * img.height * 3);
    println!("{decoded} damaged variants decoded, {errors} refused ({libjpeg_fatal} by libjpeg)");
    assert!(libjpeg_fatal > 0, "no damaged variant reached a libjpeg fatal error");
    Ok(())
}

/// CMYK and YCCK JPEGs (baseline and progressive, with and without the APP14 "Adobe" marker)
/// decode to exactly the RGB bytes Pillow's `convert("RGB")` gives (fixtures made by
/// `tests/fixtures/extra/make_cmyk.py`): every four-layer JPEG read as Adobe-inverted CMYK, then
/// Pillow's `cmyk2rgb`. WebP (lossy with and without alpha, lossless; `make_webp.py`) likewise,
/// and GIF (`make_gif.py`: the first frame on the logical screen, transparent index shown by its
/// colour, frames offset and past the screen, a palette shorter than the indices, grey-ramp
/// palettes and no palette at all read as grey levels).
#[test]
fn cmyk_ycck_webp_and_gif_convert_like_pillow() -> Result<()> {
    let cases = ["cmyk_adobe", "cmyk_no_adobe", "ycck_adobe", "ycck_progressive"]
        .map(|name| (name, "jpg"))
        .into_iter()
        .chain(["webp_lossy", "webp_lossy_alpha", "webp_lossless"].map(|name| (name, "webp")))
        .chain(
            [
                "gif_interlaced",
                "gif_not_interlaced",
                "gif_gray",
                "gif_animated",
                "gif_offset_transparent",
                "gif_offset_opaque",
                "gif_beyond_screen",
                "gif_short_palette",
                "gif_ramp_global",
                "gif_ramp_local",
                "gif_no_palette",
            ]
            .map(|name| (name, "gif")),
        );
    for (name, ext) in cases {
        let read = |file: String| std::fs::read(extra_fixtures_dir().join(file));
        let ours = decode_rgb(&read(format!("{name}.{ext}"))?, &ImageLimits::default())?;
        let want = decode_rgb(&read(format!("{name}.rgb.png"))?, &ImageLimits::default())?;
        assert_eq!((ours.width, ours.height), (want.width, want.height), "{name}");
        let differ = ours.data.iter().zip(&want.data).filter(|(a, b)| a != b).count();
        let worst = ours.data.iter().zip(&want.data).map(|(a, b)| a.abs_diff(*b)).max();
        assert_eq!(differ, 0, "{name}: {differ} bytes differ from Pillow (worst by {worst:?})");
    }
    Ok(())
}

/// A GIF cut short is refused like Pillow refuses it ("image file is truncated"), and one whose
/// logical screen is over the limits is refused from its header.
#[test]
fn truncated_and_oversized_gifs_are_refused() -> Result<()> {
    let whole = std::fs::read(extra_fixtures_dir().join("gif_not_interlaced.gif"))?;
    for cut in [whole.len() / 2, whole.len() - 30, 20] {
        let err = decode_rgb(&whole[..cut], &ImageLimits::default()).unwrap_err();
        assert!(matches!(err, ImageError::Corrupt { .. }), "cut at {cut}: {err}");
    }
    let mut huge = whole.clone();
    huge[6..10].copy_from_slice(&[0x20, 0x4e, 0x20, 0x4e]); // a 20000 x 20000 screen
    let err = decode_rgb(&huge, &ImageLimits::default()).unwrap_err();
    assert!(matches!(err, ImageError::DimensionsTooLarge { .. }), "{err}");
    Ok(())
}
