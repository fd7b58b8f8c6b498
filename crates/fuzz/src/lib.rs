//! Fuzz targets for every parser of untrusted input. Each takes arbitrary bytes and runs the
//! production code path on them; any input must end in `Ok` or a typed error, never a panic,
//! an abort, a hang or an allocation past the limits. Where a parse succeeds, `embedding_value`
//! also checks that encoding the value again gives the same bytes, and `tp_frame` that a frame
//! written back reads back with the same header and writes the same bytes again.
//!
//! The targets run three ways: every committed corpus and regression input in the normal test
//! run (`tests/corpus.rs`); for a bounded time under libFuzzer in CI; and for long campaigns
//! with `scripts/fuzz` (one instrumented binary, the target chosen by `DSVL_FUZZ_TARGET`).

mod targets;

pub use targets::{
    deadline, embedding_value, grpc_chat, image_decode, image_url, openai_chat, openai_completion,
    tp_frame,
};

/// A fuzz target: a name (the corpus folder) and the function.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]),
}

/// Every target.
pub const TARGETS: &[Target] = &[
    Target { name: "openai_chat", run: openai_chat },
    Target { name: "openai_completion", run: openai_completion },
    Target { name: "grpc_chat", run: grpc_chat },
    Target { name: "image_url", run: image_url },
    Target { name: "image_decode", run: image_decode },
    Target { name: "deadline", run: deadline },
    Target { name: "embedding_value", run: embedding_value },
    Target { name: "tp_frame", run: tp_frame },
];

/// The target called `name`.
pub fn target(name: &str) -> Option<&'static Target> {
    TARGETS.iter().find(|t| t.name == name)
}
