//! `dsvl-bench`: benchmarks that run dsvl and the PyTorch reference in the same process tree,
//! on the same machine and thread count, and report ratios. Results and commands are recorded
//! in `benches/README.md`.

mod checkpoint;
mod constraint;
mod decoder;
mod decoder_service;
mod dims;
mod gateway;
mod gpu_summary;
mod machine;
mod parity;
mod parity_batch;
mod parity_cli;
mod prefix_cache;
mod random;
mod reference;
mod roofline;
mod serve;
mod soak;
mod step;
mod vision;
mod vision_service;

use anyhow::Result;

/// Large tensors are allocated and freed on every op; mimalloc keeps freed pages for reuse
/// instead of returning them to the kernel and faulting them in again.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dsvl-bench", about = "dsvl benchmarks against the PyTorch reference")]
struct Cli {
    /// Worker threads for both dsvl (rayon / gemm) and PyTorch.
    #[arg(long, global = true, default_value_t = default_threads())]
    threads: usize,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Vision tower + aligner at the real DeepSeek-VL-7B dimensions, and preprocessing.
    Vision(vision::VisionArgs),
    /// Decoder prefill/decode tokens/s at the VL-1.3B LM dimensions; `--tp 2` for the
    /// communicator's overhead.
    Decoder(decoder::DecoderArgs),
    /// Vision service pipeline: encode vs cache-hit latency, batching vs max_batch 1.
    VisionService(vision_service::ServiceArgs),
    /// Decoder engine: tokens/s at 1/4/16 concurrent streams, TTFT and ITL percentiles.
    DecoderService(decoder_service::ServiceArgs),
    /// Grammar mask cost per token of structured outputs (llguidance).
    Constraint(constraint::ConstraintArgs),
    /// Multi-turn image conversations: TTFT per turn with the prefix cache on and off, and
    /// the throughput of concurrent conversations.
    PrefixCache(prefix_cache::PrefixArgs),
    /// One decode step's wall time at several batch sizes (per-sequence overhead).
    Step(step::StepArgs),
    /// Gateway overhead: the same requests through the gateway and straight to the tiers.
    Gateway(gateway::GatewayBenchArgs),
    /// Load against a running gateway: closed or open loop, TTFT / ITL / E2E percentiles,
    /// goodput under an SLO, `--sweep` for the saturation point.
    Serve(Box<serve::ServeArgs>),
    /// Many requests through the local cluster: memory, threads and descriptors of every
    /// process stable after warm-up.
    Soak(soak::SoakArgs),
    /// A checkpoint directory with random weights at a preset's dimensions, in the original
    /// layout, for serving benchmarks (`dsvl up --model DIR`).
    RandomCheckpoint(checkpoint::CheckpointArgs),
    /// The tiny model against the golden tensors on any device and dtype (scripts/gpu-check).
    Parity(parity::ParityArgs),
    /// Summarises a `scripts/gpu-check` output folder into summary.json (used by the script).
    GpuCheckSummary(gpu_summary::SummaryArgs),
    /// A worker rank of `decoder --tp N` (internal).
    #[command(hide = true)]
    DecoderWorker(decoder::WorkerArgs),
}

fn default_threads() -> usize {
    std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    // Freed activations are reused instead of refaulted (dsvl_core::allocator).
    dsvl_core::allocator::keep_freed_memory();
    // Both candle's gemm and rayon read this before their pools start.
    std::env::set_var("RAYON_NUM_THREADS", cli.threads.to_string());
    match cli.command {
        Command::Vision(args) => vision::run(args, cli.threads),
        Command::Decoder(args) => decoder::run(args, cli.threads),
        Command::VisionService(args) => vision_service::run(args, cli.threads),
        Command::DecoderService(args) => decoder_service::run(args, cli.threads),
        Command::Gateway(args) => gateway::run(args),
        Command::Step(args) => step::run(args),
        Command::Constraint(args) => constraint::run(args),
        Command::PrefixCache(args) => prefix_cache::run(args, cli.threads),
        Command::Serve(args) => serve::run(*args),
        Command::RandomCheckpoint(args) => checkpoint::run(args),
        Command::Soak(args) => soak::run(args),
        Command::Parity(args) => parity::run(args),
        Command::GpuCheckSummary(args) => gpu_summary::run(args),
        Command::DecoderWorker(args) => decoder::worker(args),
    }
}
