//! `dsvl encode` end to end: the file it writes equals the library's output and the golden
//! reference; bad inputs exit non-zero with a message naming the problem.

use std::process::Command;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::vision::VisionEncoder;
use dsvl_testkit::{assert_close, golden_dir, repo_root, tiny_model_dir};

fn dsvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsvl"))
}

/// Bundled model (no --model): writes pixel_values and embeddings in argument order, says on
/// stderr that the bundled model is used, and the embeddings match the golden aligner output.
#[test]
fn encode_writes_golden_embeddings_with_bundled_model() -> Result<()> {
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().join("emb.safetensors");
    let images =
        [golden_dir().join("rocket.jpg"), golden_dir().join("astronaut_wide_1600x300.png")];
    let output = dsvl().arg("encode").arg("--out").arg(&out).args(&images).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "stderr: {stderr}");
    assert!(stderr.contains("bundled tiny-dsvl"), "stderr: {stderr}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("[2, 576, 128]"), "{stdout}");

    let written = candle_core::safetensors::load(&out, &Device::Cpu)?;
    assert_eq!(written["pixel_values"].dims(), &[2, 3, 1024, 1024]);
    assert_eq!(written["pixel_values"].dtype(), DType::F32);
    let golden =
        candle_core::safetensors::load(golden_dir().join("vision.safetensors"), &Device::Cpu)?;
    // Both images are bit-exact in pixels (the PNG, and the JPEG through libjpeg-turbo's
    // decoder), so both embeddings track the golden ones at the golden tolerance.
    for (name, i) in [("jpeg embedding", 0), ("png embedding", 1)] {
        assert_close(
            name,
            &written["embeddings"].get(i)?,
            &golden["aligner_out"].get(i)?,
            1e-4,
            1e-4,
        )?;
    }

    // Same numbers as the library on the same pixels.
    let ckpt = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let enc = VisionEncoder::load(&ckpt, DType::F32, &Device::Cpu, None)?;
    let lib = enc.forward(&written["pixel_values"])?;
    assert_close("cli vs library", &written["embeddings"], &lib, 0.0, 0.0)?;
    Ok(())
}

fn expect_failure(args: &[&str], needle: &str) -> Result<()> {
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().join("x.safetensors");
    let output = dsvl().arg("encode").arg("--out").arg(&out).args(args).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{args:?} should fail");
    assert!(stderr.contains(needle), "{args:?}: stderr lacks `{needle}`: {stderr}");
    assert!(!out.exists(), "no output file on failure");
    Ok(())
}

#[test]
fn bad_inputs_exit_non_zero_with_a_message() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let empty = dir.path().join("empty.png");
    std::fs::write(&empty, b"")?;
    let text = dir.path().join("notes.jpg");
    std::fs::write(&text, b"this is not an image at all")?;
    let good = repo_root().join("assets/images/chelsea.png");
    let good = good.to_str().expect("utf-8 path");
    expect_failure(&[good, empty.to_str().unwrap()], "empty image")?;
    expect_failure(&[text.to_str().unwrap()], "unrecognised image format")?;
    expect_failure(&["/nonexistent/cat.png"], "cannot read image")?;
    expect_failure(&["--model", "/nonexistent/model", good], "/nonexistent/model")?;
    expect_failure(&["--device", "cuda:0", good], "cuda:0")?;
    expect_failure(&["--dtype", "f8", good], "f8")?;
    Ok(())
}

/// A different dtype goes through the same path (bf16 on CPU).
#[test]
fn encode_bf16() -> Result<()> {
    let out_dir = tempfile::tempdir()?;
    let out = out_dir.path().join("bf16.safetensors");
    let img = golden_dir().join("chelsea.png");
    let status =
        dsvl().args(["encode", "--dtype", "bf16", "--out"]).arg(&out).arg(&img).status()?;
    assert!(status.success());
    let t: Tensor = candle_core::safetensors::load(&out, &Device::Cpu)?
        .remove("embeddings")
        .expect("embeddings");
    assert_eq!(t.dims(), &[1, 576, 128]);
    assert_eq!(t.dtype(), DType::F32, "written as F32 whatever the working dtype");
    Ok(())
}

/// A folder stands for its images in name order (other files skipped); off a terminal the
/// progress is log lines on stderr; an empty folder is an error naming it.
#[test]
fn encode_a_folder_with_progress() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let folder = dir.path().join("photos");
    std::fs::create_dir(&folder)?;
    std::fs::copy(golden_dir().join("rocket.jpg"), folder.join("b_rocket.JPG"))?;
    std::fs::copy(golden_dir().join("astronaut_wide_1600x300.png"), folder.join("a_wide.png"))?;
    std::fs::write(folder.join("notes.txt"), "not an image")?;
    let out = dir.path().join("emb.safetensors");
    let output =
        dsvl().args(["encode", "--batch-size", "1", "--out"]).arg(&out).arg(&folder).output()?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "stderr: {stderr}");
    assert!(stdout.contains("images      2"), "{stdout}");
    let a = stdout.find("a_wide.png").expect("listed");
    let b = stdout.find("b_rocket.JPG").expect("listed");
    assert!(a < b, "name order: {stdout}");
    assert!(!stdout.contains("notes.txt"));
    for line in ["preprocessing: starting, 2 images", "encoding: starting, 2 images"] {
        assert!(stderr.contains(line), "`{line}` in {stderr}");
    }
    assert!(stderr.contains("encoding: done, 2 images in"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "no colour codes off a terminal: {stderr}");

    let written = candle_core::safetensors::load(&out, &Device::Cpu)?;
    assert_eq!(written["embeddings"].dims()[0], 2);

    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty)?;
    expect_failure(&[empty.to_str().unwrap()], "holds no images")?;
    Ok(())
}
