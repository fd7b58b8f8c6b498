//! Key/value storage behind an interface, so the decoder tier's paged cache can replace the
//! simple contiguous one without touching the model.

use std::collections::HashMap;

use candle_core::{Result, Tensor};

use super::model::SeqChunk;

/// Identifies a sequence across steps (and across ranks: every rank keeps its own shard of the
/// same sequence's keys and values under the same id).
pub type SeqId = u64;

/// Per-rank key/value storage for every layer and sequence.
pub trait KvStore {
    /// Appends `k`, `v` (`[T, kv_heads, head_dim]`, already rotated) of `chunk` (its sequence,
    /// positions `[start, start + T)` and, for paged stores, its block table) at `layer`, and
    /// returns the keys and values of positions `[0, start + T)`.
    ///
    /// # Errors
    /// When `start` does not follow what is stored for the sequence, or the blocks are too few.
    fn append(
        &mut self,
        layer: usize,
        chunk: &SeqChunk,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)>;

    /// Forgets a sequence.
    fn free(&mut self, seq: SeqId);

    /// Tokens stored for `seq` (at layer 0).
    fn len(&self, seq: SeqId) -> usize;
}

/// Grows one tensor per (sequence, layer) by concatenation. Simple and exact; what `dsvl
/// generate` uses. Memory is not pooled: the decoder service uses a paged store instead.
#[derive(Default)]
pub struct ContiguousKv {
    layers: HashMap<SeqId, Vec<Option<(Tensor, Tensor)>>>,
}

impl ContiguousKv {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl KvStore for ContiguousKv {
    fn append(
        &mut self,
        layer: usize,
        chunk: &SeqChunk,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (seq, start) = (chunk.seq, chunk.start);
        let slots = self.layers.entry(seq).or_default();
        if slots.len() <= layer {
            slots.resize(layer + 1, None);
        }
        let stored = slots[layer].as_ref().map_or(Ok(0), |(k, _)| k.dim(0))?;
        if stored != start {
            candle_core::bail!("sequence {seq} layer {layer}: {stored} tokens cached but the step starts at {start}");
        }
        let (k, v) = match slots[layer].take() {
            None => (k.clone(), v.clone()),
            Some((pk, pv)) => (Tensor::cat(&[&pk, k], 0)?, Tensor::cat(&[&pv, v], 0)?),
        };
        slots[layer] = Some((k.clone(), v.clone()));
        Ok((k, v))
    }

    fn free(&mut self, seq: SeqId) {
        self.layers.remove(&seq);
    }

    fn len(&self, seq: SeqId) -> usize {
        self.layers
            .get(&seq)
            .and_then(|l| l.first())
            .and_then(|s| s.as_ref())
            .map_or(0, |(k, _)| k.dim(0).unwrap_or(0))
    }
}
