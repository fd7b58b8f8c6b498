//! The leader's KV block manager: fixed-size blocks with reference counts, a table per
//! sequence, and the prefix cache. Workers never allocate; the tables travel with each step.
//!
//! Prefix caching (vLLM's automatic prefix caching, with SGLang's effect): a full block whose
//! KV has been computed is registered under its chained hash ([`dsvl_core::prefix`]). When its
//! last sequence lets go of it, it is not freed but kept, evictable, and a later sequence
//! whose prompt starts with the same blocks adopts them instead of computing them again.
//! Evictable blocks are reused least recently released first (a sequence's tail blocks before
//! its head, so shared prefixes live longest) only when the free list is empty. A block is
//! *used* while a sequence holds it, *cached* while only the cache does, *free* otherwise.

use std::collections::{BTreeMap, HashMap};

use dsvl_core::prefix::BlockHash;
use dsvl_models::llm::SeqId;

/// Allocation state of the paged KV pool.
#[derive(Debug)]
pub struct BlockManager {
    block_size: usize,
    total: usize,
    prefix_cache: bool,
    /// Blocks holding nothing (never registered, or evicted).
    free: Vec<u32>,
    /// Sequences holding each block.
    refs: Vec<u32>,
    /// The hash each registered block is cached under.
    hash_of: Vec<Option<BlockHash>>,
    by_hash: HashMap<BlockHash, u32>,
    /// Registered blocks no sequence holds, by release tick (oldest first).
    evictable: BTreeMap<u64, u32>,
    /// Each evictable block's key in `evictable`.
    released_at: Vec<u64>,
    tick: u64,
    tables: HashMap<SeqId, Vec<u32>>,
}

impl BlockManager {
    /// `num_blocks` blocks of `block_size` token slots, with prefix caching on.
    pub fn new(num_blocks: usize, block_size: usize) -> Self {
        // Pop from the end: hand out low block ids first (stable, easy to read in traces).
        Self {
            block_size,
            total: num_blocks,
            prefix_cache: true,
            free: (0..num_blocks as u32).rev().collect(),
            refs: vec![0; num_blocks],
            hash_of: vec![None; num_blocks],
            by_hash: HashMap::new(),
            evictable: BTreeMap::new(),
            released_at: vec![0; num_blocks],
            tick: 0,
            tables: HashMap::new(),
        }
    }

    /// Turns prefix caching on or off (off: nothing is registered or adopted, and released
    /// blocks are free at once).
    pub fn with_prefix_cache(mut self, on: bool) -> Self {
        self.prefix_cache = on;
        self
    }

