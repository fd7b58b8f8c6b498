//! What one forward step needs to know about its batch, built once per step (never per layer):
//! where each sequence's new tokens sit in the step's token matrix, their positions, the pool
//! slots their keys and values go to, and each sequence's block table and context length.
//!
//! The host copy serves the CPU kernels (which read it directly); device tensors (positions,
//! and on GPUs the slot index, block table and cumulative lengths the paged kernel takes) are
//! uploaded once here and shared by every layer.

use std::sync::OnceLock;

use candle_core::{Device, Tensor};

use super::gather_attention::GatherPlan;
use super::model::SeqChunk;
use crate::ModelError;

/// One sequence's part of the step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeqSlice {
    /// First row of its new tokens in the step's `[N, ...]` matrices.
    pub q_start: usize,
    /// New tokens this step.
    pub q_len: usize,
    /// Tokens of context after this step (cached + new); new token `i` sits at position
    /// `ctx_len - q_len + i` and attends to positions `0..=` that.
    pub ctx_len: usize,
    /// Pool blocks holding its positions, in order.
    pub blocks: Vec<u32>,
}

/// The step's metadata (host side plus the device tensors every layer shares).
#[derive(Debug)]
pub struct StepMeta {
    /// Tokens in the step.
    pub num_tokens: usize,
    /// Token slots per pool block.
    pub block_size: usize,
    /// Per sequence, in chunk order.
    pub seqs: Vec<SeqSlice>,
    /// Pool slot of each new token (`block * block_size + offset`).
    pub slots: Vec<u32>,
    /// Position of each new token, on the model's device (`[N]`, u32).
    pub positions: Tensor,
    /// Device-side tensors for GPU kernels (absent on the CPU).
    pub device: Option<DeviceMeta>,
    /// Indices and masks of the portable batched attention, built by the first layer that
    /// needs them (only devices without a paged kernel, and the CPU kernel's tests, do).
    pub gather: OnceLock<GatherPlan>,
}

/// Query rows per tile of the tiled CUDA attention kernel (`TILE_Q` in `cuda/kernels.cu`).
pub const ATTENTION_TILE_ROWS: usize = 16;

/// Step metadata uploaded for a device kernel, once per step.
#[derive(Debug)]
pub struct DeviceMeta {
    /// `[N]` u32: each new row's pool slot (where the KV write puts it).
    pub slots: Tensor,
    /// `[B + 1]` u32 cumulative new-token counts.
    pub cu_seqlens_q: Tensor,
    /// `[B + 1]` u32 cumulative context lengths.
    pub cu_seqlens_k: Tensor,
    /// `[B, max_blocks]` u32 block tables, padded with block 0 (never read past `ctx_len`).
    pub block_table: Tensor,
    /// `[T * 3]` u32: the step's rows cut into tiles of at most [`ATTENTION_TILE_ROWS`]
    /// consecutive rows of one sequence, each as (sequence, first row, rows). `None` for a
    /// decode-only step (one new token per sequence), which the tiled kernel never serves: no
    /// upload on the decode path.
    pub tiles: Option<Tensor>,
    /// Longest new-token run.
    pub max_seqlen_q: usize,
    /// Longest context.
    pub max_seqlen_k: usize,
}

impl StepMeta {
    /// Builds the metadata of `chunks` for a pool of `num_blocks` blocks of `block_size` slots.
    ///
    /// # Errors
    /// [`ModelError::InvalidInput`] when a chunk's block table is too short for its positions or
    /// names a block outside the pool (checked here, so no kernel ever reads out of bounds).
    pub fn new(
        chunks: &[SeqChunk],
        block_size: usize,
        num_blocks: usize,
        device: &Device,
    ) -> Result<Self, ModelError> {
        check_block_tables(chunks, block_size, num_blocks)?;
        let mut seqs = Vec::with_capacity(chunks.len());
        let mut slots = Vec::new();
        let mut positions = Vec::new();
        let mut q_start = 0;
        for c in chunks {
            let q_len = c.tokens.len();
            let ctx_len = c.start + q_len;
            let needed = ctx_len.div_ceil(block_size);
            for p in c.start..ctx_len {
                let b = c.blocks[p / block_size] as usize;
                slots.push((b * block_size + p % block_size) as u32);
                positions.push(p as u32);
            }
            seqs.push(SeqSlice { q_start, q_len, ctx_len, blocks: c.blocks[..needed].to_vec() });
            q_start += q_len;
        }
        let device_meta =
            if device.is_cpu() { None } else { Some(DeviceMeta::new(&seqs, &slots, device)?) };
        Ok(Self {
            num_tokens: q_start,
            block_size,
            positions: Tensor::new(positions, device)?,
            seqs,
            slots,
            device: device_meta,
            gather: OnceLock::new(),
        })
    }
}

impl StepMeta {
    /// The device-side tensors (an error when the metadata was built for the CPU).
    pub fn on_device(&self) -> candle_core::Result<&DeviceMeta> {
        self.device.as_ref().ok_or_else(|| {
            candle_core::Error::Msg(
                "step metadata was built for the CPU, the pool is on a device".into(),
            )
        })
    }
}

