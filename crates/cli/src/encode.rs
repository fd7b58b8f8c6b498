//! `dsvl encode`: images to embeddings with the same code the vision-encoder service runs.
//! Takes image files and folders (a folder's images in name order), and shows progress per
//! image (a bar on a terminal, log lines otherwise).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use clap::Args;
use dsvl_core::ImageLimits;
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::preprocess::{Preprocessed, Preprocessor};
use dsvl_models::vision::VisionEncoder;

use dsvl_telemetry::progress::{Progress, Unit};

use crate::model_args::ModelArgs;
use crate::progress;

/// File extensions read from a folder (the formats the preprocessor decodes).
const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "gif"];

/// Whether `p` is a file with an image extension ([`IMAGE_EXTENSIONS`], any case).
pub(crate) fn is_image_file(p: &Path) -> bool {
    p.is_file()
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| x.eq_ignore_ascii_case(e)))
}

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
    /// Image files (PNG, JPEG, WebP, GIF) and folders of them, encoded in this order (a folder's
    /// images in name order; other files in it are skipped).
    #[arg(required = true)]
    images: Vec<PathBuf>,
}

/// The image files of `inputs`: files as given, folders replaced by their images.
fn expand_folders(inputs: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for input in inputs {
        if !input.is_dir() {
            out.push(input.clone());
            continue;
        }
        let mut found: Vec<PathBuf> = std::fs::read_dir(input)
            .with_context(|| format!("cannot read the folder {}", input.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_image_file(p))
            .collect();
        if found.is_empty() {
            bail!(
                "the folder {} holds no images (looked for .{})",
                input.display(),
                IMAGE_EXTENSIONS.join(", .")
            );
        }
        found.sort();
        out.extend(found);
    }
    Ok(out)
}

/// Runs the command.
pub fn run(args: EncodeArgs) -> Result<()> {
    if args.batch_size == 0 {
        bail!("--batch-size must be at least 1");
    }
    let paths = expand_folders(&args.images)?;
    let ckpt = args.model.open()?;
    let device = open_device(args.model.device)?;
    let t_load = Instant::now();
    let encoder = progress::loading("vision tower", ckpt.weight_bytes(), |p| {
        VisionEncoder::load(&ckpt, candle_dtype(args.model.dtype), &device, p)
    })
    .with_context(|| format!("cannot load the vision tower of {}", ckpt.source()))?;
    let load_s = t_load.elapsed().as_secs_f64();
    let n = paths.len() as u64;
    // Progress only where there is something to wait for.
    let report = |what: &str| {
        (n > args.batch_size as u64).then(|| Progress::new(what, Unit::Items("images")))
    };

    // Preprocess everything first, so a bad image fails before any forward pass.
    let pre = Preprocessor::new(encoder.preprocess_config().clone(), ImageLimits::default());
    let t_pre = Instant::now();
    let preprocessing = report("preprocessing");
    let images: Vec<Preprocessed> = paths
        .iter()
        .enumerate()
        .map(|(i, p)| {
            let img = pre.preprocess_file(p).with_context(|| format!("image {}", p.display()));
            if let Some(r) = &preprocessing {
                r.update(i as u64 + 1, n, &p.display().to_string());
            }
            img
        })
        .collect::<Result<_>>()?;
    if let Some(r) = &preprocessing {
        r.finish();
    }
    let pre_s = t_pre.elapsed().as_secs_f64();

    let t_enc = Instant::now();
    let encoding = report("encoding");
    let mut pixel_batches = Vec::new();
    let mut embedding_batches = Vec::new();
    for (b, chunk) in images.chunks(args.batch_size).enumerate() {
        let refs: Vec<&Preprocessed> = chunk.iter().collect();
        let pixels = encoder.batch_pixels(&refs)?;
        embedding_batches.push(
            encoder.forward(&pixels)?.to_dtype(DType::F32)?.to_device(&candle_core::Device::Cpu)?,
        );
        pixel_batches.push(pixels.to_device(&candle_core::Device::Cpu)?);
        if let Some(r) = &encoding {
            let done = ((b + 1) * args.batch_size).min(images.len());
            r.update(
                done as u64,
                n,
                &format!("batch {} of {}", b + 1, images.len().div_ceil(args.batch_size)),
            );
        }
    }
    if let Some(r) = &encoding {
        r.finish();
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
    for (i, (path, img)) in paths.iter().zip(&images).enumerate() {
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
