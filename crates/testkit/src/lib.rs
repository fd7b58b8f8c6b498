//! Test-only helpers shared by the workspace: where the fixtures are, and numeric comparisons
//! that report the worst element instead of a bare `false`.
//!
//! Fixtures live in the repository (`tests/fixtures/golden`, `assets/tiny-dsvl`); they were
//! copied from the team's shared fixture set, see `tests/fixtures/README.md` for provenance.
#![deny(missing_docs)]

mod captured;
mod hostile;
mod llama;
mod procs;

use std::path::PathBuf;

pub use captured::CapturedLog;
pub use hostile::{HOSTILE_GRPC_TIMEOUTS, HOSTILE_HTTP_TIMEOUTS};
pub use llama::{
    copy_tokenizer_files, temp_llama_checkpoint, write_llama_checkpoint, LlamaLayout,
    LLAMA_TOKENIZER_FILES,
};
pub use procs::{
    child_pids, cluster_secret_file, free_port, http_get, metric_sum, pid_alive, Frozen,
    RedisCluster, RedisServer, ServiceProcess,
};

use anyhow::{ensure, Result};
use candle_core::{DType, Tensor};

/// Repository root.
pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repository root exists")
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
pub fn assert_close(
    name: &str,
    actual: &Tensor,
    expected: &Tensor,
    atol: f64,
    rtol: f64,
) -> Result<Diff> {
    ensure!(
        actual.dims() == expected.dims(),
        "{name}: shape {:?} != expected {:?}",
        actual.dims(),
        expected.dims()
    );
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

/// `tests/fixtures/extra`: extreme-aspect images resized by Pillow itself.
pub fn extra_fixtures_dir() -> PathBuf {
    repo_root().join("tests/fixtures/extra")
}

/// Minimal PNG bytes whose header claims `width x height` RGB8 but carry almost no data.
pub fn png_header_only(width: u32, height: u32) -> Vec<u8> {
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    // A valid zlib stream of one empty stored block: decoders must not get this far.
    png_chunk(
        &mut png,
        b"IDAT",
        &[0x78, 0x01, 0x01, 0x00, 0x00, 0xff, 0xff, 0x00, 0x00, 0x00, 0x01],
    );
    png_chunk(&mut png, b"IEND", &[]);
    png
}

/// A complete, lossless RGB8 PNG of `rgb` (row-major HWC, `width * height * 3` bytes), with
/// uncompressed deflate blocks: lets a test hand exact pixels to code that reads image files.
pub fn png_rgb8(width: u32, height: u32, rgb: &[u8]) -> Vec<u8> {
    assert_eq!(rgb.len(), width as usize * height as usize * 3, "png_rgb8: pixel buffer size");
    let mut raw = Vec::with_capacity(rgb.len() + height as usize);
    for row in rgb.chunks(width as usize * 3) {
        raw.push(0); // filter type None
        raw.extend_from_slice(row);
    }
    let mut zlib = vec![0x78, 0x01];
    let blocks: Vec<&[u8]> = raw.chunks(65_535).collect();
    for (i, block) in blocks.iter().enumerate() {
        zlib.push(u8::from(i + 1 == blocks.len()));
        let len = block.len() as u16;
        zlib.extend_from_slice(&len.to_le_bytes());
        zlib.extend_from_slice(&(!len).to_le_bytes());
        zlib.extend_from_slice(block);
    }
    let (mut a, mut b) = (1u32, 0u32);
    for &byte in &raw {
        a = (a + u32::from(byte)) % 65_521;
        b = (b + a) % 65_521;
    }
    zlib.extend_from_slice(&((b << 16) | a).to_be_bytes());
    let mut png = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&width.to_be_bytes());
    ihdr.extend_from_slice(&height.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    png_chunk(&mut png, b"IHDR", &ihdr);
    png_chunk(&mut png, b"IDAT", &zlib);
    png_chunk(&mut png, b"IEND", &[]);
    png
}

fn png_chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    let start = out.len();
    out.extend_from_slice(kind);
    out.extend_from_slice(data);
    let crc = crc32(&out[start..]);
    out.extend_from_slice(&crc.to_be_bytes());
}

fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = 0xffff_ffffu32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 { (crc >> 1) ^ 0xedb8_8320 } else { crc >> 1 };
        }
    }
    !crc
}
