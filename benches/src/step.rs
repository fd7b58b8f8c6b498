//! `dsvl-bench step`: the wall time of one decode step of `B` sequences that each hold `C`
//! tokens of context, on a real checkpoint (the bundled tiny model by default). On the tiny
//! model compute is negligible, so the figure is the step's fixed and per-sequence overhead:
//! what a launch-bound GPU step would pay. Prints one JSON object per batch size with `--json`.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use clap::Args;
use dsvl_core::{DeviceSpec, WeightDType};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{DeepSeekLlm, PagedKvConfig, Shard, ShardRunner, StepPlan};
use dsvl_parallel::LinkSet;

use crate::decoder::chunks;

/// Arguments of `dsvl-bench step`.
#[derive(Args)]
pub struct StepArgs {
    /// Checkpoint directory (the bundled tiny model when absent).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Batch sizes (sequences decoding together).
    #[arg(long, value_delimiter = ',', default_value = "1,16,64")]
    batches: Vec<usize>,
    /// Tokens of context each sequence holds.
    #[arg(long, default_value_t = 512)]
    context: usize,
    /// Timed decode steps per batch size (the median is reported).
    #[arg(long, default_value_t = 20)]
    steps: usize,
    /// Working dtype.
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// Device.
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// One JSON object per batch size instead of a table.
    #[arg(long)]
    json: bool,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Runs the benchmark.
pub fn run(args: StepArgs) -> Result<()> {
    ensure!(args.steps > 0 && args.context > 0, "--steps and --context must be at least 1");
    let source = args.model.clone().map_or(ModelSource::Bundled, ModelSource::Dir);
    let ckpt = Checkpoint::open(&source)?;
    let device = open_device(args.device)?;
    let model = DeepSeekLlm::load(&ckpt, candle_dtype(args.dtype), &device, Shard::SINGLE, None)?;
    let vocab = model.config().vocab_size as u32;
    let in_vocab = |mut plan: Vec<dsvl_models::llm::SeqChunk>| {
        for c in &mut plan {
            c.tokens.iter_mut().for_each(|t| *t %= vocab);
        }
        plan
    };
    let bs = PagedKvConfig::DEFAULT_BLOCK_SIZE;
    let per_seq = (args.context + args.steps + 1).div_ceil(bs);
    let most = args.batches.iter().copied().max().unwrap_or(1);
    let pool = model.kv_pool(PagedKvConfig { num_blocks: most * per_seq, block_size: bs })?;
    let mut runner = ShardRunner::new(
        model,
        pool,
        std::sync::Arc::new(LinkSet::Single),
        std::time::Duration::from_secs(600),
    );
    if !args.json {
        println!("decode step, {} tokens of context per sequence:", args.context);
    }
    for &b in &args.batches {
        // Fill the context (untimed), a few sequences per step to bound the activations.
        let group = (8192 / args.context).clamp(1, b);
        for first in (0..b).step_by(group) {
            let n = group.min(b - first);
            let mut plan = in_vocab(chunks(b, args.context, 0, 0, 0, per_seq));
            plan.drain(..first);
            plan.truncate(n);
            runner.lead_step(&StepPlan { chunks: plan, ..StepPlan::default() })?;
        }
        let mut times = Vec::with_capacity(args.steps);
        for s in 0..args.steps {
            let plan = StepPlan {
                chunks: in_vocab(chunks(b, 1, args.context + s, 0, s as u64 + 1, per_seq)),
                ..StepPlan::default()
            };
            let t = Instant::now();
            runner.lead_step(&plan)?;
            times.push(t.elapsed().as_secs_f64() * 1e3);
        }
        runner.lead_step(&StepPlan { free: (0..b as u64).collect(), ..StepPlan::default() })?;
        let ms = median(times);
        if args.json {
            println!("{}", serde_json::json!({"batch": b, "context": args.context, "step_ms": ms}));
        } else {
            println!("  batch {b:>4}: {ms:>9.3} ms/step");
        }
    }
    Ok(())
}
