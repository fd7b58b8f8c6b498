//! `dsvl generate` end to end: the golden greedy ids through the CLI (text and image, TP 1, 2
//! and 4 with ranks as processes), the `--logits-out` logits against `golden/lm.safetensors`
//! (atol 1e-3, the golden README's f32 tolerance) and across TP degrees, a plain
//! `LlamaForCausalLM` sharded checkpoint, and bad input failing fast with a message and no
//! leftover processes.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use dsvl_testkit::{
    assert_close, child_pids, golden_dir, pid_alive, png_rgb8, repo_root, temp_llama_checkpoint,
    LlamaLayout,
};
use serde_json::Value;

fn dsvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsvl"))
}

fn golden_case(name: &str) -> Result<Value> {
    let chat: Value = serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    chat["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).cloned().context("case")
}

/// Writes the case's conversation as CHAT.json next to a copy-free image reference.
fn write_chat(dir: &Path, conversation: &Value) -> Result<PathBuf> {
    let mut conv = conversation.clone();
    for m in conv.as_array_mut().unwrap() {
        if let Some(images) = m.get_mut("images").and_then(|i| i.as_array_mut()) {
            for img in images {
                *img =
                    Value::String(golden_dir().join(img.as_str().unwrap()).display().to_string());
            }
        }
    }
    let path = dir.join("chat.json");
    std::fs::write(&path, serde_json::to_vec(&conv)?)?;
    Ok(path)
}

fn golden_generated(prefix: &str) -> Result<Vec<u64>> {
    let lm = candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?;
    Ok(lm[&format!("{prefix}.generated_ids")]
        .flatten_all()?
        .to_vec1::<i64>()?
        .into_iter()
        .map(|v| v as u64)
        .collect())
}

/// Logits tolerance of the golden README for a float32 port, also used between TP degrees.
const LOGITS_ATOL: f64 = 1e-3;

fn golden_lm() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?)
}

/// `--logits-out` file: `prompt_logits` [T, vocab] and `step_logits` [steps, vocab].
fn read_logits(path: &Path) -> Result<(Tensor, Tensor)> {
    let mut t = candle_core::safetensors::load(path, &Device::Cpu)?;
    Ok((
        t.remove("prompt_logits").context("prompt logits")?,
        t.remove("step_logits").context("step logits")?,
    ))
}

/// CLI logits against golden `prefix.logits` ([1, T, vocab]) and `prefix.generated_step_logits`.
fn check_golden_logits(prefix: &str, prompt: &Tensor, steps: &Tensor) -> Result<()> {
    let lm = golden_lm()?;
    let d = assert_close(
        &format!("{prefix} prompt logits vs golden"),
        &prompt.unsqueeze(0)?,
        &lm[&format!("{prefix}.logits")],
        LOGITS_ATOL,
        0.0,
    )?;
    println!("{prefix}: prompt logits max |diff| vs golden {:.2e}", d.max_abs);
    let d = assert_close(
        &format!("{prefix} step logits vs golden"),
        steps,
        &lm[&format!("{prefix}.generated_step_logits")],
        LOGITS_ATOL,
        0.0,
    )?;
    println!("{prefix}: step logits max |diff| vs golden {:.2e}", d.max_abs);
    Ok(())
}

/// Logits of TP `tp` against those of TP 1.
fn check_tp_logits(
    tp: usize,
    (prompt, steps): &(Tensor, Tensor),
    (p1, s1): &(Tensor, Tensor),
) -> Result<()> {
    let d = assert_close(&format!("tp {tp} vs tp 1 prompt logits"), prompt, p1, LOGITS_ATOL, 0.0)?;
    let e = assert_close(&format!("tp {tp} vs tp 1 step logits"), steps, s1, LOGITS_ATOL, 0.0)?;
    println!(
        "tp {tp}: max |diff| vs tp 1: prompt logits {:.2e}, step logits {:.2e}",
        d.max_abs, e.max_abs
    );
    Ok(())
}

fn run_json(chat: &Path, tp: usize, logits: Option<&Path>) -> Result<(Value, Output)> {
    run_json_with(&repo_root().join("assets/tiny-dsvl"), chat, tp, logits)
}

/// The TP / chunking runs of a golden case: TP 1, 2 and 4 with the whole prompt in one step,
/// then TP 2 with the prompt prefilled in 37-token chunks (chunk edges inside KV blocks and
/// inside the image's rows).
const RUNS: [(usize, Option<usize>); 4] = [(1, None), (2, None), (4, None), (2, Some(37))];