/// Checks that every chunk's block table covers its positions inside a pool of `num_blocks`
/// blocks (the leader runs this before a plan is sent, so no rank fails on its own).
///
/// # Errors
/// [`ModelError::InvalidInput`] naming the sequence.
pub fn check_block_tables(
    chunks: &[SeqChunk],
    block_size: usize,
    num_blocks: usize,
) -> Result<(), ModelError> {
    for c in chunks {
        let ctx_len = c.start + c.tokens.len();
        let needed = ctx_len.div_ceil(block_size);
        if c.blocks.len() < needed {
            return Err(ModelError::InvalidInput(format!(
                "sequence {}: {ctx_len} positions need {needed} KV blocks, the table has {}",
                c.seq,
                c.blocks.len()
            )));
        }
        if let Some(b) = c.blocks[..needed].iter().find(|&&b| b as usize >= num_blocks) {
            return Err(ModelError::InvalidInput(format!(
                "sequence {}: block {b} is outside the pool of {num_blocks}",
                c.seq
            )));
        }
    }
    Ok(())
}

impl DeviceMeta {
    fn new(seqs: &[SeqSlice], slots: &[u32], device: &Device) -> Result<Self, ModelError> {
        let max_blocks = seqs.iter().map(|s| s.blocks.len()).max().unwrap_or(0).max(1);
        let mut table = vec![0u32; seqs.len() * max_blocks];
        for (row, s) in table.chunks_exact_mut(max_blocks).zip(seqs) {
            row[..s.blocks.len()].copy_from_slice(&s.blocks);
        }
        let cumulative = |f: fn(&SeqSlice) -> usize| {
            std::iter::once(0u32)
                .chain(seqs.iter().scan(0u32, move |acc, s| {
                    *acc += f(s) as u32;
                    Some(*acc)
                }))
                .collect::<Vec<u32>>()
        };
        let max_seqlen_q = seqs.iter().map(|s| s.q_len).max().unwrap_or(0);
        let tiles = if max_seqlen_q > 1 {
            let mut tiles = Vec::new();
            for (i, s) in seqs.iter().enumerate() {
                for first in (s.q_start..s.q_start + s.q_len).step_by(ATTENTION_TILE_ROWS) {
                    let rows = ATTENTION_TILE_ROWS.min(s.q_start + s.q_len - first);
                    tiles.extend([i as u32, first as u32, rows as u32]);
                }
            }
            Some(Tensor::new(tiles, device)?)
        } else {
            None
        };
        Ok(Self {
            tiles,
            slots: Tensor::new(slots, device)?,
            cu_seqlens_q: Tensor::new(cumulative(|s| s.q_len), device)?,
            cu_seqlens_k: Tensor::new(cumulative(|s| s.ctx_len), device)?,
            block_table: Tensor::from_vec(table, (seqs.len(), max_blocks), device)?,
            max_seqlen_q,
            max_seqlen_k: seqs.iter().map(|s| s.ctx_len).max().unwrap_or(0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, start: usize, len: usize, blocks: Vec<u32>) -> SeqChunk {
        SeqChunk { seq, tokens: vec![1; len], start, blocks, ..SeqChunk::default() }
    }

    #[test]
    fn slots_follow_block_tables() -> Result<(), ModelError> {
        let chunks = [chunk(1, 0, 5, vec![3, 0]), chunk(2, 6, 1, vec![1, 2])];
        let m = StepMeta::new(&chunks, 4, 4, &Device::Cpu)?;
        assert_eq!(m.num_tokens, 6);
        assert_eq!(m.slots, vec![12, 13, 14, 15, 0, 10]);
        assert_eq!(m.positions.to_vec1::<u32>()?, vec![0, 1, 2, 3, 4, 6]);
        assert_eq!(m.seqs[1], SeqSlice { q_start: 5, q_len: 1, ctx_len: 7, blocks: vec![1, 2] });
        Ok(())
    }

    /// The tiled attention kernel's tiles: at most 16 consecutive rows of one sequence each,
    /// covering every row once.
    #[test]
    fn tiles_cut_each_sequence_into_runs_of_sixteen_rows() -> Result<(), ModelError> {
        let seqs = [
            SeqSlice { q_start: 0, q_len: 1, ctx_len: 9, blocks: vec![0] },
            SeqSlice { q_start: 1, q_len: 35, ctx_len: 35, blocks: vec![1] },
            SeqSlice { q_start: 36, q_len: 16, ctx_len: 20, blocks: vec![2] },
        ];
        let m = DeviceMeta::new(&seqs, &[0; 52], &Device::Cpu)?;
        let tiles =
            m.tiles.as_ref().expect("a step with prompt rows has tiles").to_vec1::<u32>()?;
        assert_eq!(tiles, [0, 0, 1, 1, 1, 16, 1, 17, 16, 1, 33, 3, 2, 36, 16]);
        // A decode-only step uploads none.
        let decode = [seqs[0].clone(), SeqSlice { q_start: 1, q_len: 1, ..seqs[2].clone() }];
        assert!(DeviceMeta::new(&decode, &[0; 2], &Device::Cpu)?.tiles.is_none());
        Ok(())
    }

    #[test]
    fn refuses_short_tables_and_foreign_blocks() {
        let short = StepMeta::new(&[chunk(1, 3, 2, vec![0])], 4, 4, &Device::Cpu);
        assert!(short.unwrap_err().to_string().contains("need 2 KV blocks"));
        let foreign = StepMeta::new(&[chunk(1, 0, 2, vec![9])], 4, 4, &Device::Cpu);
        assert!(foreign.unwrap_err().to_string().contains("outside the pool"));
    }
}