    /// Whether prefix caching is on.
    pub fn prefix_cache(&self) -> bool {
        self.prefix_cache
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

    /// Blocks a new allocation can take: free ones, then cached ones (evicted).
    fn available(&self) -> usize {
        self.free.len() + self.evictable.len()
    }

    fn take_block(&mut self) -> u32 {
        if let Some(b) = self.free.pop() {
            return b;
        }
        let (_, b) = self.evictable.pop_first().expect("callers check available()");
        if let Some(h) = self.hash_of[b as usize].take() {
            self.by_hash.remove(&h);
        }
        metrics::counter!("dsvl_decoder_prefix_cache_evictions_total").increment(1);
        b
    }

    /// Grows `seq`'s table to hold `tokens` tokens; `false` (and no change) if blocks are short.
    pub fn grow(&mut self, seq: SeqId, tokens: usize) -> bool {
        let need = self.missing(seq, tokens);
        if need > self.available() {
            return false;
        }
        let mut table = self.tables.remove(&seq).unwrap_or_default();
        for _ in 0..need {
            let b = self.take_block();
            self.refs[b as usize] = 1;
            table.push(b);
        }
        self.tables.insert(seq, table);
        true
    }

    /// How many leading `hashes` are cached.
    pub fn lookup(&self, hashes: &[BlockHash]) -> usize {
        if !self.prefix_cache {
            return 0;
        }
        hashes.iter().take_while(|h| self.by_hash.contains_key(*h)).count()
    }

    /// Starts `seq` (which holds no blocks) on the cached blocks of the longest matching prefix
    /// of `hashes` and grows its table to `tokens` tokens, if the blocks suffice; returns the
    /// number of cached blocks it took, or `None` (and no change).
    pub fn admit(&mut self, seq: SeqId, hashes: &[BlockHash], tokens: usize) -> Option<usize> {
        debug_assert!(self.table(seq).is_empty(), "admit starts a sequence");
        let hit = self.lookup(hashes);
        let matched: Vec<u32> = hashes[..hit].iter().map(|h| self.by_hash[h]).collect();
        // Matched blocks that only the cache holds stop being available for new ones.
        let reclaimed = matched.iter().filter(|&&b| self.refs[b as usize] == 0).count();
        let need = self.blocks_for(tokens).saturating_sub(hit);
        if need > self.available() - reclaimed {
            return None;
        }
        for &b in &matched {
            if self.refs[b as usize] == 0 {
                self.evictable.remove(&self.released_at[b as usize]);
            }
            self.refs[b as usize] += 1;
        }
        self.tables.insert(seq, matched);
        let grown = self.grow(seq, tokens);
        debug_assert!(grown, "capacity checked above");
        Some(hit)
    }

    /// Blocks that [`admit`](Self::admit) of `hashes` and `tokens` tokens lacks now (0: it
    /// would succeed).
    pub fn shortfall(&self, hashes: &[BlockHash], tokens: usize) -> usize {
        let hit = self.lookup(hashes);
        let reclaimed =
            hashes[..hit].iter().filter(|h| self.refs[self.by_hash[*h] as usize] == 0).count();
        let need = self.blocks_for(tokens).saturating_sub(hit);
        need.saturating_sub(self.available() - reclaimed)
    }

    /// Blocks that releasing every one of `seqs` would add to what an admission of `hashes`
    /// can take: those no other sequence holds, less the ones it would adopt as its cached
    /// prefix (released, they stay cached and it takes them back).
    pub fn released_by(&self, seqs: &[SeqId], hashes: &[BlockHash]) -> usize {
        let mut holders: HashMap<u32, u32> = HashMap::new();
        for seq in seqs {
            for &b in self.table(*seq) {
                *holders.entry(b).or_default() += 1;
            }
        }
        let adopted: Vec<u32> =
            hashes[..self.lookup(hashes)].iter().map(|h| self.by_hash[h]).collect();
        holders
            .into_iter()
            .filter(|&(b, n)| self.refs[b as usize] == n && !adopted.contains(&b))
            .count()
    }

    /// Registers block `index` of `seq` (full, its KV computed) under `hash`. A block already
    /// registered, or a hash already held by another block (two sequences computed the same
    /// prefix at once), is left as it is.
    pub fn register(&mut self, seq: SeqId, index: usize, hash: BlockHash) {
        if !self.prefix_cache {
            return;
        }
        let Some(&b) = self.tables.get(&seq).and_then(|t| t.get(index)) else { return };
        if self.hash_of[b as usize].is_some() || self.by_hash.contains_key(&hash) {
            return;
        }
        self.hash_of[b as usize] = Some(hash);
        self.by_hash.insert(hash, b);
    }

    /// Lets go of `seq`'s blocks: registered ones nobody else holds become cached (tail
    /// blocks first in eviction order), the rest free.
    pub fn release(&mut self, seq: SeqId) {
        let Some(table) = self.tables.remove(&seq) else { return };
        for &b in table.iter().rev() {
            let r = &mut self.refs[b as usize];
            *r -= 1;
            if *r > 0 {
                continue;
            }
            if self.hash_of[b as usize].is_some() {
                self.tick += 1;
                self.released_at[b as usize] = self.tick;
                self.evictable.insert(self.tick, b);
            } else {
                self.free.push(b);
            }
        }
    }

    /// `seq`'s block table.
    pub fn table(&self, seq: SeqId) -> &[u32] {
        self.tables.get(&seq).map_or(&[], Vec::as_slice)
    }

    /// Blocks held by sequences.
    pub fn used(&self) -> usize {
        self.total - self.available()
    }

    /// Blocks only the prefix cache holds (evictable).
    pub fn cached(&self) -> usize {
        self.evictable.len()
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.total
    }

    /// Blocks a new allocation can take (free or evictable).
    pub fn free(&self) -> usize {
        self.available()
    }
}

#[cfg(test)]
#[path = "blocks_tests.rs"]
mod tests;
