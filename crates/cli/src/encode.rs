//! `dsvl encode`: images to embeddings with the same code the vision-encoder service runs.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use dsvl_core::ImageLimits;
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::preprocess::{Preprocessed, Preprocessor};
use dsvl_models::vision::VisionEncoder;

use crate::model_args::ModelArgs;
use crate::progress;

/// Arguments of `dsvl encode`.
#[derive(Args, Debug)]
pub struct EncodeArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Output file: safetensors with `pixel_values` [n,3,S,S] and `embeddings` [n,576,H], F32.
    #[arg(long)]
    out: PathBuf,
    /// Images per forward pass.
    #[arg(long, default_value_t = 4)]
    batch_size: usize,
    /// Image files (PNG, JPEG, WebP), encoded in this order.
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// Runs the command.
pub fn run(args: EncodeArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let ckpt = args.model.open()?;
    let device = open_device(args.model.device)?;
    let t_load = Instant::now();
    let encoder = VisionEncoder::load(
        &ckpt,
        candle_dtype(args.model.dtype),
        &device,
        progress::loading("vision tower", ckpt.weight_bytes()),
    )
    .with_context(|| format!("cannot load the vision tower of {}", ckpt.source()))?;
    let load_s = t_load.elapsed().as_secs_f64();

    // Preprocess everything first, so a bad image fails before any forward pass.
    let pre = Preprocessor::new(encoder.preprocess_config().clone(), ImageLimits::default());
    let t_pre = Instant::now();
    let images: Vec<Preprocessed> = args
        .images
        .iter()
        .map(|p| pre.preprocess_file(p).with_context(|| format!("image {}", p.display())))
        .collect::<Result<_>>()?;
    let pre_s = t_pre.elapsed().as_secs_f64();

    let t_enc = Instant::now();
    let mut pixel_batches = Vec::new();
    let mut embedding_batches = Vec::new();
    for chunk in images.chunks(args.batch_size) {
        let refs: Vec<&Preprocessed> = chunk.iter().collect();
        let pixels = encoder.batch_pixels(&refs)?;
        embedding_batches.push(
            encoder.forward(&pixels)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?,
        );
        pixel_batches.push(pixels.to_device(&candle_core::Device::Cpu)?);
    }
    let enc_s = t_enc.elapsed().as_secs_f64();
    let pixels = Tensor::cat(&pixel_batches, 0)?;
    let embeddings = Tensor::cat(&embedding_batches, 0)?;

    if let Some(parent) = args.out.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("cannot create {}", parent.display()))?;
    }
    candle_core::safetensors::save(
        &[("pixel_values", pixels.clone()), ("embeddings", embeddings.clone())]
            .into_iter()
            .collect(),
        &args.out,
    )
    .with_context(|| format!("cannot write {}", args.out.display()))?;

    let n = images.len();
    println!("model       {} ({}, {})", ckpt.source(), args.model.dtype, args.model.device);
    println!("images      {n}");
    println!("pixel_values {:?} f32", pixels.dims());
    println!("embeddings  {:?} f32", embeddings.dims());
    println!(
        "timing      load {load_s:.2}s, preprocess {pre_s:.3}s ({:.1} img/s), encode {enc_s:.2}s ({:.2} img/s)",
        n as f64 / pre_s.max(1e-9),
        n as f64 / enc_s.max(1e-9)
    );
    for (i, (path, img)) in args.images.iter().zip(&images).enumerate() {
        let e = embeddings.get(i)?;
        let mean = e.mean_all()?.to_scalar::<f32>()?;
        let std = e.broadcast_sub(&e.mean_all()?)?.sqr()?.mean_all()?.sqrt()?.to_scalar::<f32>()?;
        let g = img.geometry;
        println!(
            "  [{i}] {}: {}x{} -> {}x{} at ({},{}) on {}², embedding mean {mean:+.4} std {std:.4}",
            path.display(),
            g.original.0,
            g.original.1,
            g.resized.0,
            g.resized.1,
            g.offset.0,
            g.offset.1,
            g.side
        );
    }
    println!("wrote       {}", args.out.display());
    Ok(())
}
