//! The CPU paged-attention kernel against the gathering fallback (candle matmuls over each
//! sequence's gathered history, with an explicit causal mask): mixed prefill chunks and decode
//! tokens, scattered block tables, grouped-query heads, f32 and bf16.

use candle_core::{DType, Device, Result, Tensor};

use super::*;
use crate::isa::Isa;
use crate::llm::SeqChunk;

const HEADS: usize = 4;
const KV_HEADS: usize = 2;
const D: usize = 8;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n).map(|i| (((i as u32 * 2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0).collect()
}

fn chunk(seq: u64, start: usize, len: usize, blocks: Vec<u32>) -> SeqChunk {
    SeqChunk { seq, tokens: vec![0; len], start, blocks, ..SeqChunk::default() }
}

/// Small blocks: prefill chunks, a chunk across a block edge, decodes.
fn small_blocks() -> (PagedKvConfig, Vec<Vec<SeqChunk>>) {
    let a = vec![7, 2, 9, 0];
    let b = vec![5, 11, 1];
    let steps = vec![
        // A prefill of 6 and of 3 in one step.
        vec![chunk(1, 0, 6, a.clone()), chunk(2, 0, 3, b.clone())],
        // A decode token for 1, the rest of 2's prompt (a second chunk across a block edge).
        vec![chunk(1, 6, 1, a.clone()), chunk(2, 3, 6, b.clone())],
        // Decodes for both.
        vec![chunk(2, 9, 1, b.clone()), chunk(1, 7, 1, a.clone())],
    ];
    (PagedKvConfig { num_blocks: 12, block_size: 4 }, steps)
}

/// The default block size with long prompts: the prefill path's 32-key runs and partial runs.
fn long_blocks() -> (PagedKvConfig, Vec<Vec<SeqChunk>>) {
    let a = vec![3, 0, 5];
    let b = vec![1, 4];
    let steps = vec![
        vec![chunk(1, 0, 70, a.clone()), chunk(2, 0, 20, b.clone())],
        vec![chunk(2, 20, 23, b.clone()), chunk(1, 70, 1, a.clone())],
        vec![chunk(1, 71, 1, a.clone()), chunk(2, 43, 1, b.clone())],
    ];
    (PagedKvConfig { num_blocks: 6, block_size: 32 }, steps)
}

/// Runs `steps` through both attention paths (writing K/V each step) and compares outputs.
fn compare(
    dtype: DType,
    tol: f32,
    (cfg, steps): (PagedKvConfig, Vec<Vec<SeqChunk>>),
) -> Result<()> {
    let dev = Device::Cpu;
    let kv = PagedKv::new(cfg, 1, KV_HEADS, D, dtype, &dev)?;
    for (i, chunks) in steps.iter().enumerate() {
        let meta =
            kv.step_meta(chunks, &dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let n = meta.num_tokens;
        let t = |len: usize, shape: (usize, usize, usize), seed: u32| {
            Tensor::from_vec(values(len, seed), shape, &dev)?.to_dtype(dtype)
        };
        let q = t(n * HEADS * D, (n, HEADS, D), 11 + i as u32)?;
        let k = t(n * KV_HEADS * D, (n, KV_HEADS, D), 23 + i as u32)?;
        let v = t(n * KV_HEADS * D, (n, KV_HEADS, D), 37 + i as u32)?;
        kv.write(0, &meta, &k, &v)?;
        let scale = 1.0 / (D as f32).sqrt();
        let (kp, vp) = &kv.pools[0];
        let want = kv.gathered(kp, vp, &meta, &q, scale)?.to_dtype(DType::F32)?;
        // Every vector path this processor has (scalar, AVX2, AVX-512).
        for isa in Isa::supported() {
            let ours = kv.attend_on(isa, 0, &meta, &q, scale)?.to_dtype(DType::F32)?;
            let diff = (ours - &want)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(diff <= tol, "step {i} {dtype:?} {isa:?}: max |diff| {diff}");
        }
    }
    Ok(())
}

#[test]
fn cpu_kernel_matches_gathered_attention_f32() -> Result<()> {
    compare(DType::F32, 1e-5, small_blocks())?;
    compare(DType::F32, 1e-5, long_blocks())
}

#[test]
fn cpu_kernel_matches_gathered_attention_bf16() -> Result<()> {
    // One bf16 ulp of the outputs (|x| <= 1): both round at the same points.
    compare(DType::BF16, 8e-3, small_blocks())?;
    compare(DType::BF16, 8e-3, long_blocks())
}

#[test]
fn writes_land_in_the_block_table_slots() -> Result<()> {
    let dev = Device::Cpu;
    let kv =
        PagedKv::new(PagedKvConfig { num_blocks: 4, block_size: 2 }, 1, 1, 1, DType::F32, &dev)?;
    let chunks = [chunk(1, 1, 3, vec![3, 0])];
    let meta = kv.step_meta(&chunks, &dev).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
    let rows = Tensor::new(&[[[1f32]], [[2.]], [[3.]]], &dev)?;
    kv.write(0, &meta, &rows, &(&rows * 10.0)?)?;
    let keys: Vec<f32> = kv.pools[0].0.flatten_all()?.to_vec1()?;
    // Position 1 -> block 3 slot 1 (7), 2 -> block 0 slot 0 (0), 3 -> block 0 slot 1 (1).
    assert_eq!(keys, vec![2., 3., 0., 0., 0., 0., 0., 1.]);
    Ok(())
}

#[test]
fn pool_sizing() {
    let per_token = kv_bytes_per_token(30, 32, 128, DType::BF16);
    assert_eq!(per_token, 491_520, "VL-7B: 2 x 30 layers x 4096 x 2 bytes");
    let cfg = PagedKvConfig::for_bytes(1 << 30, per_token, 32);
    assert_eq!(cfg.num_blocks, (1usize << 30) / (491_520 * 32));
    assert_eq!(PagedKvConfig::for_tokens(65, 32).num_blocks, 3);
}
