//! Peak memory of image decoding: a decoded image is released to the OS as soon as it is
//! preprocessed.
//!
//! `--max-concurrent-decodes` bounds how many decoded images exist at once, but the process's
//! allocator (mimalloc) keeps freed pages resident for a "purge delay" before giving them back
//! (30 s: `dsvl_core::allocator`, so activations are reused between layers and requests). A large decode that starts right after another would then find the previous image's
//! pages still resident and map new ones: two decoded images' worth of memory with one decode
//! slot. Measured with a real 16384 x 16384 PNG (768 MiB decoded): three such images sent at
//! once with one slot peaked at twice one image's memory; after a forced collection they cost
//! what one does (`tests/image_bombs.rs`). Small images skip the collection: their pages are
//! reused, and a collection costs more than it saves.

/// Decoded images at least this large (bytes) are handed back to the OS right away.
pub const RELEASE_AT_BYTES: usize = 64 << 20;

/// Call after a decoded image of `decoded_bytes` has been dropped.
pub fn release_decoded(decoded_bytes: usize) {
    if decoded_bytes >= RELEASE_AT_BYTES {
        // SAFETY: mi_collect only walks mimalloc's own free lists and returns unused pages to
        // the OS; it has no preconditions (without mimalloc as the global allocator it has
        // nothing to free).
        unsafe { libmimalloc_sys::mi_collect(true) };
    }
}
