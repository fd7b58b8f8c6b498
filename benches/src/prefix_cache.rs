//! `dsvl-bench prefix-cache`: what the prefix cache saves on multi-turn image conversations, at
//! the DeepSeek-VL-1.3B LM dimensions with random weights on the CPU (the decoder engine the
//! service runs, minus gRPC). A conversation is one image (576 random rows) plus text, then
//! turns that each append the previous answer and a new user message: every turn's prompt
//! starts with the whole previous turn, as a chat client re-sends it.
//!
//! Reported: the time to first token of each turn with the cache on and with it off (one
//! conversation alone), and the throughput of `--conversations` concurrent conversations with
//! the cache on (and off with `--throughput-off`: slow, every turn prefills everything again).

use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, Result};
use candle_core::{Device, Tensor};
use clap::Args;
use dsvl_core::prefix::{image_key_hash, ImageSpan};
use dsvl_engine::engine::EngineHandle;
use dsvl_engine::scheduler::{Event, NewRequest, PrefixKey};
use dsvl_models::llm::ImageRows;

use crate::decoder::vl13b_lm_config;

/// Arguments of `dsvl-bench prefix-cache`.
#[derive(Args)]
pub struct PrefixArgs {
    /// Turns per conversation.
    #[arg(long, default_value_t = 4)]
    turns: usize,
    /// Text tokens of the first message around the image, and of every later user message.
    #[arg(long, default_value_t = 48)]
    turn_tokens: usize,
    /// New tokens per answer.
    #[arg(long, default_value_t = 16)]
    new_tokens: usize,
    /// Concurrent conversations of the throughput run (0: skip it).
    #[arg(long, default_value_t = 16)]
    conversations: usize,
    /// Also run the throughput with the cache off.
    #[arg(long)]
    throughput_off: bool,
    /// KV pool in blocks of 32 tokens (f32 at 1.3B dims: 12 MiB per block).
    #[arg(long, default_value_t = 640)]
    kv_blocks: usize,
}

const IMAGE_TOKEN: u32 = 100_015;
const IMAGE_ROWS: usize = 576;

fn engine(kv_blocks: usize, prefix_cache: bool) -> Result<EngineHandle> {
    let max_batched = dsvl_engine::scheduler::DEFAULT_MAX_BATCHED_TOKENS_CPU;
    Ok(crate::decoder_service::vl13b_engine(kv_blocks, max_batched, None, prefix_cache)?.0)
}

/// One conversation: its image and the prompt so far.
struct Conversation {
    id: usize,
    rows: Tensor,
    prompt: Vec<u32>,
    image_start: usize,
}

impl Conversation {
    fn new(id: usize, turn_tokens: usize, hidden: usize) -> Result<Self> {
        let text = |n: usize, salt: usize| -> Vec<u32> {
            (0..n).map(|j| ((j * 7919 + salt * 104_729) % 100_000) as u32).collect()
        };
        let half = turn_tokens / 2;
        let mut prompt = text(half, id);
        let image_start = prompt.len();
        prompt.extend(std::iter::repeat_n(IMAGE_TOKEN, IMAGE_ROWS));
        prompt.extend(text(turn_tokens - half, id + 1000));
        let rows = Tensor::randn(0f32, 0.02, (IMAGE_ROWS, hidden), &Device::Cpu)?;
        Ok(Self { id, rows, prompt, image_start })
    }

    fn request(&self, max_new: usize) -> (NewRequest, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let positions =
            (self.image_start..self.image_start + IMAGE_ROWS).map(|p| p as u32).collect();
        let image = ImageRows { positions, rows: self.rows.clone() };
        let (mut req, rx) = NewRequest::greedy(self.prompt.clone(), Some(image), max_new);
        req.prefix = PrefixKey {
            salt: b"bench".to_vec(),
            images: vec![ImageSpan {
                start: self.image_start,
                len: IMAGE_ROWS,
                key: image_key_hash(format!("image-{}", self.id).as_bytes()),
            }],
        };
        (req, rx)
    }

    /// Appends the answer and the next user message.
    fn next_turn(&mut self, answer: &[u32], turn: usize, turn_tokens: usize) {
        self.prompt.extend(answer);
        self.prompt.extend(
            (0..turn_tokens).map(|j| ((j * 31 + turn * 977 + self.id * 13) % 100_000) as u32),
        );
    }
}

/// One turn: (TTFT seconds, answer, cached tokens).
async fn turn(
    engine: &EngineHandle,
    conv: &Conversation,
    max_new: usize,
) -> Result<(f64, Vec<u32>, usize)> {
    let t = Instant::now();
    let (req, mut rx) = conv.request(max_new);
    if engine.submit(req).is_err() {
        bail!("engine gone");
    }
    let (mut ttft, mut answer) = (None, Vec::new());
    while let Some(ev) = rx.recv().await {
        match ev {
            Event::Token { id, .. } => {
                ttft.get_or_insert(t.elapsed().as_secs_f64());
                answer.push(id);
            }
            Event::Finished { usage, .. } => {
                return Ok((ttft.unwrap_or(f64::NAN), answer, usage.cached_tokens))
            }
            Event::Failed(f) => bail!("{f:?}"),
            Event::PromptLogits(_) | Event::PromptLogprobs(_) => {}
        }
    }
    bail!("the stream ended without a finish")
}

