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
use dsvl_engine::engine::{spawn_engine, EngineHandle};
use dsvl_engine::sampler::SamplingParams;
use dsvl_engine::scheduler::{Event, NewRequest, Scheduler, SchedulerConfig};
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
    /// Step token budget (chunked prefill).
    #[arg(long, default_value_t = dsvl_engine::scheduler::DEFAULT_MAX_BATCHED_TOKENS_CPU)]
    max_batched_tokens: usize,
    /// Pace guard (see `dsvl-decoder --max-step-stretch`; 0: off).
    #[arg(long, default_value_t = dsvl_engine::scheduler::DEFAULT_MAX_STEP_STRETCH_CPU)]
    max_step_stretch: f64,
    /// Then: a prompt of this many images (576 rows each, random) arriving while 4 streams
    /// decode; reports its TTFT and the streams' inter-token gaps around it (0: skip).
    #[arg(long, default_value_t = 1)]
    late_images: usize,
    /// Sampling temperature of the streams (0: greedy). Above 0 each stream samples from the
    /// whole 102,400-token vocabulary with its own seed (no top-k or top-p).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
}

/// The decoder engine thread at the VL-1.3B LM dimensions, random f32 weights, on the CPU,
/// with `kv_blocks` blocks of 32 tokens.
pub fn vl13b_engine(
    kv_blocks: usize,
    max_batched_tokens: usize,
    max_step_stretch: Option<f64>,
    prefix_cache: bool,
) -> Result<(EngineHandle, std::thread::JoinHandle<Result<(), dsvl_models::ModelError>>)> {
    let cfg = vl13b_lm_config()?;
    let kv = PagedKvConfig { num_blocks: kv_blocks, block_size: PagedKvConfig::DEFAULT_BLOCK_SIZE };
    let max_positions = cfg.max_position_embeddings;
    Ok(spawn_engine(
        move || {
            let model = DeepSeekLlm::new(
                &cfg,
                Shard::SINGLE,
                random::var_builder(DType::F32, &Device::Cpu),
            )?;
            let pool = model.kv_pool(kv)?;
            let runner =
                ShardRunner::new(model, pool, Arc::new(LinkSet::Single), Duration::from_secs(600));
            let sched = Scheduler::new(
                SchedulerConfig {
                    max_num_seqs: 64,
                    max_batched_tokens,
                    max_positions,
                    max_step_stretch,
                },
                BlockManager::new(kv.num_blocks, kv.block_size).with_prefix_cache(prefix_cache),
            );
            Ok((runner, sched))
        },
        dsvl_core::watchdog::Watchdog::new("bench"),
    )?)
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
    let (engine, _join) = vl13b_engine(
        256,
        args.max_batched_tokens,
        Some(args.max_step_stretch).filter(|&x| x > 0.0),
        true,
    )?;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let mut rows = Vec::new();
    for &n in &args.streams {
        let t = Instant::now();
        let mut receivers = Vec::new();
        for i in 0..n {
            let prompt =
                (0..args.prompt_len).map(|j| ((j * 7919 + i * 104_729) % 100_000) as u32).collect();
            let (mut req, rx) = NewRequest::greedy(prompt, None, args.new_tokens);
            if args.temperature > 0.0 {
                req.params = SamplingParams {
                    temperature: args.temperature,
                    seed: i as u64,
                    ..SamplingParams::DEFAULTS
                };
            }
            engine.submit(req).map_err(|_| anyhow::anyhow!("engine gone"))?;
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
                            Event::PromptLogits(_) | Event::PromptLogprobs(_) => {}
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
    if args.late_images > 0 {
        late_image_prompt(&engine, &rt, &args)?;
    }
    drop(engine);
    Ok(())
}

/// Token arrival times of one stream.
async fn arrivals(
    mut rx: tokio::sync::mpsc::UnboundedReceiver<Event>,
    count: Arc<std::sync::atomic::AtomicUsize>,
) -> Vec<Instant> {
    let mut times = Vec::new();
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { .. } => {
                times.push(Instant::now());
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            }
            Event::Finished { .. } | Event::Failed(_) => break,
            Event::PromptLogits(_) | Event::PromptLogprobs(_) => {}
        }
    }
    times
}