fn run_json_chunked(
    chat: &Path,
    tp: usize,
    chunk: Option<usize>,
    logits: &Path,
) -> Result<(Value, Output)> {
    match chunk {
        None => run_json(chat, tp, Some(logits)),
        Some(n) => {
            let model = repo_root().join("assets/tiny-dsvl");
            run_json_args(&model, chat, tp, Some(logits), &["--max-batched-tokens", &n.to_string()])
        }
    }
}

fn run_json_with(
    model: &Path,
    chat: &Path,
    tp: usize,
    logits: Option<&Path>,
) -> Result<(Value, Output)> {
    run_json_args(model, chat, tp, logits, &[])
}

fn run_json_args(
    model: &Path,
    chat: &Path,
    tp: usize,
    logits: Option<&Path>,
    extra: &[&str],
) -> Result<(Value, Output)> {
    let mut c = dsvl();
    c.args(["generate", "--json", "--max-new-tokens", "16", "--tp", &tp.to_string(), "--chat"])
        .arg(chat)
        .args(extra);
    c.arg("--model").arg(model);
    if let Some(l) = logits {
        c.arg("--logits-out").arg(l);
    }
    let out = c.output()?;
    anyhow::ensure!(
        out.status.success(),
        "tp {tp} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let line = String::from_utf8(out.stdout.clone())?;
    Ok((serde_json::from_str(line.trim())?, out))
}

/// Text prompt: golden ids at TP 1, 2 and 4 (4 ranks > 2 KV heads: KV heads replicated) and
/// at TP 2 with chunked prefill; TP 1 logits (full sequence and every step) within 1e-3 of
/// golden, the other runs within 1e-3 of TP 1.
#[test]
fn text_prompt_golden_ids_at_tp_1_2_4() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let case = golden_case("text_only")?;
    let chat = write_chat(dir.path(), &case["conversation"])?;
    let golden = golden_generated("text")?;
    let prompt: Vec<u64> = serde_json::from_value(case["input_ids"].clone())?;
    let mut reference: Option<(Tensor, Tensor)> = None;
    for (tp, chunk) in RUNS {
        let logits_path = dir.path().join(format!("logits-{tp}-{chunk:?}.safetensors"));
        let (obj, _) = run_json_chunked(&chat, tp, chunk, &logits_path)?;
        let ids: Vec<u64> = serde_json::from_value(obj["generated_token_ids"].clone())?;
        assert_eq!(ids, golden, "tp {tp} chunks {chunk:?}: greedy ids");
        let p: Vec<u64> = serde_json::from_value(obj["prompt_token_ids"].clone())?;
        assert_eq!(p, prompt, "tp {tp}: prompt ids");
        let logits = read_logits(&logits_path)?;
        match &reference {
            None => {
                check_golden_logits("text", &logits.0, &logits.1)?;
                reference = Some(logits);
            }
            Some(r) => check_tp_logits(tp, &logits, r)?,
        }
    }
    Ok(())
}

/// Image prompt with rocket.jpg as the user sends it (decoded by libjpeg-turbo's decoder, as the
/// reference's Pillow does): golden ids at TP 1, 2 and 4 and at TP 2 with chunked prefill; TP 1
/// prompt logits (every row, the 576 image rows [54, 630) included) and step logits within 1e-3
/// of golden; TP 2 and 4 logits (all rows) within 1e-3 of TP 1.
#[test]
fn image_prompt_golden_ids() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chat = write_chat(dir.path(), &golden_case("one_image")?["conversation"])?;
    let golden = golden_generated("image")?;
    let lm = golden_lm()?;
    let mut reference: Option<(Tensor, Tensor)> = None;
    for (tp, chunk) in RUNS {
        let logits_path = dir.path().join(format!("logits-{tp}-{chunk:?}.safetensors"));
        let (obj, _) = run_json_chunked(&chat, tp, chunk, &logits_path)?;
        let ids: Vec<u64> = serde_json::from_value(obj["generated_token_ids"].clone())?;
        assert_eq!(ids, golden, "tp {tp} chunks {chunk:?}");
        assert_eq!(obj["prompt_token_ids"].as_array().unwrap().len(), 643);
        let logits = read_logits(&logits_path)?;
        match &reference {
            None => {
                let (prompt, steps) = &logits;
                let expected = lm["image.logits"].squeeze(0)?;
                let d = assert_close(
                    "image prompt logits vs golden",
                    prompt,
                    &expected,
                    LOGITS_ATOL,
                    0.0,
                )?;
                println!("image (jpeg): prompt logits max |diff| vs golden {:.2e}", d.max_abs);
                let d = assert_close(
                    "image step logits vs golden",
                    steps,
                    &lm["image.generated_step_logits"],
                    LOGITS_ATOL,
                    0.0,
                )?;
                println!("image (jpeg): step logits max |diff| vs golden {:.2e}", d.max_abs);
                reference = Some(logits);
            }
            Some(r) => check_tp_logits(tp, &logits, r)?,
        }
    }
    Ok(())
}

