//! Test-only helpers shared by the workspace: where the fixtures are, and numeric comparisons
//! that report the worst element instead of a bare `false`.
//!
//! Fixtures live in the repository (`tests/fixtures/golden`, `assets/tiny-dsvl`); they were
//! copied from the team's shared fixture set, see `tests/fixtures/README.md` for provenance.

use std::path::PathBuf;

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../..").canonicalize().expect("repository root exists")
}

/// `tests/fixtures/golden`: reference tensors made with the official DeepSeek-VL code.
pub fn golden_dir() -> PathBuf {
    repo_root().join("tests/fixtures/golden")
}

/// `assets/tiny-dsvl`: the tiny random-weight checkpoint in the original layout.
pub fn tiny_model_dir() -> PathBuf {
    repo_root().join("assets/tiny-dsvl")
}

/// Worst-case differences between two tensors.
#[derive(Debug, Clone, Copy)]
pub struct Diff {
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Index (flattened) where it occurs.
    pub at: usize,
    /// Largest `|a - b| - rtol * |b|` margin violation ratio, for reporting.
    pub worst_excess: f64,
}

/// Compares `actual` to `expected` elementwise with `|a - e| <= atol + rtol * |e|`.
pub fn assert_close(name: &str, actual: &Tensor, expected: &Tensor, atol: f64, rtol: f64) -> Result<Diff> {
    ensure!(actual.dims() == expected.dims(), "{name}: shape {:?} != expected {:?}", actual.dims(), expected.dims());
    let a: Vec<f64> = actual.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let e: Vec<f64> = expected.to_dtype(DType::F64)?.flatten_all()?.to_vec1()?;
    let mut diff = Diff { max_abs: 0.0, at: 0, worst_excess: f64::NEG_INFINITY };
    for (i, (x, y)) in a.iter().zip(&e).enumerate() {
        ensure!(x.is_finite(), "{name}: non-finite value {x} at {i}");
        let d = (x - y).abs();
        if d > diff.max_abs {
            diff.max_abs = d;
            diff.at = i;
        }
        diff.worst_excess = diff.worst_excess.max(d - (atol + rtol * y.abs()));
    }
    ensure!(
        diff.worst_excess <= 0.0,
        "{name}: max |diff| {:.3e} at flat index {} (actual {}, expected {}) exceeds atol {atol:e} + rtol {rtol:e}",
        diff.max_abs,
        diff.at,
        a[diff.at],
        e[diff.at]
    );
    Ok(diff)
}
