//! Fail-points for the chaos tests: named places in the services that fail on purpose when a
//! test asks. Compiled only into builds with debug assertions (the test and dev builds), never
//! into release binaries: there [`hit`] is a constant `false`.
//!
//! A test sets `DSVL_FAILPOINTS_DIR` for a service process and, when it wants the fault, creates
//! the file named after the fail-point in that folder (every process), or `<name>.<pid>` (one
//! process); the service checks it each time it passes the point (a `stat`, only in those
//! builds).

/// Whether the fail-point `name` is armed for this process.
#[cfg(debug_assertions)]
pub fn hit(name: &str) -> bool {
    use std::sync::OnceLock;
    static DIR: OnceLock<Option<std::path::PathBuf>> = OnceLock::new();
    DIR.get_or_init(|| std::env::var_os("DSVL_FAILPOINTS_DIR").map(Into::into))
        .as_ref()
        .is_some_and(|d| {
            d.join(name).exists() || d.join(format!("{name}.{}", std::process::id())).exists()
        })
}

/// Whether the fail-point `name` is armed for this process (never, in release builds).
#[cfg(not(debug_assertions))]
#[inline(always)]
pub fn hit(_name: &str) -> bool {
    false
}

/// The vision-encoder's model thread panics before its next batch.
pub const VISION_MODEL_PANIC: &str = "vision-model-panic";

/// The vision-encoder waits before loading its model while this is armed (a slow load).
pub const VISION_LOAD_HOLD: &str = "vision-load-hold";
