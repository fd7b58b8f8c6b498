//! `dsvl-bench parity`: the bundled tiny model against the golden tensors of the reference
//! implementation (`tests/fixtures/golden`), on any device and dtype, from a binary alone: the
//! first step of `scripts/gpu-check`, which runs where there is no Rust toolchain to run the
//! test suite.
//!
//! In process (TP 1, the library calls of `crates/models/tests/vision_golden.rs` and
//! `crates/engine/tests/lm_golden.rs`): the vision tower + aligner on the golden preprocessed
//! pixels; then, for the golden text and image prompts, the input embeddings (image rows from
//! our encoder spliced in), the full-prompt logits, the 16 greedy ids and every step's logits.
//! With `--dsvl PATH` the same through the `dsvl encode` / `dsvl generate` binary (see
//! `parity_cli.rs`). One JSON line per check; exit status non-zero when a check fails.
//!
//! Tolerances. f32: the golden README's (atol/rtol 1e-4 for vision outputs and embeddings,
//! atol 1e-3 for logits, ids identical). bf16/f16 (8 or 11 significant bits instead of 24;
//! bounds measured on the CPU in bf16, the coarser of the two; `benches/README.md` has the
//! figures):
//! - vision outputs and input embeddings: atol 0.15 + rtol 5 %, the bf16 bound
//!   `crates/models/README.md` documents (outputs of std 0.49; measured max |diff| 0.096), and
//!   cosine ≥ 0.998 (the README's 0.999 is over the golden batch of two images, measured
//!   0.99945; one image alone, wide_png through `dsvl encode`, measures 0.99895);
//! - logits: atol 0.4 + rtol 5 %, cosine ≥ 0.999. Logits have std ≈ 1.0 (absmax 5.2). The
//!   image prompt's rows inherit the image embeddings' error, which the vision bound allows up
//!   to 0.3 std (0.15 / 0.49), i.e. ≈ 0.3 on logits, plus the decoder's own rounding (text
//!   prompt, no image rows: 0.054 measured). Measured: image prompt 0.27, text 0.054, step
//!   logits 0.059; cosine ≥ 0.99965 everywhere.
//!
//! Greedy ids in 16-bit dtypes are reported as agreement, not required:
//! on a random-weight model the top two logits are often closer than bf16's rounding, so an
//! early flip is legitimate and every later step then sees a different context; step logits
//! are compared only up to and including the first step whose ids differ.

use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsvl_core::{DeviceSpec, WeightDType};
use dsvl_engine::{generate, GenerationRequest, SamplingParams};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{
    splice_image_rows, DeepSeekLlm, ImageRows, PagedKvConfig, Shard, ShardRunner,
};
use dsvl_models::vision::VisionEncoder;
use dsvl_parallel::{LinkSet, SingleRank};
use serde_json::{json, Value};

use crate::parity_cli;

/// Arguments of `dsvl-bench parity`.
#[derive(Args)]
pub struct ParityArgs {
    /// The tiny checkpoint the golden tensors were made from.
    #[arg(long, default_value = "assets/tiny-dsvl")]
    pub model: PathBuf,
    /// The golden tensors (`vision.safetensors`, `lm.safetensors`, `preprocess.safetensors`).
    #[arg(long, default_value = "tests/fixtures/golden")]
    pub golden: PathBuf,
    /// Working dtype (f32, bf16 or f16).
    #[arg(long, default_value = "f32")]
    pub dtype: WeightDType,
    /// Device (cpu or cuda:N).
    #[arg(long, default_value = "cpu")]
    pub device: DeviceSpec,
    /// Also check the `dsvl` binary at this path (`encode`, `generate`) on the same device and
    /// dtype.
    #[arg(long)]
    pub dsvl: Option<PathBuf>,
}

/// `|actual - expected| <= atol + rtol * |expected|` everywhere, and a minimum cosine.
#[derive(Debug, Clone, Copy)]
pub struct Tol {
    atol: f64,
    rtol: f64,
    min_cosine: Option<f64>,
}

/// The tolerances of one dtype (see the module docs for where they come from).
#[derive(Debug, Clone, Copy)]
pub struct Tolerances {
    /// Vision tower + aligner outputs.
    pub vision: Tol,
    /// Input embeddings (token rows and spliced image rows).
    pub embeds: Tol,
    /// Prompt and step logits.
    pub logits: Tol,
    /// Whether greedy ids must equal the golden ones.
    pub exact_ids: bool,
}

impl Tolerances {
    /// The documented tolerances for `dtype`.
    pub fn for_dtype(dtype: DType) -> Self {
        if dtype == DType::F32 {
            let t = |atol, rtol| Tol { atol, rtol, min_cosine: None };
            Self {
                vision: t(1e-4, 1e-4),
                embeds: t(1e-4, 0.0),
                logits: t(1e-3, 0.0),
                exact_ids: true,
            }
        } else {
            let vision = Tol { atol: 0.15, rtol: 0.05, min_cosine: Some(0.998) };
            let logits = Tol { atol: 0.4, rtol: 0.05, min_cosine: Some(0.999) };
            Self { vision, embeds: vision, logits, exact_ids: false }
        }
    }
}