/// Image prompt with the reference's own decode of rocket.jpg (`photo_jpeg.decoded_rgb`, as a
/// lossless PNG): through the CLI (our resize, vision tower, splice and decoder) every logit of
/// the sequence and of every step within 1e-3 of golden, and the golden ids.
#[test]
fn image_prompt_logits_match_reference() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let rgb = &pre["photo_jpeg.decoded_rgb"];
    let (h, w, _) = rgb.dims3()?;
    std::fs::write(
        dir.path().join("rocket_reference_decode.png"),
        png_rgb8(w as u32, h as u32, &rgb.flatten_all()?.to_vec1::<u8>()?),
    )?;
    let case = golden_case("one_image")?;
    let mut conv = case["conversation"].clone();
    for m in conv.as_array_mut().unwrap() {
        if let Some(images) = m.get_mut("images").and_then(|i| i.as_array_mut()) {
            assert_eq!(images.len(), 1);
            images[0] = Value::String("rocket_reference_decode.png".into());
        }
    }
    let chat = dir.path().join("chat.json");
    std::fs::write(&chat, serde_json::to_vec(&conv)?)?;
    let logits_path = dir.path().join("logits.safetensors");
    let (obj, _) = run_json(&chat, 1, Some(&logits_path))?;
    let prompt: Vec<u64> = serde_json::from_value(case["input_ids"].clone())?;
    assert_eq!(
        serde_json::from_value::<Vec<u64>>(obj["prompt_token_ids"].clone())?,
        prompt,
        "prompt ids"
    );
    assert_eq!(
        serde_json::from_value::<Vec<u64>>(obj["generated_token_ids"].clone())?,
        golden_generated("image")?,
        "greedy ids"
    );
    let (p, steps) = read_logits(&logits_path)?;
    check_golden_logits("image", &p, &steps)
}

/// A plain `LlamaForCausalLM` checkpoint (deepseek-llm layout: no `language_model.` prefix, two
/// safetensors shards and an index, Llama `config.json` relying on LlamaConfig defaults) made
/// from the tiny model's decoder: the text prompt through the CLI gives the golden ids and
/// logits at TP 1, and the same at TP 4 (every rank loads its slices from the shards); an
/// image conversation is refused (no vision tower).
#[test]
fn llama_layout_checkpoint_through_cli() -> Result<()> {
    let (model, _) = temp_llama_checkpoint(LlamaLayout { shards: 2, rely_on_defaults: true })?;
    let dir = tempfile::tempdir()?;
    let chat = write_chat(dir.path(), &golden_case("text_only")?["conversation"])?;
    let golden = golden_generated("text")?;
    let mut reference: Option<(Tensor, Tensor)> = None;
    for tp in [1, 4] {
        let logits_path = dir.path().join(format!("logits-{tp}.safetensors"));
        let (obj, _) = run_json_with(model.path(), &chat, tp, Some(&logits_path))?;
        let ids: Vec<u64> = serde_json::from_value(obj["generated_token_ids"].clone())?;
        assert_eq!(ids, golden, "tp {tp}: greedy ids");
        let logits = read_logits(&logits_path)?;
        match &reference {
            None => {
                check_golden_logits("text", &logits.0, &logits.1)?;
                reference = Some(logits);
            }
            Some(r) => check_tp_logits(tp, &logits, r)?,
        }
    }
    // A text-only checkpoint refuses a conversation with images, saying why.
    let image_chat = write_chat(dir.path(), &golden_case("one_image")?["conversation"])?;
    let out = dsvl()
        .arg("generate")
        .arg("--model")
        .arg(model.path())
        .arg("--chat")
        .arg(&image_chat)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && stderr.contains("no vision_config"), "{stderr}");
    Ok(())
}

/// The bundled model streams text without --json and reports timing on stderr.
#[test]
fn streams_text_with_bundled_model() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chat = write_chat(dir.path(), &golden_case("text_only")?["conversation"])?;
    let out = dsvl().args(["generate", "--max-new-tokens", "8", "--chat"]).arg(&chat).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("bundled tiny-dsvl") && stderr.contains("new tokens"), "{stderr}");
    assert!(!String::from_utf8_lossy(&out.stdout).trim().is_empty());
    Ok(())
}

