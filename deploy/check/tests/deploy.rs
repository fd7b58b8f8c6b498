//! Tests of deploy/: every overlay renders, validates strictly and breaks no invariant
//! ([`overlays`]); each rule reports exactly the mistake planted in a rendered overlay
//! ([`planted`]); the Dockerfiles pass their lint, and planted mistakes fail it
//! ([`dockerfiles`]).
//!
//! Rendering needs `kubectl` and validation `kubernetes-validate`, both installed by
//! scripts/setup into deploy/check/.venv; without them these tests fail, they never skip.

mod dockerfiles;
mod overlays;
mod planted;
mod planted_tls;
mod support;