/// TTFT of each turn of one conversation alone.
fn ttft_per_turn(
    rt: &tokio::runtime::Runtime,
    args: &PrefixArgs,
    on: bool,
) -> Result<Vec<(f64, usize, usize)>> {
    let hidden = vl13b_lm_config()?.hidden_size;
    let engine = engine(args.kv_blocks, on)?;
    let mut conv = Conversation::new(0, args.turn_tokens, hidden)?;
    let mut out = Vec::new();
    for t in 0..args.turns {
        let (ttft, answer, cached) = rt.block_on(turn(&engine, &conv, args.new_tokens))?;
        eprintln!(
            "cache {}: turn {} prompt {} cached {cached} TTFT {ttft:.2}s",
            if on { "on" } else { "off" },
            t + 1,
            conv.prompt.len()
        );
        out.push((ttft, conv.prompt.len(), cached));
        conv.next_turn(&answer, t, args.turn_tokens);
    }
    engine.shutdown();
    Ok(out)
}

/// Turns per second and prompt tokens per second of `n` concurrent conversations.
fn throughput(
    rt: &tokio::runtime::Runtime,
    args: &PrefixArgs,
    on: bool,
) -> Result<(f64, f64, f64)> {
    let hidden = vl13b_lm_config()?.hidden_size;
    let engine = Arc::new(engine(args.kv_blocks, on)?);
    let t = Instant::now();
    let (turns, prompt, cached) = rt.block_on(async {
        let mut tasks = Vec::new();
        for c in 0..args.conversations {
            let engine = engine.clone();
            let (turns, turn_tokens, new_tokens) = (args.turns, args.turn_tokens, args.new_tokens);
            let mut conv = Conversation::new(c, turn_tokens, hidden)?;
            tasks.push(tokio::spawn(async move {
                let (mut prompt, mut cached) = (0, 0);
                for t in 0..turns {
                    let (_, answer, hit) = turn(&engine, &conv, new_tokens).await?;
                    prompt += conv.prompt.len();
                    cached += hit;
                    conv.next_turn(&answer, t, turn_tokens);
                }
                anyhow::Ok((turns, prompt, cached))
            }));
        }
        let (mut turns, mut prompt, mut cached) = (0, 0, 0);
        for task in tasks {
            let (a, b, c) = task.await??;
            turns += a;
            prompt += b;
            cached += c;
        }
        anyhow::Ok((turns, prompt, cached))
    })?;
    let secs = t.elapsed().as_secs_f64();
    engine.shutdown();
    eprintln!("cache {}: {turns} turns in {secs:.1}s", if on { "on" } else { "off" });
    Ok((turns as f64 / secs, prompt as f64 / secs, cached as f64 / prompt.max(1) as f64))
}

/// Runs the benchmark.
pub fn run(args: PrefixArgs, threads: usize) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let on = ttft_per_turn(&rt, &args, true)?;
    let off = ttft_per_turn(&rt, &args, false)?;
    println!(
        "\nPrefix cache, DeepSeek-VL-1.3B LM dims, f32, CPU, {threads} threads: one conversation \
         (1 image + {} text tokens, {} new tokens per answer, {} tokens per later message)",
        args.turn_tokens, args.new_tokens, args.turn_tokens
    );
    println!(
        "{:>5} {:>8} {:>8} {:>12} {:>12} {:>8}",
        "turn", "prompt", "cached", "TTFT on", "TTFT off", "speedup"
    );
    for (i, (a, b)) in on.iter().zip(&off).enumerate() {
        println!(
            "{:>5} {:>8} {:>8} {:>11.2}s {:>11.2}s {:>7.1}x",
            i + 1,
            a.1,
            a.2,
            a.0,
            b.0,
            b.0 / a.0
        );
    }
    if args.conversations > 0 {
        let (tps, pps, share) = throughput(&rt, &args, true)?;
        println!(
            "\n{} concurrent conversations x {} turns, cache on: {tps:.3} turns/s, {pps:.0} prompt tokens/s served, {:.1} % of prompt tokens from the cache",
            args.conversations,
            args.turns,
            share * 100.0
        );
        if args.throughput_off {
            let (tps_off, pps_off, _) = throughput(&rt, &args, false)?;
            println!(
                "{} concurrent conversations x {} turns, cache off: {tps_off:.3} turns/s, {pps_off:.0} prompt tokens/s served ({:.1}x fewer turns/s than on)",
                args.conversations,
                args.turns,
                tps / tps_off
            );
        }
    }
    Ok(())
}
