//! `dsvl-bench vision`: preprocessing images/s on the bundled images, and encoder + aligner
//! images/s at the real DeepSeek-VL-7B dimensions (random weights, f32, CPU) at several batch
//! sizes, against the PyTorch reference in the same run.

use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsvl_core::ImageLimits;
use dsvl_models::preprocess::Preprocessor;
use dsvl_models::vision::config::{AlignerConfig, ComponentConfig, TowerConfig};
use dsvl_models::vision::VisionEncoder;

use crate::{random, reference};

/// Arguments of `dsvl-bench vision`.
#[derive(Args)]
pub struct VisionArgs {
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batches: Vec<usize>,
    /// Timed forward passes per batch size (after one warm-up pass).
    #[arg(long, default_value_t = 2)]
    iters: usize,
    /// Seconds spent timing preprocessing.
    #[arg(long, default_value_t = 3.0)]
    preprocess_seconds: f64,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
}

fn images() -> Vec<std::path::PathBuf> {
    let root = reference::repo_root();
    vec![root.join("assets/images/rocket.jpg"), root.join("assets/images/chelsea.png")]
}

/// Runs the benchmark and prints the table.
pub fn run(args: VisionArgs, threads: usize) -> Result<()> {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference::repo_root().join("benches/configs/deepseek-vl-7b-chat.json"))?)?;
    let tower = TowerConfig::resolve(&serde_json::from_value::<ComponentConfig>(config["vision_config"].clone())?)?;
    let aligner = AlignerConfig::resolve(&serde_json::from_value::<ComponentConfig>(config["aligner_config"].clone())?)?;
    let pre_cfg = serde_json::from_slice(include_bytes!("../../assets/tiny-dsvl/preprocessor_config.json"))?;
    let pre = Preprocessor::new(pre_cfg, ImageLimits::default());

    // Preprocessing: decode + resize + pad + rescale, cycling over the sample images.
    let files: Vec<Vec<u8>> = images().iter().map(std::fs::read).collect::<std::io::Result<_>>()?;
    let (mut n, t0) = (0usize, Instant::now());
    while t0.elapsed().as_secs_f64() < args.preprocess_seconds {
        pre.preprocess_bytes(&files[n % files.len()])?;
        n += 1;
    }
    let pre_ips = n as f64 / t0.elapsed().as_secs_f64();
    eprintln!("dsvl preprocess: {pre_ips:.2} images/s");

    let device = Device::Cpu;
    let t = Instant::now();
    let encoder = VisionEncoder::new(tower, aligner, pre.config().clone(), random::var_builder(DType::F32, &device))?;
    eprintln!("built the 7B vision tower with random weights in {:.1}s", t.elapsed().as_secs_f64());
    encoder.forward(&Tensor::rand(0f32, 1.0, (1, 3, 1024, 1024), &device)?)?; // warm-up
    let mut ours = Vec::new();
    for &b in &args.batches {
        let x = Tensor::rand(0f32, 1.0, (b, 3, 1024, 1024), &device)?;
        let t = Instant::now();
        for _ in 0..args.iters {
            let out = encoder.forward(&x)?;
            anyhow::ensure!(out.dims() == [b, 576, 4096], "unexpected output {:?}", out.dims());
        }
        let ips = (b * args.iters) as f64 / t.elapsed().as_secs_f64();
        eprintln!("dsvl batch {b}: {ips:.4} images/s");
        ours.push((b, ips));
    }
    drop(encoder);

    let reference = if args.no_reference {
        None
    } else {
        let mut a = vec![
            "--threads".into(),
            threads.to_string(),
            "--batches".into(),
            args.batches.iter().map(|b| b.to_string()).collect::<Vec<_>>().join(","),
            "--iters".into(),
            args.iters.to_string(),
            "--preprocess-seconds".into(),
            args.preprocess_seconds.to_string(),
            "--images".into(),
        ];
        a.extend(images().iter().map(|p| p.display().to_string()));
        Some(reference::run_json("vision_reference.py", &a)?)
    };

    println!("\nDeepSeek-VL-7B vision tower + aligner, f32, CPU, {threads} threads (random weights)");
    println!("{:<24} {:>14} {:>14} {:>8}", "measure", "dsvl", "reference", "ratio");
    let row = |name: &str, ours: f64, theirs: Option<f64>| match theirs {
        Some(r) => println!("{name:<24} {ours:>14.4} {r:>14.4} {:>7.2}x", ours / r),
        None => println!("{name:<24} {ours:>14.4} {:>14} {:>8}", "-", "-"),
    };
    let r_pre = reference.as_ref().and_then(|r| r["preprocess_images_per_s"].as_f64());
    row("preprocess images/s", pre_ips, r_pre);
    for (b, ips) in ours {
        let r = reference.as_ref().map(|r| r["encode"][b.to_string()].as_f64().context("reference batch")).transpose()?;
        row(&format!("encode batch {b} images/s"), ips, r);
    }
    if let Some(r) = &reference {
        println!("reference: torch {} ({} threads)", r["torch"].as_str().unwrap_or("?"), r["threads"]);
    }
    Ok(())
}
