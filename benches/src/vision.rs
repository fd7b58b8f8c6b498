//! `dsvl-bench vision`: preprocessing images/s on the bundled images, and encoder + aligner
//! images/s at the real DeepSeek-VL-7B dimensions (random weights, f32, CPU) at several batch
//! sizes, alternating rounds with the PyTorch reference.

use std::time::Instant;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsvl_core::ImageLimits;
use dsvl_models::preprocess::Preprocessor;
use dsvl_models::vision::config::{AlignerConfig, ComponentConfig, TowerConfig};
use dsvl_models::vision::VisionEncoder;
use serde_json::json;

use crate::random;
use crate::reference::{print_table, repo_root, Reference, Row};

/// Arguments of `dsvl-bench vision`.
#[derive(Args)]
pub struct VisionArgs {
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batches: Vec<usize>,
    /// Alternating rounds per measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per preprocessing round.
    #[arg(long, default_value_t = 2.0)]
    preprocess_seconds: f64,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
}

fn images() -> Vec<std::path::PathBuf> {
    let root = repo_root();
    vec![root.join("assets/images/rocket.jpg"), root.join("assets/images/chelsea.png")]
}

/// Builds the VL-7B vision tower with random weights.
pub fn vl7b_encoder(dtype: DType, device: &Device) -> Result<VisionEncoder> {
    let config: serde_json::Value = serde_json::from_slice(&std::fs::read(
        repo_root().join("benches/configs/deepseek-vl-7b-chat.json"),
    )?)?;
    let tower = TowerConfig::resolve(&serde_json::from_value::<ComponentConfig>(
        config["vision_config"].clone(),
    )?)?;
    let aligner = AlignerConfig::resolve(&serde_json::from_value::<ComponentConfig>(
        config["aligner_config"].clone(),
    )?)?;
    let pre_cfg =
        serde_json::from_slice(include_bytes!("../../assets/tiny-dsvl/preprocessor_config.json"))?;
    Ok(VisionEncoder::new(tower, aligner, pre_cfg, random::var_builder(dtype, device))?)
}

/// Runs the benchmark and prints the table.
pub fn run(args: VisionArgs, threads: usize) -> Result<()> {
    let mut reference = if args.no_reference {
        None
    } else {
        let mut a = vec!["--threads".to_string(), threads.to_string(), "--images".into()];
        a.extend(images().iter().map(|p| p.display().to_string()));
        Some(Reference::start("vision_reference.py", &a)?)
    };
    let device = Device::Cpu;
    let encoder = vl7b_encoder(DType::F32, &device)?;
    let pre = Preprocessor::new(encoder.preprocess_config().clone(), ImageLimits::default());
    encoder.forward(&Tensor::rand(0f32, 1.0, (1, 3, 1024, 1024), &device)?)?; // warm-up
    let files: Vec<Vec<u8>> = images().iter().map(std::fs::read).collect::<std::io::Result<_>>()?;

    let mut rows = vec![Row { name: "preprocess images/s".into(), ours: vec![], theirs: vec![] }];
    rows.extend(args.batches.iter().map(|b| Row {
        name: format!("encode batch {b} images/s"),
        ours: vec![],
        theirs: vec![],
    }));
    for round in 0..args.rounds {
        let (mut n, t0) = (0usize, Instant::now());
        while t0.elapsed().as_secs_f64() < args.preprocess_seconds {
            pre.preprocess_bytes(&files[n % files.len()])?;
            n += 1;
        }
        rows[0].ours.push(n as f64 / t0.elapsed().as_secs_f64());
        if let Some(r) = &mut reference {
            rows[0].theirs.push(
                r.call(json!({"op": "preprocess", "seconds": args.preprocess_seconds}))?
                    ["images_per_s"]
                    .as_f64()
                    .unwrap_or(f64::NAN),
            );
        }
        for (i, &b) in args.batches.iter().enumerate() {
            let x = Tensor::rand(0f32, 1.0, (b, 3, 1024, 1024), &device)?;
            let t = Instant::now();
            let out = encoder.forward(&x)?;
            anyhow::ensure!(out.dims() == [b, 576, 4096], "unexpected output {:?}", out.dims());
            rows[i + 1].ours.push(b as f64 / t.elapsed().as_secs_f64());
            if let Some(r) = &mut reference {
                rows[i + 1].theirs.push(
                    r.call(json!({"op": "encode", "batch": b}))?["images_per_s"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                );
            }
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }
    print_table(
        &format!(
            "DeepSeek-VL-7B vision tower + aligner, f32, CPU, {threads} threads (random weights)"
        ),
        &rows,
    );
    if let Some(r) = &reference {
        println!(
            "reference: torch {} ({} threads), transformers deepseek_vl_hybrid",
            r.hello["torch"], r.hello["threads"]
        );
    }
    Ok(())
}
