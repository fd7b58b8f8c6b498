//! `dsvl-bench vision`: preprocessing images/s on the bundled images, and encoder + aligner
//! images/s at the real DeepSeek-VL-7B dimensions (random weights, f32, CPU by default) at
//! several batch sizes, alternating rounds with the PyTorch reference. With `--device cuda:N
//! --dtype bf16 --json` it is the vision step of `scripts/gpu-check`: one JSON line per batch
//! size with images/s and the model FLOP utilisation (see `roofline.rs`), and the reference's
//! images/s on the same GPU when the host's PyTorch has it (`--reference-optional`).

use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsvl_core::{DeviceSpec, ImageLimits, WeightDType};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::preprocess::Preprocessor;
use dsvl_models::vision::VisionEncoder;
use serde_json::json;

use crate::dims::Dims;
use crate::reference::{ask, median, print_table, ratio, repo_root, Reference, Row};
use crate::roofline::{vision_flops_per_image, Peak};

/// Arguments of `dsvl-bench vision`.
#[derive(Args)]
pub struct VisionArgs {
    /// Batch sizes to time.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    batches: Vec<usize>,
    /// Alternating rounds per measurement (medians are reported).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per preprocessing round (0: no preprocessing measurement).
    #[arg(long, default_value_t = 2.0)]
    preprocess_seconds: f64,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
    /// Go on without the reference when it cannot start or fails (its figures are then absent).
    #[arg(long)]
    reference_optional: bool,
    /// Model dimensions (random weights): vl-7b or tiny.
    #[arg(long, value_enum, default_value = "vl-7b")]
    dims: Dims,
    /// Working dtype.
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// Device (cpu or cuda:N).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// One JSON object per batch size (images/s, FLOPs, MFU on CUDA) instead of a table.
    #[arg(long)]
    json: bool,
}

fn images() -> Vec<std::path::PathBuf> {
    let root = repo_root();
    vec![root.join("assets/images/rocket.jpg"), root.join("assets/images/chelsea.png")]
}

/// Builds the VL-7B vision tower with random weights.
pub fn vl7b_encoder(dtype: DType, device: &Device) -> Result<VisionEncoder> {
    Dims::Vl7b.vision_encoder(dtype, device)
}

/// Runs the benchmark and prints the table (or JSON lines).
pub fn run(args: VisionArgs, threads: usize) -> Result<()> {
    ensure!(args.rounds > 0 && !args.batches.is_empty(), "--rounds and --batches must be given");
    let dtype = candle_dtype(args.dtype);
    let with_reference = !args.no_reference;
    ensure!(
        !with_reference
            || (args.dims == Dims::Vl7b && (dtype == DType::F32 || args.device != DeviceSpec::Cpu)),
        "the PyTorch reference runs at vl-7b dimensions, in f32 on the CPU (any dtype on a GPU): \
         add --no-reference"
    );
    let optional = args.reference_optional;
    let mut reference = if with_reference {
        let mut a = vec![
            "--threads".to_string(),
            threads.to_string(),
            "--device".into(),
            args.device.to_string(),
            "--dtype".into(),
            args.dtype.to_string(),
            "--images".into(),
        ];
        a.extend(images().iter().map(|p| p.display().to_string()));
        Reference::start_optional("vision_reference.py", &a, optional)?
    } else {
        None
    };
    let device = open_device(args.device)?;
    let (tower, aligner) = args.dims.vision()?;
    let flops_per_image = vision_flops_per_image(&tower, &aligner);
    let peak = Peak::for_device(device.is_cuda(), dtype);
    let side = tower.image_size();
    let encoder = args.dims.vision_encoder(dtype, &device)?;
    let pre = Preprocessor::new(encoder.preprocess_config().clone(), ImageLimits::default());
    let pixels = |b: usize| Tensor::rand(0f32, 1.0, (b, 3, side, side), &device);
    encoder.forward(&pixels(1)?)?; // warm-up
    if device.is_cuda() {
        // Kernel selection and the allocator's pools, per shape, before anything is timed.
        for &b in &args.batches {
            encoder.forward(&pixels(b)?)?;
        }
    }
    device.synchronize()?;
    let preprocess = args.preprocess_seconds > 0.0;
    let files: Vec<Vec<u8>> = if preprocess {
        images().iter().map(std::fs::read).collect::<std::io::Result<_>>()?
    } else {
        vec![]
    };

    let mut rows = Vec::new();
    if preprocess {
        rows.push(Row { name: "preprocess images/s".into(), ours: vec![], theirs: vec![] });
    }
    let first_encode = rows.len();
    rows.extend(args.batches.iter().map(|b| Row {
        name: format!("encode batch {b} images/s"),
        ours: vec![],
        theirs: vec![],
    }));
    for round in 0..args.rounds {
        if preprocess {
            let (mut n, t0) = (0usize, Instant::now());
            while t0.elapsed().as_secs_f64() < args.preprocess_seconds {
                pre.preprocess_bytes(&files[n % files.len()])?;
                n += 1;
            }
            rows[0].ours.push(n as f64 / t0.elapsed().as_secs_f64());
            let cmd = json!({"op": "preprocess", "seconds": args.preprocess_seconds});
            if let Some(v) = ask(&mut reference, cmd, "images_per_s", optional)? {
                rows[0].theirs.push(v);
            }
        }
        for (i, &b) in args.batches.iter().enumerate() {
            let x = pixels(b)?;
            device.synchronize()?;
            let t = Instant::now();
            let out = encoder.forward(&x)?;
            device.synchronize()?;
            let secs = t.elapsed().as_secs_f64();
            ensure!(
                out.dim(0)? == b && out.dim(2)? == aligner.n_embed,
                "unexpected output {:?}",
                out.dims()
            );
            rows[first_encode + i].ours.push(b as f64 / secs);
            let cmd = json!({"op": "encode", "batch": b});
            if let Some(v) = ask(&mut reference, cmd, "images_per_s", optional)? {
                rows[first_encode + i].theirs.push(v);
            }
        }
        eprintln!("round {}/{} done", round + 1, args.rounds);
    }
    if args.json {
        for (row, &b) in rows[first_encode..].iter().zip(&args.batches) {
            let images_per_s = median(row.ours.clone());
            let flops_per_s = images_per_s * flops_per_image;
            println!(
                "{}",
                json!({"bench": "vision", "dims": args.dims.name(), "device": args.device.to_string(),
                       "dtype": args.dtype.to_string(), "batch": b, "rounds": args.rounds,
                       "images_per_s": images_per_s, "gflop_per_image": flops_per_image / 1e9,
                       "achieved_tflops": flops_per_s / 1e12, "mfu": Peak::mfu(peak, flops_per_s),
                       "reference_images_per_s": ratio(row).map(|_| median(row.theirs.clone())),
                       "ratio": ratio(row),
                       "reference": reference.as_ref().map(|r| r.hello.clone())})
            );
        }
        return Ok(());
    }
    print_table(
        &format!(
            "DeepSeek-VL {} vision tower + aligner, {}, {}, {threads} threads (random weights)",
            args.dims.name(),
            args.dtype,
            args.device
        ),
        &rows,
    );
    if let Some(r) = &reference {
        println!(
            "reference: torch {} ({} threads), transformers deepseek_vl_hybrid",
            r.hello["torch"], r.hello["threads"]
        );
    }
    println!("{}", crate::machine::describe());
    Ok(())
}
