//! Running the PyTorch reference scripts under `benches/reference/` in a child process.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{bail, Context, Result};

/// `benches/reference/.venv/bin/python` if it exists, else `python3` (override: DSVL_BENCH_PYTHON).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("DSVL_BENCH_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join("benches/reference/.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The repository root (benches/ is one level down).
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Runs `benches/reference/<script>` with `args` and parses the JSON object it prints last.
pub fn run_json(script: &str, args: &[String]) -> Result<serde_json::Value> {
    let path = repo_root().join("benches/reference").join(script);
    eprintln!("running reference: {} {} {}", python().display(), path.display(), args.join(" "));
    let out = Command::new(python())
        .arg(&path)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("cannot start {}", python().display()))?;
    if !out.status.success() {
        bail!("reference {script} failed ({}); install it with benches/reference/requirements.txt", out.status);
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let last = stdout.lines().last().context("reference printed nothing")?;
    serde_json::from_str(last).with_context(|| format!("reference output is not JSON: {last}"))
}
