//! `scripts/gpu-check` end to end on the CPU, against this build's binaries (`dsvl-bench` and
//! `dsvl` in target/<profile>/, which `scripts/test` builds first): with `--device cpu --small`
//! every step runs (parity in f32 and bf16, in process and through the `dsvl` CLI; vision and
//! decoder benchmarks at tiny dimensions) and `summary.json` says so, with positive figures.
//! The GPU run is the same script with `--device cuda:0` and without `--small`. A device the
//! binaries cannot use fails every step, says why, and exits 1, also when the benchmark binary
//! comes compressed (`dsvl-bench.zst` / `.xz`, how a GPU host receives it within the 64 MiB
//! carry limit).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Instant;

use anyhow::{ensure, Context, Result};
use dsvl_testkit::repo_root;
use serde_json::Value;

/// A scratch folder removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!("dsvl-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        Ok(Self(dir))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn bench_dir() -> PathBuf {
    Path::new(env!("CARGO_BIN_EXE_dsvl-bench")).parent().expect("binary folder").to_path_buf()
}

fn gpu_check(args: &[&str], bin: &Path, out: &Path) -> Result<Output> {
    let t = Instant::now();
    let output = Command::new(repo_root().join("scripts/gpu-check"))
        .args(args)
        .arg("--bin")
        .arg(bin)
        .arg("--out")
        .arg(out)
        .output()?;
    println!("gpu-check {args:?}: {:.1} s, {}", t.elapsed().as_secs_f64(), output.status);
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    Ok(output)
}

fn positive(row: &Value, key: &str) -> Result<()> {
    let v = row[key].as_f64().with_context(|| format!("{key} missing in {row}"))?;
    ensure!(v > 0.0 && v.is_finite(), "{key} = {v} in {row}");
    Ok(())
}

fn batches(rows: &Value) -> Vec<u64> {
    rows.as_array().into_iter().flatten().filter_map(|r| r["batch"].as_u64()).collect()
}

#[test]
fn small_run_on_the_cpu_passes_with_positive_figures() -> Result<()> {
    dsvl_e2e::binary("dsvl")?; // the CLI parity half needs it next to dsvl-bench
    let out = Scratch::new("gpu-check")?;
    let output = gpu_check(&["--device", "cpu", "--small"], &bench_dir(), &out.0)?;
    ensure!(output.status.success(), "gpu-check failed");
    let s: Value = serde_json::from_slice(&std::fs::read(out.0.join("summary.json"))?)?;
    assert_eq!(s["passed"], true, "{:#}", s["problems"]);
    assert_eq!(s["device"], "cpu");
    let steps: Vec<&str> =
        s["steps"].as_array().unwrap().iter().map(|st| st["status"].as_str().unwrap()).collect();
    assert_eq!(steps, ["ok"; 4], "{:#}", s["steps"]);

    for dtype in ["f32", "bf16"] {
        let p = &s["parity"][dtype];
        assert_eq!(p["passed"], true, "parity {dtype}: {:#}", p["failed"]);
        let checks = p["checks"].as_array().unwrap();
        for source in ["library", "cli"] {
            let n = checks.iter().filter(|c| c["source"] == source).count();
            assert!(n >= 7, "parity {dtype}: {n} {source} checks");
        }
        assert!(checks.iter().all(|c| c["pass"] == true));
    }
    // f32 greedy ids are required to be identical; bf16 ones are reported.
    let f32_ids = s["parity"]["f32"]["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c.get("identical").is_some());
    assert!(f32_ids.clone().count() == 4 && f32_ids.clone().all(|c| c["identical"] == true));

    assert_eq!(batches(&s["vision"]), [1, 2]);
    for row in s["vision"].as_array().unwrap() {
        positive(row, "images_per_s")?;
        positive(row, "gflop_per_image")?;
        positive(row, "achieved_tflops")?;
        assert!(row["mfu"].is_null(), "no MFU on the CPU");
    }
    assert_eq!(batches(&s["decoder"]), [1, 4]);
    for row in s["decoder"].as_array().unwrap() {
        for key in ["prefill_tokens_per_s", "decode_tokens_per_s", "decode_step_ms", "weight_gb"] {
            positive(row, key)?;
        }
        positive(row, "achieved_gb_per_s")?;
        assert!(row["hbm_roofline_share"].is_null(), "no roofline on the CPU");
    }
    Ok(())
}

/// Compresses `src` into `dir` as the GPU host receives it: `.zst` or `.xz` when the tool is
/// here, else a plain copy.
fn compressed_copy(src: &Path, dir: &Path) -> Result<PathBuf> {
    let name = src.file_name().context("name")?.to_string_lossy().into_owned();
    for (tool, ext, args) in [("zstd", "zst", &["-q", "-1", "-c"][..]), ("xz", "xz", &["-0", "-c"])]
    {
        let dst = dir.join(format!("{name}.{ext}"));
        let file = std::fs::File::create(&dst)?;
        if let Ok(st) = Command::new(tool).args(args).arg(src).stdout(file).status() {
            if st.success() {
                return Ok(dst);
            }
        }
        std::fs::remove_file(&dst)?;
    }
    let dst = dir.join(&name);
    std::fs::copy(src, &dst)?;
    Ok(dst)
}

#[test]
fn an_unusable_device_fails_every_step_with_the_reason() -> Result<()> {
    let scratch = Scratch::new("gpu-check-fail")?;
    let bin = scratch.0.join("bin");
    std::fs::create_dir_all(&bin)?;
    let carried = compressed_copy(Path::new(env!("CARGO_BIN_EXE_dsvl-bench")), &bin)?;
    println!("carried: {}", carried.display());
    let out = scratch.0.join("out");
    let device = if cfg!(feature = "cuda") { "cuda:99" } else { "cuda:0" };
    let output = gpu_check(&["--device", device, "--small", "--budget", "120"], &bin, &out)?;
    assert_eq!(output.status.code(), Some(1));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("FAILED"), "{stdout}");
    let s: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    assert_eq!(s["passed"], false);
    for st in s["steps"].as_array().unwrap() {
        assert_eq!(st["status"], "failed", "{st}");
    }
    let log = std::fs::read_to_string(out.join("parity-f32.log"))?;
    assert!(log.contains(device), "{log}");
    Ok(())
}

