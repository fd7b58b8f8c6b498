//! Block hashes of a prompt for prefix caching, the same on the decoder (which reuses the KV of
//! cached blocks) and the gateway (which routes a request to the group likely to hold them).
//!
//! A prompt is cut into blocks of `block_size` tokens; every *full* block gets a 256-bit BLAKE3
//! hash chained from its parent's, so a hash names the whole prefix up to the end of its block.
//! Into each block's hash go: the parent's hash (for the first block, a root made from the
//! tenant's cache salt, so one tenant's prefixes are never another's), the block's token ids,
//! and for every image position inside the block its offset in the block, the image's content
//! key (the embedding-cache key, which binds the image bytes, the vision model and the tenant
//! salt) and the position's offset inside the image. Two prompts with the same token ids but
//! different images therefore share no block past the first image position (vLLM's
//! multimodal block hashes do the same with the image's hash). The encoding is length-prefixed
//! and domain-tagged, so different inputs never feed BLAKE3 the same bytes.

/// Hash of a full KV block and, through the chain, of everything before it.
pub type BlockHash = [u8; 32];

/// One image's run of positions in a prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageSpan {
    /// Prompt index of the image's first position.
    pub start: usize,
    /// Number of positions (576 for DeepSeek-VL).
    pub len: usize,
    /// BLAKE3 of the image's content key (see [`image_key_hash`]).
    pub key: [u8; 32],
}

/// The 32-byte form of an image's content key (the embedding-cache key string, or for an
/// embedding carried inline, its bytes).
pub fn image_key_hash(key: &[u8]) -> [u8; 32] {
    let mut h = blake3::Hasher::new();
    h.update(b"dsvl/prefix-image/v1");
    h.update(&(key.len() as u64).to_le_bytes());
    h.update(key);
    *h.finalize().as_bytes()
}

/// The content key of an image embedding carried inline (no cache key): its bytes' BLAKE3.
pub fn inline_image_key(data: &[u8]) -> [u8; 32] {
    image_key_hash(blake3::hash(data).as_bytes())
}

/// The parent of a prompt's first block: a function of the tenant's cache salt only.
pub fn root_hash(salt: &[u8]) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(b"dsvl/prefix-root/v1");
    h.update(&(salt.len() as u64).to_le_bytes());
    h.update(salt);
    *h.finalize().as_bytes()
}

/// The hash of the block holding `tokens` (its full contents), which starts at prompt index
/// `start`, after the block hashed `parent`. `images` are the prompt's image spans, sorted by
/// `start` (only those overlapping the block matter).
pub fn block_hash(
    parent: &BlockHash,
    start: usize,
    tokens: &[u32],
    images: &[ImageSpan],
) -> BlockHash {
    let mut h = blake3::Hasher::new();
    h.update(b"dsvl/prefix-block/v1");
    h.update(parent);
    h.update(&(tokens.len() as u64).to_le_bytes());
    for t in tokens {
        h.update(&t.to_le_bytes());
    }
    let end = start + tokens.len();
    for img in images.iter().filter(|i| i.start < end && i.start + i.len > start) {
        let from = img.start.max(start);
        let to = (img.start + img.len).min(end);
        // Offset in the block, offset in the image, run length, image key.
        h.update(b"img");
        h.update(&((from - start) as u64).to_le_bytes());
        h.update(&((from - img.start) as u64).to_le_bytes());
        h.update(&((to - from) as u64).to_le_bytes());
        h.update(&img.key);
    }
    *h.finalize().as_bytes()
}

/// The hashes of the full blocks of `tokens`, from block `from_block` on, continuing the chain
/// from `parent` (the hash of block `from_block - 1`, or the [`root_hash`] for block 0).
pub fn chain(
    parent: BlockHash,
    tokens: &[u32],
    images: &[ImageSpan],
    block_size: usize,
    from_block: usize,
) -> Vec<BlockHash> {
    let full = tokens.len() / block_size.max(1);
    let mut out = Vec::with_capacity(full.saturating_sub(from_block));
    let mut prev = parent;
    for b in from_block..full {
        let start = b * block_size;
        prev = block_hash(&prev, start, &tokens[start..start + block_size], images);
        out.push(prev);
    }
    out
}

/// Every full block's hash of a prompt, from the root of `salt`.
pub fn prompt_hashes(
    salt: &[u8],
    tokens: &[u32],
    images: &[ImageSpan],
    block_size: usize,
) -> Vec<BlockHash> {
    chain(root_hash(salt), tokens, images, block_size, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn span(start: usize, len: usize, key: &str) -> ImageSpan {
        ImageSpan { start, len, key: image_key_hash(key.as_bytes()) }
    }

    #[test]
    fn only_full_blocks_are_hashed_and_the_chain_continues() {
        let tokens: Vec<u32> = (0..70).collect();
        let all = prompt_hashes(b"t", &tokens, &[], 32);
        assert_eq!(all.len(), 2, "70 tokens: two full blocks of 32");
        let rest = chain(all[0], &tokens, &[], 32, 1);
        assert_eq!(rest, all[1..], "continuing from block 1 gives the same hashes");
        // A change in block 0 changes every later hash (the chain), one in block 1 only block 1.
        let mut t2 = tokens.clone();
        t2[3] = 999;
        let b = prompt_hashes(b"t", &t2, &[], 32);
        assert!(b[0] != all[0] && b[1] != all[1]);
        let mut t3 = tokens.clone();
        t3[40] = 999;
        let c = prompt_hashes(b"t", &t3, &[], 32);
        assert!(c[0] == all[0] && c[1] != all[1]);
    }

    #[test]
    fn same_tokens_different_images_share_no_block_past_the_image() {
        // Blocks of 8; the image takes positions 10..30 (blocks 1, 2 and 3).
        let tokens = vec![7u32; 40];
        let a = prompt_hashes(b"t", &tokens, &[span(10, 20, "dsvl:emb:v2:aa")], 8);
        let b = prompt_hashes(b"t", &tokens, &[span(10, 20, "dsvl:emb:v2:bb")], 8);
        assert_eq!(a[0], b[0], "block 0 holds no image position");
        for i in 1..a.len() {
            assert_ne!(a[i], b[i], "block {i}");
        }
        let again = prompt_hashes(b"t", &tokens, &[span(10, 20, "dsvl:emb:v2:aa")], 8);
        assert_eq!(a, again, "the same image gives the same blocks");
        // The same image at another offset is another prefix.
        let shifted = prompt_hashes(b"t", &tokens, &[span(11, 20, "dsvl:emb:v2:aa")], 8);
        assert_ne!(a[1], shifted[1]);
    }

    #[test]
    fn tenants_never_share_a_chain() {
        let tokens = vec![1u32; 64];
        let a = prompt_hashes(b"tenant-a", &tokens, &[], 16);
        let b = prompt_hashes(b"tenant-b", &tokens, &[], 16);
        assert!(a.iter().zip(&b).all(|(x, y)| x != y));
        assert_eq!(a, prompt_hashes(b"tenant-a", &tokens, &[], 16));
    }
}