/// Collects checks, printing each as one JSON line.
pub struct Report {
    base: Value,
    failures: Vec<String>,
}

impl Report {
    fn new(args: &ParityArgs) -> Self {
        let base = json!({"dtype": args.dtype.to_string(), "device": args.device.to_string()});
        Self { base, failures: vec![] }
    }

    fn emit(&mut self, source: &str, check: &str, pass: bool, mut fields: Value) {
        let obj = fields.as_object_mut().expect("fields are an object");
        obj.insert("source".into(), json!(source));
        obj.insert("check".into(), json!(check));
        obj.insert("pass".into(), json!(pass));
        for (k, v) in self.base.as_object().expect("object") {
            obj.insert(k.clone(), v.clone());
        }
        println!("{fields}");
        if !pass {
            self.failures.push(format!("{source}: {check}"));
        }
    }

    /// Compares two tensors (any device and dtype) on the host in f64.
    pub fn tensor(
        &mut self,
        source: &str,
        check: &str,
        actual: &Tensor,
        expected: &Tensor,
        tol: Tol,
    ) -> Result<()> {
        if actual.dims() != expected.dims() {
            let shapes = json!({"shape": actual.dims(), "expected_shape": expected.dims()});
            self.emit(source, check, false, shapes);
            return Ok(());
        }
        let a: Vec<f64> =
            actual.to_device(&Device::Cpu)?.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
        let (mut max_abs, mut excess, mut finite) = (0f64, f64::NEG_INFINITY, true);
        let (mut dot, mut na, mut ne) = (0f64, 0f64, 0f64);
        for (x, y) in a.iter().zip(&e) {
            finite &= x.is_finite();
            let d = (x - y).abs();
            max_abs = max_abs.max(d);
            excess = excess.max(d - (tol.atol + tol.rtol * y.abs()));
            (dot, na, ne) = (dot + x * y, na + x * x, ne + y * y);
        }
        let cosine = dot / (na.sqrt() * ne.sqrt()).max(f64::MIN_POSITIVE);
        let pass = finite && excess <= 0.0 && tol.min_cosine.is_none_or(|c| cosine >= c);
        let fields = json!({"max_abs_diff": max_abs, "cosine": cosine, "atol": tol.atol,
                            "rtol": tol.rtol, "min_cosine": tol.min_cosine, "finite": finite});
        self.emit(source, check, pass, fields);
        Ok(())
    }

    /// Greedy ids: identical when `exact`, else the agreeing prefix is reported. Returns how
    /// many leading steps' logits are comparable (the agreeing prefix and the first
    /// differing step).
    pub fn ids(
        &mut self,
        source: &str,
        check: &str,
        actual: &[u32],
        golden: &[u32],
        exact: bool,
    ) -> usize {
        let agree = actual.iter().zip(golden).take_while(|(a, b)| a == b).count();
        let identical = actual == golden;
        let fields = json!({"identical": identical, "agree_prefix": agree, "of": golden.len(),
                            "required": exact, "ids": actual, "golden": golden});
        self.emit(source, check, identical || !exact, fields);
        (agree + 1).min(actual.len()).min(golden.len())
    }

    /// An exact check that is not a tensor (prompt ids through the tokenizer, a CLI run).
    pub fn flag(&mut self, source: &str, check: &str, pass: bool, detail: Value) {
        self.emit(source, check, pass, json!({ "detail": detail }));
    }
}

/// The golden tensors.
pub struct Golden {
    /// `preprocess.safetensors`.
    pub pre: HashMap<String, Tensor>,
    /// `vision.safetensors`.
    pub vision: HashMap<String, Tensor>,
    /// `lm.safetensors`.
    pub lm: HashMap<String, Tensor>,
    /// `chat.json`.
    pub chat: Value,
}

impl Golden {
    fn load(dir: &std::path::Path) -> Result<Self> {
        let st = |name: &str| {
            candle_core::safetensors::load(dir.join(name), &Device::Cpu)
                .with_context(|| format!("cannot read {}", dir.join(name).display()))
        };
        let chat = std::fs::read(dir.join("chat.json")).context("chat.json")?;
        Ok(Self {
            pre: st("preprocess.safetensors")?,
            vision: st("vision.safetensors")?,
            lm: st("lm.safetensors")?,
            chat: serde_json::from_slice(&chat)?,
        })
    }

    /// The reference's `pixel_values` of a golden image, `[1, 3, 1024, 1024]` f32.
    pub fn pixels(&self, name: &str) -> Result<Tensor> {
        let u8s =
            self.pre[&format!("{name}.pixel_values_u8")].flatten_all()?.to_dtype(DType::U32)?;
        Ok(self.pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?)
    }

