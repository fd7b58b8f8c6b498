//! The `dsvl` binary's half of `dsvl-bench parity --dsvl PATH`: `dsvl encode` and `dsvl
//! generate` run as a user runs them (same device and dtype as the in-process checks), and
//! their output files are compared with the golden tensors at the same tolerances. This covers
//! what the in-process checks take from the golden files instead: image decoding and
//! preprocessing, the tokenizer and the chat template.
//!
//! The inputs are the golden ones as a user sends them, and their preprocessing is bit-exact
//! with the reference, so the tight f32 bounds apply: `astronaut_wide_1600x300.png` (golden
//! `wide_png`) for `encode`, `rocket.jpg` (decoded by libjpeg-turbo's decoder, as Pillow does)
//! for the image prompt.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{ensure, Context, Result};
use candle_core::Device;
use serde_json::{json, Value};

use crate::parity::{check_generation, Golden, ParityArgs, Report, Tolerances};

const SOURCE: &str = "cli";

fn dsvl_command(dsvl: &Path, args: &ParityArgs, sub: &str) -> Command {
    let mut c = Command::new(dsvl);
    c.arg(sub).arg("--model").arg(&args.model).args([
        "--dtype",
        &args.dtype.to_string(),
        "--device",
        &args.device.to_string(),
    ]);
    c
}

/// Runs `c`; on failure records the check as failed and returns `None`.
fn run_checked(report: &mut Report, check: &str, c: &mut Command) -> Result<Option<String>> {
    let out = c.output().with_context(|| format!("cannot start {:?}", c.get_program()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: String = stderr.lines().rev().take(5).collect::<Vec<_>>().join(" | ");
        report.flag(SOURCE, check, false, json!(format!("{}: {tail}", out.status)));
        return Ok(None);
    }
    Ok(Some(String::from_utf8(out.stdout)?))
}

/// The `dsvl encode` and `dsvl generate` checks.
pub fn run(
    args: &ParityArgs,
    dsvl: &Path,
    golden: &Golden,
    tol: &Tolerances,
    report: &mut Report,
) -> Result<()> {
    let dir = TempDir::new()?;

    let emb_path = dir.path().join("emb.safetensors");
    let mut c = dsvl_command(dsvl, args, "encode");
    c.arg("--out").arg(&emb_path).arg(args.golden.join("astronaut_wide_1600x300.png"));
    if run_checked(report, "encode", &mut c)?.is_some() {
        let written = candle_core::safetensors::load(&emb_path, &Device::Cpu)?;
        let emb = written.get("embeddings").context("encode wrote no `embeddings`")?;
        let expected = golden.vision["aligner_out"].narrow(0, 1, 1)?;
        report.tensor(SOURCE, "encode wide_png embeddings", emb, &expected, tol.vision)?;
    }

    std::fs::copy(args.golden.join("rocket.jpg"), dir.path().join("rocket.jpg"))
        .context("rocket.jpg in the golden folder")?;
    for (prefix, case) in [("text", "text_only"), ("image", "one_image")] {
        let chat = write_chat(dir.path(), golden, case)?;
        let logits_path = dir.path().join(format!("{prefix}-logits.safetensors"));
        let mut c = dsvl_command(dsvl, args, "generate");
        c.args(["--json", "--max-new-tokens", "16", "--chat"]).arg(&chat);
        c.arg("--logits-out").arg(&logits_path);
        let Some(stdout) = run_checked(report, &format!("{prefix} generate"), &mut c)? else {
            continue;
        };
        let obj: Value = serde_json::from_str(stdout.trim())
            .with_context(|| format!("dsvl generate printed no JSON: {stdout}"))?;
        let ids = |key: &str| -> Result<Vec<u32>> {
            serde_json::from_value(obj[key].clone()).with_context(|| key.to_string())
        };
        let prompt = ids("prompt_token_ids")?;
        let want = golden.ids(&format!("{prefix}.input_ids"))?;
        let same = prompt == want;
        report.flag(SOURCE, &format!("{prefix} prompt ids"), same, json!({"tokens": prompt.len()}));
        let mut logits = candle_core::safetensors::load(&logits_path, &Device::Cpu)?;
        let prompt_logits = logits.remove("prompt_logits").context("prompt_logits")?;
        let steps = logits.remove("step_logits").context("step_logits")?;
        let steps: Vec<Vec<f32>> = steps.to_vec2()?;
        let tokens = ids("generated_token_ids")?;
        check_generation(report, SOURCE, prefix, golden, tol, &prompt_logits, &tokens, &steps)?;
    }
    Ok(())
}

/// A scratch folder removed on drop (the benchmark binary carries no tempfile dependency).
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Result<Self> {
        let path = std::env::temp_dir().join(format!("dsvl-parity-{}", std::process::id()));
        std::fs::create_dir_all(&path)?;
        Ok(Self(path))
    }

    fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The golden case's conversation as CHAT.json in `dir`; its image is `rocket.jpg` there.
fn write_chat(dir: &Path, golden: &Golden, case: &str) -> Result<PathBuf> {
    let cases = golden.chat["cases"].as_array().context("chat.json cases")?;
    let case_obj =
        cases.iter().find(|c| c["name"] == case).with_context(|| format!("case {case}"))?;
    let mut conv = case_obj["conversation"].clone();
    for m in conv.as_array_mut().context("conversation")? {
        if let Some(images) = m.get_mut("images").and_then(|i| i.as_array_mut()) {
            ensure!(images.len() == 1, "case {case}: one image expected");
            images[0] = json!("rocket.jpg");
        }
    }
    let path = dir.join(format!("{case}.json"));
    std::fs::write(&path, serde_json::to_vec(&conv)?)?;
    Ok(path)
}
