//! The leader's KV block manager: fixed-size blocks from a free list, a table per sequence.
//! Workers never allocate; the tables travel with each step.

use std::collections::HashMap;

use dsvl_models::llm::SeqId;

/// Allocation state of the paged KV pool.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl BlockManager {
    /// `num_blocks` blocks of `block_size` token slots.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: hand out low block ids first (stable, easy to read in traces).
        Self {
            block_size,
            total: num_blocks,
            free: (0..num_blocks as u32).rev().collect(),
            tables: HashMap::new(),
        }
    }

    /// Token slots per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks needed for `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Additional blocks `seq` needs to hold `tokens` tokens.
    pub fn missing(&self, seq: SeqId, tokens: usize) -> usize {
        self.blocks_for(tokens).saturating_sub(self.tables.get(&seq).map_or(0, Vec::len))
    }

    /// Grows `seq`'s table to hold `tokens` tokens; `false` (and no change) if blocks are short.
    pub fn grow(&mut self, seq: SeqId, tokens: usize) -> bool {
        let need = self.missing(seq, tokens);
        if need > self.free.len() {
            return false;
        }
        let table = self.tables.entry(seq).or_default();
        for _ in 0..need {
            table.push(self.free.pop().expect("checked above"));
        }
        true
    }

    /// Returns `seq`'s blocks to the free list.
    pub fn release(&mut self, seq: SeqId) {
        if let Some(t) = self.tables.remove(&seq) {
            self.free.extend(t);
        }
    }

    /// `seq`'s block table.
    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Blocks in use.
    pub fn used(&self) -> usize {
        self.total - self.free.len()
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Free blocks.
    pub fn free(&self) -> usize {
        self.free.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_releases_and_refuses_when_short() {
        let mut m = BlockManager::new(4, 16);
        assert!(m.grow(1, 17)); // 2 blocks
        assert_eq!(m.table(1).len(), 2);
        assert!(m.grow(1, 32)); // still 2
        assert_eq!(m.used(), 2);
        assert!(!m.grow(2, 49), "needs 4, only 2 free");
        assert_eq!(m.used(), 2, "a failed grow allocates nothing");
        assert!(m.grow(2, 32));
        assert_eq!(m.free(), 0);
        m.release(1);
        assert_eq!(m.free(), 2);
        assert!(m.table(1).is_empty());
    }
}