    /// Golden ids of `key` (`text.input_ids`, `image.generated_ids`, ...).
    pub fn ids(&self, key: &str) -> Result<Vec<u32>> {
        let t = self.lm.get(key).with_context(|| format!("golden {key}"))?;
        Ok(t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
    }

    fn token(&self, key: &str) -> Result<u32> {
        Ok(self.chat[key].as_u64().with_context(|| format!("chat.json {key}"))? as u32)
    }
}

/// Runs every check; fails when one did.
pub fn run(args: ParityArgs) -> Result<()> {
    let golden = Golden::load(&args.golden)?;
    let mut report = Report::new(&args);
    let dtype = candle_dtype(args.dtype);
    let tol = Tolerances::for_dtype(dtype);
    let device = open_device(args.device)?;
    let ckpt = Checkpoint::open(&ModelSource::Dir(args.model.clone()))?;

    // Vision: photo_jpeg and wide_png as one batch of two, as the golden file holds them.
    let pixels = Tensor::cat(&[golden.pixels("photo_jpeg")?, golden.pixels("wide_png")?], 0)?;
    let encoder = VisionEncoder::load(&ckpt, dtype, &device, None)?;
    let emb = encoder.forward(&pixels.to_device(&device)?)?;
    report.tensor(
        "library",
        "vision aligner_out",
        &emb,
        &golden.vision["aligner_out"],
        tol.vision,
    )?;
    let image_rows = emb.get(0)?;

    // Decoder: both golden prompts through one runner.
    let model = DeepSeekLlm::load(&ckpt, dtype, &device, Shard::SINGLE, None)?;
    let image_token = golden.token("image_token_id")?;
    let cases = [("text", None), ("image", Some(image_rows.to_dtype(model.dtype())?))];
    for (prefix, rows) in &cases {
        let ids = golden.ids(&format!("{prefix}.input_ids"))?;
        let mut embeds = model.embed(&ids, &SingleRank)?;
        if let Some(rows) = rows {
            embeds = splice_image_rows(&embeds, &ids, image_token, rows)?;
        }
        let expected = &golden.lm[&format!("{prefix}.inputs_embeds")];
        report.tensor(
            "library",
            &format!("{prefix} inputs_embeds"),
            &embeds.unsqueeze(0)?,
            expected,
            tol.embeds,
        )?;
    }
    let pool = model.kv_pool(PagedKvConfig::for_tokens(2048, PagedKvConfig::DEFAULT_BLOCK_SIZE))?;
    let mut runner = ShardRunner::new(
        model,
        pool,
        std::sync::Arc::new(LinkSet::Single),
        std::time::Duration::from_secs(60),
    );
    for (prefix, rows) in cases {
        let ids = golden.ids(&format!("{prefix}.input_ids"))?;
        let image = rows.map(|r| ImageRows::for_image_tokens(&ids, image_token, r)).transpose()?;
        let req = GenerationRequest {
            prompt: ids,
            image,
            params: SamplingParams::greedy(),
            max_new_tokens: 16,
            stop_ids: vec![golden.token("eos_token_id")?],
            keep_logits: true,
            max_batched_tokens: None,
        };
        let out = generate(&mut runner, &req, &mut |_| true)?;
        let prompt = out.prompt_logits.context("prompt logits")?;
        check_generation(
            &mut report,
            "library",
            prefix,
            &golden,
            &tol,
            &prompt,
            &out.tokens,
            &out.step_logits,
        )?;
    }
    crate::parity_batch::batched_vs_alone(&mut report, runner.model(), tol.logits)?;
    crate::parity_batch::fused_vs_chains(&mut report, runner.model(), dtype, &device, tol.logits)?;

    if let Some(dsvl) = &args.dsvl {
        parity_cli::run(&args, dsvl, &golden, &tol, &mut report)?;
    }
    let summary = json!({"summary": "parity", "dtype": args.dtype.to_string(),
        "device": args.device.to_string(), "passed": report.failures.is_empty(),
        "failed": report.failures});
    println!("{summary}");
    if !report.failures.is_empty() {
        bail!("{} parity check(s) failed", report.failures.len());
    }
    Ok(())
}

/// Prompt logits, greedy ids and step logits of one golden prompt (`prefix` text or image).
#[allow(clippy::too_many_arguments)]
pub fn check_generation(
    report: &mut Report,
    source: &str,
    prefix: &str,
    golden: &Golden,
    tol: &Tolerances,
    prompt_logits: &Tensor,
    tokens: &[u32],
    step_logits: &[Vec<f32>],
) -> Result<()> {
    let expected = &golden.lm[&format!("{prefix}.logits")];
    report.tensor(
        source,
        &format!("{prefix} prompt logits"),
        &prompt_logits.unsqueeze(0)?,
        expected,
        tol.logits,
    )?;
    let want = golden.ids(&format!("{prefix}.generated_ids"))?;
    let comparable =
        report.ids(source, &format!("{prefix} greedy ids"), tokens, &want, tol.exact_ids);
    let n = comparable.min(step_logits.len());
    if n == 0 {
        report.flag(source, &format!("{prefix} step logits"), false, json!("no step logits"));
        return Ok(());
    }
    let steps = Tensor::new(step_logits[..n].to_vec(), &Device::Cpu)?;
    let expected = golden.lm[&format!("{prefix}.generated_step_logits")].narrow(0, 0, n)?;
    let what = format!("{prefix} step logits (first {n} steps)");
    report.tensor(source, &what, &steps, &expected, tol.logits)
}