/// How a GPU host receives the binaries: `gpu-bins.tar.xz` (both in one stream, as
/// `scripts/build-cuda` writes it). Unpacked by the script, the CLI half of parity finds `dsvl`;
/// `--steps` runs only the steps named and reports the others as not asked for.
#[test]
fn the_bundle_runs_and_steps_can_be_chosen() -> Result<()> {
    let dsvl = dsvl_e2e::binary("dsvl")?;
    let scratch = Scratch::new("gpu-check-bundle")?;
    let bin = scratch.0.join("bin");
    std::fs::create_dir_all(&bin)?;
    let bench = Path::new(env!("CARGO_BIN_EXE_dsvl-bench"));
    let tar = Command::new("sh")
        .arg("-c")
        .arg(r#"tar -C "$1" -cf - dsvl-bench -C "$2" dsvl | xz -0 -T1 > "$3""#)
        .arg("sh")
        .arg(bench.parent().context("bench folder")?)
        .arg(dsvl.parent().context("dsvl folder")?)
        .arg(bin.join("gpu-bins.tar.xz"))
        .status()?;
    ensure!(tar.success(), "tar | xz failed");
    let out = scratch.0.join("out");
    let output = gpu_check(&["--device", "cpu", "--small", "--steps", "parity-f32"], &bin, &out)?;
    ensure!(output.status.success(), "gpu-check failed");
    let s: Value = serde_json::from_slice(&std::fs::read(out.join("summary.json"))?)?;
    assert_eq!(s["passed"], true, "{:#}", s["problems"]);
    let status: Vec<(&str, &str)> = s["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|st| (st["name"].as_str().unwrap(), st["status"].as_str().unwrap()))
        .collect();
    let omitted = "not asked for (--steps)";
    assert_eq!(
        status,
        [("parity-f32", "ok"), ("parity-bf16", omitted), ("vision", omitted), ("decoder", omitted)]
    );
    let checks = s["parity"]["f32"]["checks"].as_array().unwrap();
    assert!(checks.iter().any(|c| c["source"] == "cli"), "dsvl was not unpacked");
    assert!(checks.iter().any(|c| c["check"] == "batched step vs alone" && c["pass"] == true));

    let bad = gpu_check(&["--device", "cpu", "--small", "--steps", "parity"], &bin, &out)?;
    assert_eq!(bad.status.code(), Some(2), "an unknown step is a usage error");
    Ok(())
}
