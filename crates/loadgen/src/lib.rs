//! A serving load generator for the gateway, in the manner of `vllm bench serve` and SGLang's
//! `bench_serving`: requests from a [`Workload`] are sent by a [`Client`] (OpenAI HTTP with
//! SSE, or gRPC) in a closed loop (a fixed number in flight) or an open loop (Poisson arrivals
//! at a rate), each with a deadline; every request's [`Outcome`] is kept and summarised in a
//! [`Report`]. [`sweep`] raises the rate until goodput falls, to find the saturation point.
//!
//! The tests that run the cluster at saturation, under faults and for a soak use the same
//! code as `dsvl-bench serve`, so what they check is what operators measure.

mod client;
mod driver;
mod report;
mod sse;
mod sweep;
mod tls;
mod workload;
mod workload_file;

pub use client::{Client, ConnectOptions};
pub use driver::{run, Load, Mode, Run, Until};
pub use report::{
    retryable, KindReport, Outcome, Percentiles, Report, Slo, DEADLINE_SLACK, REPORT_FIELDS,
};
pub use sweep::{sweep, Step, Sweep, SweepPlan};
pub use tls::TlsFiles;
pub use workload::{BuiltIn, Image, Message, Mix, Part, Urgent, WorkItem, Workload};

/// Why a run could not start. Failures of single requests are not errors: they are counted.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("target {0}")]
    Target(String),
    #[error("workload: {0}")]
    Workload(String),
    #[error("--mix: {0}")]
    Mix(String),
    #[error("images: {0}")]
    Image(String),
    #[error("load: {0}")]
    Load(String),
}
