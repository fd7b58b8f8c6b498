//! Prefix-aware routing to decoder groups (NVIDIA Dynamo's KV-aware routing, SGLang's
//! cache-aware load balancer): a request goes to the group most likely to hold the KV blocks of
//! its prompt, so a conversation's next turn, or the same product photo asked about again,
//! lands where its prefix is already cached.
//!
//! The gateway computes the same block-hash chain the decoder caches under
//! ([`dsvl_core::prefix`]: tenant salt, token ids, image keys) and keeps, per group, a bounded
//! and approximate record of the hashes it sent there (two generations of a hash set: the
//! younger fills, then replaces the older, so the record holds between `capacity / 2` and
//! `capacity` recent hashes, and a hash seen again is kept young). The record can be wrong in
//! both directions (the group evicted a block; another gateway sent it there); that costs a
//! prefill, never a wrong answer.
//!
//! The choice: the group with the longest recorded prefix, unless its outstanding work exceeds
//! the least-loaded group's by more than `max_imbalance` sequences; then plain least work.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use dsvl_core::prefix::{self, BlockHash, ImageSpan};

use crate::upstream::Replica;

/// Hashes remembered per decoder group (32 bytes each, a few MiB at most).
pub const RECORD_CAPACITY: usize = 1 << 16;

/// Block size assumed for a group that has not reported one yet.
const DEFAULT_BLOCK_SIZE: usize = 32;

/// What this gateway sent to one group, approximately.
#[derive(Debug, Default)]
pub struct PrefixRecord {
    young: HashSet<BlockHash>,
    old: HashSet<BlockHash>,
}

impl PrefixRecord {
    /// Remembers `hashes`.
    pub fn insert(&mut self, hashes: &[BlockHash]) {
        for h in hashes {
            self.old.remove(h);
            self.young.insert(*h);
            if self.young.len() >= RECORD_CAPACITY / 2 {
                self.old = std::mem::take(&mut self.young);
            }
        }
    }

    /// How many leading `hashes` are remembered.
    pub fn matched(&self, hashes: &[BlockHash]) -> usize {
        hashes.iter().take_while(|h| self.young.contains(*h) || self.old.contains(*h)).count()
    }
}

/// A prompt as the decoder will cache it.
#[derive(Debug, Clone)]
pub struct RouteKey {
    /// The tenant's cache salt.
    pub salt: Vec<u8>,
    /// Prompt token ids.
    pub tokens: Vec<u32>,
    /// Its images' spans and keys.
    pub images: Vec<ImageSpan>,
}

impl RouteKey {
    /// The full blocks' hashes at `block_size`.
    pub fn hashes(&self, block_size: usize) -> Vec<BlockHash> {
        prefix::prompt_hashes(&self.salt, &self.tokens, &self.images, block_size)
    }
}

fn block_size(r: &Replica) -> usize {
    r.load
        .lock()
        .expect("load lock poisoned. This is a bug.")
        .as_ref()
        .map(|l| l.kv_block_size as usize)
        .filter(|&b| b > 0)
        .unwrap_or(DEFAULT_BLOCK_SIZE)
}

/// The hashes of `key` at each group's block size (usually one size for all).
pub fn hashes_by_group(key: &RouteKey, groups: &[Arc<Replica>]) -> Vec<Vec<BlockHash>> {
    let mut by_size: HashMap<usize, Vec<BlockHash>> = HashMap::new();
    groups
        .iter()
        .map(|r| {
            let bs = block_size(r);
            by_size.entry(bs).or_insert_with(|| key.hashes(bs)).clone()
        })
        .collect()
}

/// Why a group was chosen.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Choice {
    /// It holds the longest prefix.
    Prefix,
    /// No group holds any of it.
    Miss,
    /// The best holder was too busy; least work instead.
    Imbalanced,
}

impl Choice {
    /// Metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Prefix => "prefix",
            Self::Miss => "miss",
            Self::Imbalanced => "imbalanced",
        }
    }
}

/// Reorders `groups` (given in least-work order, with each one's outstanding work and its
/// prefix match in blocks) so the first is the one to try: the longest match unless it is
/// more than `max_imbalance` sequences busier than the least loaded. The rest keep their order.
pub fn choose(work: &[usize], matched: &[usize], max_imbalance: usize) -> (usize, Choice) {
    let least = work.iter().copied().min().unwrap_or(0);
    let best = (0..matched.len()).max_by_key(|&i| (matched[i], std::cmp::Reverse(i)));
    match best {
        Some(i) if matched[i] > 0 => {
            if work[i] > least + max_imbalance {
                (0, Choice::Imbalanced)
            } else {
                (i, Choice::Prefix)
            }
        }
        _ => (0, Choice::Miss),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_is_bounded_and_keeps_what_it_saw_recently() {
        let mut r = PrefixRecord::default();
        let hs: Vec<BlockHash> = (0..RECORD_CAPACITY as u32 * 2)
            .map(|i| *blake3::hash(&i.to_le_bytes()).as_bytes())
            .collect();
        r.insert(&hs[..10]);
        assert_eq!(r.matched(&hs[..20]), 10);
        r.insert(&hs[10..]);
        assert!(r.young.len() + r.old.len() <= RECORD_CAPACITY);
        assert_eq!(r.matched(&hs[..10]), 0, "the oldest hashes are gone");
        let last = &hs[hs.len() - 100..];
        assert_eq!(r.matched(last), 100);
    }

    #[test]
    fn longest_prefix_wins_unless_much_busier() {
        // Groups in least-work order.
        assert_eq!(choose(&[0, 1, 2], &[0, 5, 3], 4), (1, Choice::Prefix));
        assert_eq!(choose(&[0, 9, 2], &[0, 5, 3], 4), (0, Choice::Imbalanced));
        assert_eq!(choose(&[0, 1], &[0, 0], 4), (0, Choice::Miss));
        // Ties on the match: the less busy one.
        assert_eq!(choose(&[1, 2], &[3, 3], 4), (0, Choice::Prefix));
    }

    #[test]
    fn keys_hash_like_the_decoder() {
        let key = RouteKey { salt: b"s".to_vec(), tokens: (0..100).collect(), images: vec![] };
        assert_eq!(key.hashes(32), prefix::prompt_hashes(b"s", &key.tokens, &[], 32));
        assert_eq!(key.hashes(32).len(), 3);
    }
}
