//! The cargo feature combinations CI builds, and the GPU ones it cannot.
//!
//! CI builds the default features only (CPU paths, no CUDA toolkit here). These checks prove,
//! from cargo's own resolution (`cargo metadata`, `cargo tree`, offline, nothing compiled):
//! that the default build contains no CUDA or NCCL code; that the GPU features are declared
//! consistently across the crates (`nccl` implies `cuda`, each service's feature reaches candle);
//! and that `scripts/build-cuda` asks for features that exist, so the GPU build script cannot
//! silently rot while CI stays green.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ sits in the workspace root")
        .to_path_buf()
}

fn cargo(args: &[&str]) -> Result<String> {
    let out = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root())
        .output()
        .context("running cargo")?;
    ensure!(
        out.status.success(),
        "cargo {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8(out.stdout)?)
}

/// Declared features of every workspace crate: crate -> feature -> what it enables.
fn declared_features() -> Result<BTreeMap<String, BTreeMap<String, Vec<String>>>> {
    let meta: serde_json::Value = serde_json::from_str(&cargo(&[
        "metadata",
        "--format-version",
        "1",
        "--no-deps",
        "--offline",
    ])?)?;
    let mut out = BTreeMap::new();
    for p in meta["packages"].as_array().context("metadata packages")? {
        let features = serde_json::from_value(p["features"].clone())?;
        out.insert(p["name"].as_str().context("package name")?.to_string(), features);
    }
    Ok(out)
}

/// Features of candle-core that a build of `packages` with `features` turns on.
fn candle_features(extra: &[&str]) -> Result<BTreeSet<String>> {
    let mut args = vec![
        "tree",
        "--offline",
        "--locked",
        "-e",
        "features",
        "-i",
        "candle-core",
        "--prefix",
        "none",
    ];
    args.extend_from_slice(extra);
    let tree = cargo(&args)?;
    Ok(tree
        .lines()
        .filter_map(|l| l.strip_prefix("candle-core feature \""))
        .filter_map(|l| l.split('"').next())
        .map(str::to_string)
        .collect())
}

#[test]
fn default_workspace_build_contains_no_gpu_code() -> Result<()> {
    let on = candle_features(&["--workspace"])?;
    ensure!(on.contains("default"), "the tree lists candle-core's features: {on:?}");
    for gpu in ["cuda", "nccl", "cudnn", "metal"] {
        ensure!(!on.contains(gpu), "the default build enables candle-core/{gpu}: {on:?}");
    }
    Ok(())
}

#[test]
fn gpu_features_are_declared_consistently() -> Result<()> {
    let f = declared_features()?;
    let enables = |krate: &str, feature: &str| -> Result<Vec<String>> {
        f.get(krate)
            .with_context(|| format!("crate {krate}"))?
            .get(feature)
            .cloned()
            .with_context(|| format!("{krate} declares no `{feature}` feature"))
    };
    ensure!(enables("dsvl-models", "cuda")?.contains(&"candle-core/cuda".into()));
    ensure!(enables("dsvl-parallel", "nccl")?.contains(&"candle-core/nccl".into()));
    ensure!(enables("dsvl-engine", "nccl")?.contains(&"dsvl-parallel/nccl".into()));
    for service in ["dsvl-decoder", "dsvl-cli"] {
        let nccl = enables(service, "nccl")?;
        ensure!(
            nccl.contains(&"cuda".into()) && nccl.contains(&"dsvl-engine/nccl".into()),
            "{service}: nccl = {nccl:?}"
        );
        ensure!(enables(service, "cuda")?.contains(&"dsvl-models/cuda".into()));
    }
    ensure!(enables("dsvl-vision", "cuda")?.contains(&"dsvl-models/cuda".into()));
    for (krate, features) in &f {
        if let Some(default) = features.get("default") {
            ensure!(
                default.iter().all(|d| !d.contains("cuda") && !d.contains("nccl")),
                "{krate} turns GPU code on by default: {default:?}"
            );
        }
    }
    Ok(())
}

#[test]
fn gpu_build_resolves_to_candle_cuda_and_nccl() -> Result<()> {
    let on = candle_features(&["-p", "dsvl-decoder", "--features", "dsvl-decoder/nccl"])?;
    ensure!(
        on.contains("cuda") && on.contains("nccl"),
        "dsvl-decoder/nccl must reach candle-core: {on:?}"
    );
    let vision = candle_features(&["-p", "dsvl-vision", "--features", "dsvl-vision/cuda"])?;
    ensure!(vision.contains("cuda") && !vision.contains("nccl"), "dsvl-vision/cuda: {vision:?}");
    Ok(())
}

#[test]
fn build_cuda_script_names_existing_features() -> Result<()> {
    let script = std::fs::read_to_string(root().join("scripts/build-cuda"))?;
    let line = script
        .lines()
        .find(|l| l.starts_with("features=(--features "))
        .context("scripts/build-cuda has no `features=(--features ...)` line")?;
    let list = line.trim_start_matches("features=(--features ").trim_end_matches(')');
    let f = declared_features()?;
    let mut seen = 0;
    for item in list.split(',') {
        let Some((krate, feature)) = item.split_once('/') else {
            bail!("`{item}` is not crate/feature")
        };
        ensure!(
            f.get(krate).is_some_and(|fs| fs.contains_key(feature)),
            "scripts/build-cuda asks for {krate}/{feature}, which is not declared"
        );
        seen += 1;
    }
    ensure!(seen >= 3, "expected features for the CLI and both model services, got `{list}`");
    Ok(())
}
