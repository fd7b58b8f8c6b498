use dsvl_core::prefix::prompt_hashes;

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

fn hashes(tokens: &[u32]) -> Vec<BlockHash> {
    prompt_hashes(b"", tokens, &[], 4)
}

#[test]
fn released_registered_blocks_are_cached_then_adopted() {
    let mut m = BlockManager::new(8, 4);
    let prompt: Vec<u32> = (0..10).collect(); // two full blocks + 2 tokens
    let h = hashes(&prompt);
    assert_eq!(m.admit(1, &h, 11), Some(0), "cold cache");
    for (i, hash) in h.iter().enumerate() {
        m.register(1, i, *hash);
    }
    let first = m.table(1).to_vec();
    m.release(1);
    assert_eq!((m.used(), m.cached(), m.free()), (0, 2, 8), "two cached, all allocatable");

    // The same prompt takes both cached blocks and one new block.
    assert_eq!(m.admit(2, &h, 11), Some(2));
    assert_eq!(m.table(2)[..2], first[..2]);
    assert_eq!((m.used(), m.cached()), (3, 0));
    // A second holder of the same prefix shares the blocks (reference counts).
    assert_eq!(m.admit(3, &h, 11), Some(2));
    assert_eq!(m.used(), 4, "two shared + one private each");
    m.release(2);
    assert_eq!((m.used(), m.cached()), (3, 0), "still held by sequence 3");
    m.release(3);
    assert_eq!((m.used(), m.cached(), m.free()), (0, 2, 8));
}

#[test]
fn eviction_takes_free_blocks_first_then_the_oldest_tail() {
    let mut m = BlockManager::new(4, 4);
    let a: Vec<u32> = (0..8).collect();
    let ha = hashes(&a);
    assert_eq!(m.admit(1, &ha, 8), Some(0));
    m.register(1, 0, ha[0]);
    m.register(1, 1, ha[1]);
    m.release(1);
    assert_eq!(m.cached(), 2);
    // Two free blocks are used before any cached one.
    assert!(m.grow(9, 8));
    assert_eq!(m.cached(), 2);
    // The next block evicts a's tail block (released first), keeping its head.
    assert!(m.grow(10, 4));
    assert_eq!(m.cached(), 1);
    assert_eq!(m.lookup(&ha), 1, "the head block is still cached");
    // Blocks are short: a failed admission changes nothing.
    assert_eq!(m.admit(11, &ha, 12), None);
    assert_eq!(m.cached(), 1);
    assert_eq!(m.lookup(&ha), 1);
    // Taking the cached block itself needs no new allocation beyond it.
    assert_eq!(m.admit(11, &ha, 4), Some(1));
    assert_eq!((m.used(), m.cached(), m.free()), (4, 0, 0));
}

#[test]
fn duplicates_and_disabled_cache_register_nothing() {
    let mut m = BlockManager::new(6, 4);
    let p: Vec<u32> = (0..4).collect();
    let h = hashes(&p);
    assert!(m.grow(1, 5) && m.grow(2, 5));
    m.register(1, 0, h[0]);
    m.register(2, 0, h[0]); // computed twice at once: the second stays private
    m.release(1);
    m.release(2);
    assert_eq!((m.cached(), m.used()), (1, 0));

    let mut off = BlockManager::new(6, 4).with_prefix_cache(false);
    assert!(off.grow(1, 5));
    off.register(1, 0, h[0]);
    off.release(1);
    assert_eq!((off.cached(), off.lookup(&h)), (0, 0));
    assert_eq!(off.admit(2, &h, 5), Some(0));
}

/// What an admission lacks, and what releasing given sequences would add to it: blocks
/// another sequence also holds do not count, nor the cached prefix it would adopt anyway.
#[test]
fn shortfall_and_what_releasing_sequences_gives() {
    let mut m = BlockManager::new(6, 4);
    let prompt: Vec<u32> = (0..10).collect();
    let h = hashes(&prompt);
    assert_eq!(m.admit(1, &h, 11), Some(0)); // 3 blocks
    for (i, hash) in h.iter().enumerate() {
        m.register(1, i, *hash);
    }
    assert_eq!(m.admit(2, &h, 11), Some(2), "shares the two prefix blocks, one of its own");
    assert_eq!(m.free(), 2);
    let other = hashes(&(100..110).collect::<Vec<u32>>());
    assert_eq!(m.shortfall(&other, 17), 3, "5 blocks against 2");
    assert_eq!(m.shortfall(&other, 8), 0);
    assert_eq!(m.released_by(&[2], &other), 1, "the prefix stays held by sequence 1");
    assert_eq!(m.released_by(&[1, 2], &other), 4);
    assert_eq!(m.released_by(&[1, 2], &h), 2, "its own prefix it adopts anyway");
    // The shortfall counts as admit does: released, the prefix is cached, and adopting it
    // takes it out of what new blocks can use.
    m.release(1);
    m.release(2);
    assert_eq!((m.shortfall(&h, 11), m.shortfall(&other, 25)), (0, 1));
    assert!(m.admit(3, &other, 25).is_none() && m.admit(3, &other, 24).is_some());
}
