//! Preprocessing parity with the reference `VLMImageProcessor` on the golden images.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dsvl_core::ImageLimits;
use dsvl_models::preprocess::{decode_rgb, PreprocessConfig, Preprocessor, RgbImage};
use dsvl_testkit::{golden_dir, tiny_model_dir};

fn preprocessor() -> Result<Preprocessor> {
    let text = std::fs::read_to_string(tiny_model_dir().join("preprocessor_config.json"))?;
    Ok(Preprocessor::new(PreprocessConfig::from_json(&text)?, ImageLimits::default()))
}

fn golden() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?)
}

const PNGS: [(&str, &str); 4] = [
    ("photo_png", "chelsea.png"),
    ("gray_png", "camera_gray.png"),
    ("rgba_png", "logo_rgba.png"),
    ("wide_png", "astronaut_wide_1600x300.png"),
];

/// Every golden PNG: the u8 canvas is byte-identical and the f32 pixel values equal the
/// reference's `rescale_lut[u8]` exactly.
#[test]
fn png_pixel_values_are_bit_exact() -> Result<()> {
    let pre = preprocessor()?;
    let golden = golden()?;
    let lut: Vec<f32> = golden["rescale_lut"].to_vec1()?;
    for (name, file) in PNGS {
        let out =
            pre.preprocess_file(&golden_dir().join(file)).with_context(|| file.to_string())?;
        let expected_u8: Vec<u8> =
            golden[&format!("{name}.pixel_values_u8")].flatten_all()?.to_vec1()?;
        let expected: Vec<f32> = expected_u8.iter().map(|&v| lut[v as usize]).collect();
        let mismatches = out
            .pixel_values
            .iter()
            .zip(&expected)
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        assert_eq!(mismatches, 0, "{name}: {mismatches} pixel values differ from the reference");
    }
    Ok(())
}

/// Geometry (resized size, paste offset) matches `summary.json` for all five images.
#[test]
fn geometry_matches_reference() -> Result<()> {
    let pre = preprocessor()?;
    let summary: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("summary.json"))?)?;
    for (name, info) in summary["images"].as_object().context("images")? {
        let file = info["file"].as_str().context("file")?;
        let out = pre.preprocess_file(&golden_dir().join(file))?;
        let (rw, rh) = out.geometry.resized;
        let hw: Vec<u64> = serde_json::from_value(info["resized_hw"].clone())?;
        let off: Vec<u64> = serde_json::from_value(info["paste_offset_xy"].clone())?;
        assert_eq!((rh as u64, rw as u64), (hw[0], hw[1]), "{name} resized size");
        assert_eq!(
            (out.geometry.offset.0 as u64, out.geometry.offset.1 as u64),
            (off[0], off[1]),
            "{name} offset"
        );
    }
    Ok(())
}

/// The rescale table equals the reference's f32(v * (1/255)) for all 256 values.
#[test]
fn rescale_matches_reference_lut() -> Result<()> {
    let pre = preprocessor()?;
    let golden = golden()?;
    let lut: Vec<f32> = golden["rescale_lut"].to_vec1()?;
    // A 1x1 image of each grey level pads to a canvas whose top-left pixel is that level.
    for v in [0u8, 1, 2, 127, 128, 254, 255] {
        let img = RgbImage { width: 1, height: 1, data: vec![v; 3] };
        let out = pre.preprocess_rgb(&img);
        assert_eq!(out.pixel_values[0].to_bits(), lut[v as usize].to_bits(), "level {v}");
    }
    Ok(())
}

/// JPEG: decoded by libjpeg-turbo's decoder with Pillow's settings, the pixels are the
/// reference's bit for bit, and so is the resized canvas (also when fed the reference's own
/// decode: the resize alone is exact).
#[test]
fn jpeg_decode_and_canvas_are_bit_exact() -> Result<()> {
    let pre = preprocessor()?;
    let golden = golden()?;
    let expected: Vec<u8> = golden["photo_jpeg.pixel_values_u8"].flatten_all()?.to_vec1()?;

    let reference_rgb = &golden["photo_jpeg.decoded_rgb"];
    let (h, w, _) = reference_rgb.dims3()?;
    let img = RgbImage { width: w, height: h, data: reference_rgb.flatten_all()?.to_vec1()? };
    let (canvas, _) = pre.canvas_u8(&img);
    assert!(canvas == expected, "resize of the reference-decoded JPEG is not bit-exact");

    let ours =
        decode_rgb(&std::fs::read(golden_dir().join("rocket.jpg"))?, &ImageLimits::default())?;
    assert_eq!((ours.width, ours.height), (w, h));
    let decode_diff =
        ours.data.iter().zip(&img.data).map(|(a, b)| a.abs_diff(*b)).max().unwrap_or(0);
    assert_eq!(decode_diff, 0, "JPEG decode differs from libjpeg-turbo's");
    let (canvas, _) = pre.canvas_u8(&ours);
    assert!(canvas == expected, "canvas of our JPEG decode is not the reference's");
    Ok(())
}