fn expect_failure(args: &[&str], chat: &Path, needle: &str) -> Result<()> {
    let t = Instant::now();
    let out = dsvl().arg("generate").arg("--chat").arg(chat).args(args).output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: stderr lacks `{needle}`: {stderr}");
    assert!(t.elapsed() < Duration::from_secs(60), "failure took {:?}", t.elapsed());
    Ok(())
}

#[test]
fn bad_inputs_fail_fast_with_a_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let write = |name: &str, v: Value| -> Result<PathBuf> {
        let p = dir.path().join(name);
        std::fs::write(&p, serde_json::to_vec(&v)?)?;
        Ok(p)
    };
    let mismatch = write(
        "mismatch.json",
        serde_json::json!([{"role": "User", "content": "<image_placeholder> hi"}, {"role": "Assistant", "content": ""}]),
    )?;
    expect_failure(
        &["--tp", "2"],
        &mismatch,
        "1 `<image_placeholder>` placeholder(s) but 0 image(s)",
    )?;
    std::fs::write(dir.path().join("broken.png"), b"\x89PNG\r\n\x1a\nnot really")?;
    let broken = write(
        "broken.json",
        serde_json::json!([{"role": "User", "content": "<image_placeholder>x", "images": ["broken.png"]}, {"role": "Assistant", "content": ""}]),
    )?;
    expect_failure(&["--tp", "2"], &broken, "broken.png")?;
    let long_text = "word ".repeat(20_000);
    let long = write(
        "long.json",
        serde_json::json!([{"role": "User", "content": long_text}, {"role": "Assistant", "content": ""}]),
    )?;
    expect_failure(&[], &long, "the model takes at most 16384 positions")?;
    let no_tok = dir.path().join("no-tokenizer");
    std::fs::create_dir(&no_tok)?;
    for f in ["config.json", "model.safetensors", "preprocessor_config.json"] {
        std::fs::copy(repo_root().join("assets/tiny-dsvl").join(f), no_tok.join(f))?;
    }
    let ok = write(
        "ok.json",
        serde_json::json!([{"role": "User", "content": "hi"}, {"role": "Assistant", "content": ""}]),
    )?;
    expect_failure(&["--model", no_tok.to_str().unwrap()], &ok, "has no tokenizer.json")?;
    expect_failure(&["--tp", "3"], &ok, "tensor parallelism 3")?;
    expect_failure(&["--temperature", "0.5", "--top-p", "0"], &ok, "top_p")?;
    Ok(())
}

/// Starts a practically endless greedy generation at TP 4 and returns the leader and its three
/// worker ranks once they exist and it is generating.
fn long_tp4_generation(chat: &Path, stderr: Stdio) -> Result<(std::process::Child, Vec<u32>)> {
    let leader = dsvl()
        .args(["generate", "--json", "--tp", "4", "--max-new-tokens", "100000", "--chat"])
        .arg(chat)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let workers = loop {
        let w = child_pids(leader.id());
        if w.len() == 3 {
            break w;
        }
        anyhow::ensure!(Instant::now() < deadline, "workers never started");
        std::thread::sleep(Duration::from_millis(50));
    };
    std::thread::sleep(Duration::from_millis(1500)); // generating by now
    Ok((leader, workers))
}

/// Killing the leader (SIGKILL: no cleanup code runs) takes its worker ranks down with it.
#[test]
fn killed_leader_leaves_no_worker_behind() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chat = write_chat(dir.path(), &golden_case("text_only")?["conversation"])?;
    let (mut leader, workers) = long_tp4_generation(&chat, Stdio::null())?;
    leader.kill()?;
    leader.wait()?;
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&w| pid_alive(w)) {
        anyhow::ensure!(Instant::now() < deadline, "workers {workers:?} outlived the leader");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Killing a worker rank mid-generation fails the leader quickly (its next collective sees the
/// disconnect) with a message naming the rank, and the remaining workers go away too.
#[test]
fn killed_worker_fails_the_group_fast() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let chat = write_chat(dir.path(), &golden_case("text_only")?["conversation"])?;
    let (mut leader, workers) = long_tp4_generation(&chat, Stdio::piped())?;
    let t = Instant::now();
    Command::new("kill").args(["-9", &workers[1].to_string()]).status()?;
    let status = loop {
        if let Some(s) = leader.try_wait()? {
            break s;
        }
        anyhow::ensure!(
            t.elapsed() < Duration::from_secs(5),
            "leader still running 5 s after a rank died"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(!status.success());
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut leader.stderr.take().context("stderr")?, &mut stderr)?;
    assert!(stderr.contains("rank 2") && stderr.contains("disconnected"), "{stderr}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while workers.iter().any(|&w| pid_alive(w)) {
        anyhow::ensure!(Instant::now() < deadline, "workers {workers:?} left behind");
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}
