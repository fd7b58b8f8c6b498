//! How long the process allocator keeps freed memory for reuse.
//!
//! Every dsvl binary runs on mimalloc (v3, as `libmimalloc-sys` builds it), which hands freed
//! pages back to the kernel ("purges") a second after they fall idle by default. A vision
//! tower frees and allocates activations of tens to hundreds of MiB per layer over an encode of
//! seconds, so with the default much of it went back and the kernel zeroed fresh 2 MiB pages
//! when it was needed again: 9 % of a vision encode's profile on an
//! Intel Xeon, and encode batch 1 ran 10 % faster with the delay raised (three alternating runs
//! each, benches/README.md). [`keep_freed_memory`] raises it to [`PURGE_DELAY_MS`]: memory a
//! busy tier frees is reused, and given back once the tier has been idle that long. An explicit
//! `mi_collect(true)` (the vision tier after a decoded image of 64 MiB or more) still purges at
//! once, whatever the delay.

use std::os::raw::c_long;

/// How long freed memory stays with the process before it goes back to the kernel.
pub const PURGE_DELAY_MS: c_long = 30_000;

/// mimalloc's `mi_option_purge_delay` (the same index in its v2 and v3 option enums; the
/// bindings do not name it). Checked against mimalloc v3's default by the test below.
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory for [`PURGE_DELAY_MS`]; call once at start-up, before the model loads.
/// Harmless where mimalloc is not the global allocator (it configures an unused heap).
pub fn keep_freed_memory() {
    // SAFETY: `mi_option_set` only stores an option value; mimalloc reads it on its next purge.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, PURGE_DELAY_MS) };
}

/// The purge delay in force, in milliseconds.
pub fn purge_delay_ms() -> c_long {
    // SAFETY: reads an option value.
    unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The index names the purge delay: mimalloc v3's default (1000 ms, `options.c`) before,
    /// ours after. Runs in its own process under nextest, so nothing has set the option before.
    #[test]
    fn the_option_is_the_purge_delay() {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            assert_eq!(purge_delay_ms(), 1000, "option 15 is not mimalloc's purge delay");
        }
        keep_freed_memory();
        assert_eq!(purge_delay_ms(), PURGE_DELAY_MS);
    }
}