/// Four decoding streams; once they run, a prompt of `late_images` images arrives. Prints its
/// TTFT and the running streams' inter-token gaps before it and while it is prefilled.
fn late_image_prompt(
    engine: &dsvl_engine::engine::EngineHandle,
    rt: &tokio::runtime::Runtime,
    args: &ServiceArgs,
) -> Result<()> {
    let cfg = vl13b_lm_config()?;
    let submit = |prompt: Vec<u32>, image, max_new| {
        let (req, rx) = NewRequest::greedy(prompt, image, max_new);
        engine.submit(req).map_err(|_| anyhow::anyhow!("engine gone"))?;
        anyhow::Ok(rx)
    };
    let streams: Vec<_> = (0..4)
        .map(|i| {
            submit(
                (0..args.prompt_len).map(|j| ((j * 31 + i * 7) % 1000) as u32).collect(),
                None,
                64,
            )
        })
        .collect::<Result<_>>()?;
    let counts: Vec<_> = (0..4).map(|_| Arc::new(std::sync::atomic::AtomicUsize::new(0))).collect();
    let tasks: Vec<_> =
        streams.into_iter().zip(&counts).map(|(rx, c)| rt.spawn(arrivals(rx, c.clone()))).collect();
    // The image prompt arrives once every stream has decoded a few tokens.
    while counts.iter().any(|c| c.load(std::sync::atomic::Ordering::SeqCst) < 4) {
        std::thread::sleep(Duration::from_millis(20));
    }
    const IMAGE_TOKEN: u32 = 100_015;
    let mut prompt: Vec<u32> = (0..32).map(|j| j + 10).collect();
    for _ in 0..args.late_images {
        prompt.extend(std::iter::repeat_n(IMAGE_TOKEN, 576));
    }
    prompt.extend((0..16).map(|j| j + 50));
    let rows = candle_core::Tensor::randn(
        0f32,
        1.0,
        (args.late_images * 576, cfg.hidden_size),
        &Device::Cpu,
    )?;
    let image = dsvl_models::llm::ImageRows::for_image_tokens(&prompt, IMAGE_TOKEN, rows)?;
    let arrived = Instant::now();
    let late = rt.spawn(arrivals(submit(prompt, Some(image), 4)?, Arc::default()));
    let late = rt.block_on(late)?;
    let first = *late.first().ok_or_else(|| anyhow::anyhow!("the image prompt got no token"))?;
    let (mut before, mut during) = (Vec::new(), Vec::new());
    for task in tasks {
        let times = rt.block_on(task)?;
        for w in times.windows(2) {
            let gap = w[1].duration_since(w[0]).as_secs_f64();
            if w[1] <= arrived {
                before.push(gap);
            } else if w[0] < first {
                during.push(gap);
            }
        }
    }
    println!(
        "\nA {}-image prompt ({} tokens) arriving while 4 streams decode, step budget {} tokens, \
         step stretch {}:",
        args.late_images,
        args.late_images * 576 + 48,
        args.max_batched_tokens,
        args.max_step_stretch
    );
    println!("  its TTFT: {:.2}s", first.duration_since(arrived).as_secs_f64());
    for (name, gaps) in [("before it", before), ("during its prefill", during)] {
        println!(
            "  running streams' inter-token gap {name}: p50 {:.3}s  p90 {:.3}s  max {:.3}s ({} gaps)",
            percentile(gaps.clone(), 0.5),
            percentile(gaps.clone(), 0.9),
            percentile(gaps.clone(), 1.0),
            gaps.len()
        );
    }
    Ok(())
}
