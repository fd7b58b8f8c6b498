//! Paged key/value storage: every layer owns one pool of `num_blocks * block_size` token slots
//! per rank; a sequence's tokens live in the blocks its block table lists (allocated by the
//! leader's block manager and sent with each step), in order. Appending writes rows in place;
//! attention gathers the sequence's rows. Memory is fixed up front, so running out is a
//! scheduling decision (preemption), never an allocation failure in the middle of a step.

use candle_core::{DType, Device, Result, Tensor};

use super::kv::{KvStore, SeqId};
use super::model::SeqChunk;

/// Geometry of the pool, identical on every rank of a group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PagedKvConfig {
    /// Blocks in the pool.
    pub num_blocks: usize,
    /// Token slots per block.
    pub block_size: usize,
}

/// Per-rank paged store.
pub struct PagedKv {
    cfg: PagedKvConfig,
    /// Per layer: keys and values, `[num_blocks * block_size, kv_heads, head_dim]`.
    pools: Vec<(Tensor, Tensor)>,
    /// Tokens written per sequence (layer 0 view, for `len`).
    lens: std::collections::HashMap<SeqId, usize>,
}

impl PagedKv {
    /// Allocates the pools (zeros) for `layers` layers of `kv_heads x head_dim` per token.
    pub fn new(
        cfg: PagedKvConfig,
        layers: usize,
        kv_heads: usize,
        head_dim: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let slots = cfg.num_blocks * cfg.block_size;
        let pools = (0..layers)
            .map(|_| {
                Ok((
                    Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?,
                    Tensor::zeros((slots, kv_heads, head_dim), dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { cfg, pools, lens: Default::default() })
    }

    /// Pool geometry.
    pub fn config(&self) -> PagedKvConfig {
        self.cfg
    }

    fn slot(&self, blocks: &[u32], pos: usize) -> Result<usize> {
        let b = blocks.get(pos / self.cfg.block_size).copied().ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "position {pos} has no block (table of {} blocks)",
                blocks.len()
            ))
        })? as usize;
        if b >= self.cfg.num_blocks {
            candle_core::bail!("block {b} outside the pool of {}", self.cfg.num_blocks);
        }
        Ok(b * self.cfg.block_size + pos % self.cfg.block_size)
    }
}

impl KvStore for PagedKv {
    fn append(
        &mut self,
        layer: usize,
        chunk: &SeqChunk,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (start, t) = (chunk.start, k.dim(0)?);
        let bs = self.cfg.block_size;
        let (kp, vp) = &self.pools[layer];
        // Write runs of consecutive slots (a run never crosses a block boundary).
        let mut i = 0;
        while i < t {
            let pos = start + i;
            let run = (bs - pos % bs).min(t - i);
            let slot = self.slot(&chunk.blocks, pos)?;
            kp.slice_set(&k.narrow(0, i, run)?.contiguous()?, 0, slot)?;
            vp.slice_set(&v.narrow(0, i, run)?.contiguous()?, 0, slot)?;
            i += run;
        }
        let total = start + t;
        let idx: Vec<u32> = (0..total)
            .map(|p| self.slot(&chunk.blocks, p).map(|s| s as u32))
            .collect::<Result<_>>()?;
        let idx = Tensor::new(idx, kp.device())?;
        if layer == 0 {
            self.lens.insert(chunk.seq, total);
        }
        Ok((kp.index_select(&idx, 0)?, vp.index_select(&idx, 0)?))
    }

    fn free(&mut self, seq: SeqId) {
        // Blocks belong to the leader's block manager; nothing to release here.
        self.lens.remove(&seq);
    }

    fn len(&self, seq: SeqId) -> usize {
        self.lens.get(&seq).copied().unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::llm::kv::ContiguousKv;

    /// Same keys/values as the contiguous store, whatever the (scattered) block order.
    #[test]
    fn gathers_what_was_appended() -> Result<()> {
        let dev = Device::Cpu;
        let cfg = PagedKvConfig { num_blocks: 8, block_size: 4 };
        let mut paged = PagedKv::new(cfg, 2, 2, 3, DType::F32, &dev)?;
        let mut flat = ContiguousKv::new();
        let blocks = vec![5, 1, 7];
        let mut start = 0;
        for (i, len) in [5usize, 1, 1, 3].into_iter().enumerate() {
            let k = Tensor::arange(0f32, (len * 6) as f32, &dev)?
                .reshape((len, 2, 3))?
                .affine(1.0, i as f64 * 100.0)?;
            let v = (k.clone() * -1.0)?;
            let chunk = SeqChunk {
                seq: 9,
                tokens: vec![0; len],
                start,
                all_logits: false,
                blocks: blocks.clone(),
            };
            for layer in 0..2 {
                let (pk, pv) = paged.append(layer, &chunk, &k, &v)?;
                let (fk, fv) = flat.append(layer, &chunk, &k, &v)?;
                assert_eq!(pk.to_vec3::<f32>()?, fk.to_vec3::<f32>()?);
                assert_eq!(pv.to_vec3::<f32>()?, fv.to_vec3::<f32>()?);
            }
            start += len;
        }
        assert_eq!(paged.len(9), 10);
        let too_far = SeqChunk { seq: 9, tokens: vec![0; 3], start: 10, all_logits: false, blocks };
        let k = Tensor::zeros((3, 2, 3), DType::F32, &dev)?;
        assert!(paged.append(0, &too_far, &k, &k).is_err(), "position 12 needs a fourth block");
        Ok(())
    }
}
