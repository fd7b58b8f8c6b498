//! `dsvl-bench decoder-service`: the decoder engine (continuous batching, paged KV, the same
//! engine thread the service runs, minus gRPC) at the DeepSeek-VL-1.3B LM dimensions with
//! random weights on the CPU: total tokens/s with 1, 4 and 16 concurrent streams, and TTFT and
//! inter-token latency percentiles.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use candle_core::{DType, Device};
use clap::Args;
use dsvl_engine::blocks::BlockManager;
use dsvl_engine::engine::spawn_engine;
use dsvl_engine::scheduler::{Event, NewRequest, Scheduler, SchedulerConfig};
use dsvl_engine::SamplingParams;
use dsvl_models::llm::{DeepSeekLlm, PagedKvConfig, Shard, ShardRunner};
use dsvl_parallel::LinkSet;

use crate::decoder::vl13b_lm_config;
use crate::random;

/// Arguments of `dsvl-bench decoder-service`.
#[derive(Args)]
pub struct ServiceArgs {
    /// Concurrency levels.
    #[arg(long, value_delimiter = ',', default_value = "1,4,16")]
    streams: Vec<usize>,
    /// Prompt tokens per stream.
    #[arg(long, default_value_t = 64)]
    prompt_len: usize,
    /// New tokens per stream.
    #[arg(long, default_value_t = 32)]
    new_tokens: usize,
}

fn percentile(mut v: Vec<f64>, p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark.
pub fn run(args: ServiceArgs, threads: usize) -> Result<()> {
    let cfg = vl13b_lm_config()?;
    let kv = PagedKvConfig { num_blocks: 256, block_size: PagedKvConfig::DEFAULT_BLOCK_SIZE };
    let max_positions = cfg.max_position_embeddings;
    let (engine, _join) = spawn_engine(
        move || {
            let model = DeepSeekLlm::new(
                &cfg,
                Shard::SINGLE,
                random::var_builder(DType::F32, &Device::Cpu),
            )?;
            let store = model.kv_pool(kv)?;
            let runner =
                ShardRunner::new(model, store, Arc::new(LinkSet::Single), Duration::from_secs(600));
            let sched = Scheduler::new(
                SchedulerConfig { max_num_seqs: 64, max_batched_tokens: 4096, max_positions },
                BlockManager::new(kv.num_blocks, kv.block_size),
            );
            Ok((runner, sched))
        },
        dsvl_core::watchdog::Watchdog::new("bench"),
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    for &n in &args.streams {
        let t = Instant::now();
        let mut receivers = Vec::new();
        for i in 0..n {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let prompt =
                (0..args.prompt_len).map(|j| ((j * 7919 + i * 104_729) % 100_000) as u32).collect();
            engine
                .submit(NewRequest {
                    prompt,
                    image: None,
                    params: SamplingParams::greedy(),
                    max_new_tokens: args.new_tokens,
                    stop_ids: vec![],
                    logprobs: false,
                    deadline: None,
                    keep_logits: false,
                    events: tx,
                })
                .map_err(|_| anyhow::anyhow!("engine gone"))?;
            receivers.push(rx);
        }
        let (ttft, itl, tokens) = rt.block_on(async {
            let mut tasks = Vec::new();
            for mut rx in receivers {
                tasks.push(tokio::spawn(async move {
                    let (mut first, mut last, mut gaps, mut count) =
                        (None, None, Vec::new(), 0usize);
                    while let Some(ev) = rx.recv().await {
                        match ev {
                            Event::Token { .. } => {
                                let now = Instant::now();
                                if first.is_none() {
                                    first = Some(now);
                                }
                                if let Some(prev) = last {
                                    gaps.push(now.duration_since(prev).as_secs_f64());
                                }
                                last = Some(now);
                                count += 1;
                            }
                            Event::Finished { .. } | Event::Failed(_) => break,
                            Event::PromptLogits(_) => {}
                        }
                    }
                    (first, gaps, count)
                }));
            }
            let (mut ttft, mut itl, mut tokens) = (Vec::new(), Vec::new(), 0);
            for task in tasks {
                let (first, gaps, count) = task.await.expect("stream task");
                if let Some(f) = first {
                    ttft.push(f.duration_since(t).as_secs_f64());
                }
                itl.extend(gaps);
                tokens += count;
            }
            (ttft, itl, tokens)
        });
        let secs = t.elapsed().as_secs_f64();
        eprintln!("{n} streams: {tokens} tokens in {secs:.1}s");
        rows.push((n, tokens as f64 / secs, ttft, itl));
    }
    println!("\nDecoder engine, DeepSeek-VL-1.3B LM dims, f32, CPU, {threads} threads, prompt {} + {} new tokens per stream", args.prompt_len, args.new_tokens);
    println!(
        "{:>8} {:>12} {:>8} {:>10} {:>10} {:>10} {:>10} {:>10}",
        "streams", "tokens/s", "vs 1", "TTFT p50", "TTFT p99", "ITL p50", "ITL p90", "ITL p99"
    );
    let base = rows.first().map_or(1.0, |r| r.1);
    for (n, tps, ttft, itl) in rows {
        println!(
            "{n:>8} {tps:>12.2} {:>7.2}x {:>9.2}s {:>9.2}s {:>9.3}s {:>9.3}s {:>9.3}s",
            tps / base,
            percentile(ttft.clone(), 0.5),
            percentile(ttft, 0.99),
            percentile(itl.clone(), 0.5),
            percentile(itl.clone(), 0.9),
            percentile(itl, 0.99)
        );
    }
    drop(engine);
    Ok(())
}
