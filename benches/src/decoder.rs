//! `dsvl-bench decoder`: prefill and decode tokens/s of the DeepSeek LLM decoder at the
//! DeepSeek-VL-1.3B language-model dimensions (random weights, f32, CPU), alternating rounds
//! with `transformers`' `LlamaForCausalLM`; and, with `--tp 2`, the same group split over two
//! rank processes on loopback (the TCP communicator's overhead).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use dsvl_engine::group::{
    kv_from_welcome, lead_group, run_worker, with_kv_pool, GroupTimeouts, LocalWorkers, RankLaunch,
};
use dsvl_models::llm::{
    DeepSeekLlm, LlmConfig, PagedKvConfig, SeqChunk, Shard, ShardRunner, StepPlan,
};
use dsvl_parallel::GroupSpec;
use serde_json::json;

use crate::random;
use crate::reference::{print_table, Reference, Row};

const TAG: &str = "dsvl-bench-decoder";

/// The VL-1.3B language model's config.
pub fn vl13b_lm_config() -> Result<LlmConfig> {
    Ok(LlmConfig::from_json(
        json!({"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16,
               "num_key_value_heads": 16, "vocab_size": 102400, "max_position_embeddings": 16384}),
        "",
    )?)
}

/// Arguments of `dsvl-bench decoder`.
#[derive(Args)]
pub struct DecoderArgs {
    /// Batch sizes (concurrent sequences).
    #[arg(long, value_delimiter = ',', default_value = "1,8")]
    batches: Vec<usize>,
    /// Prompt (context) length per sequence.
    #[arg(long, default_value_t = 128)]
    prompt_len: usize,
    /// Decode steps timed per round.
    #[arg(long, default_value_t = 8)]
    steps: usize,
    /// Alternating rounds per measurement.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Tensor-parallel ranks (processes); each uses --threads threads.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Skip the PyTorch reference.
    #[arg(long)]
    no_reference: bool,
}

/// Arguments of the hidden worker rank.
#[derive(Args)]
pub struct WorkerArgs {
    #[arg(long)]
    leader: String,
    #[arg(long)]
    rank: usize,
    #[arg(long)]
    world_size: usize,
    /// `RankLaunch`'s convention (this benchmark runs on the CPU only).
    #[arg(long, default_value_t = 0)]
    local_rank: usize,
    #[arg(long, default_value = "cpu")]
    device: dsvl_core::DeviceSpec,
    #[arg(long)]
    die_with_parent: bool,
}

fn spec(world: usize, rank: usize, leader: &str) -> GroupSpec {
    GroupSpec {
        world_size: world,
        rank,
        leader_addr: leader.into(),
        rendezvous_timeout: Duration::from_secs(300),
        collective_timeout: Duration::from_secs(600),
        tag: TAG.into(),
    }
}

/// Runs a worker rank with random weights.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let cfg = vl13b_lm_config()?;
    let shard = Shard { rank: args.rank, world: args.world_size };
    if args.die_with_parent {
        dsvl_engine::group::die_with_parent();
    }
    anyhow::ensure!(
        dsvl_engine::group::device_for(args.device, args.local_rank) == dsvl_core::DeviceSpec::Cpu,
        "the decoder benchmark runs on the CPU"
    );
    run_worker(
        &spec(args.world_size, args.rank, &args.leader),
        GroupTimeouts::default(),
        &Device::Cpu,
        |extra| {
            let kv = kv_from_welcome(extra)?;
            with_kv_pool(
                DeepSeekLlm::new(&cfg, shard, random::var_builder(DType::F32, &Device::Cpu))?,
                kv,
            )
        },
    )?;
    Ok(())
}

/// Blocks per sequence: room for the prompt, the timed decode steps and one more.
fn blocks_per_seq(prompt_len: usize, steps: usize) -> usize {
    (prompt_len + steps + 1).div_ceil(PagedKvConfig::DEFAULT_BLOCK_SIZE)
}

/// Batch slot `i` owns blocks `[i * per_seq, (i + 1) * per_seq)` of the pool (every round
/// reuses them: the benchmark's sequences never outlive their round).
pub fn chunks(
    batch: usize,
    len: usize,
    start: usize,
    seq0: u64,
    step: u64,
    per_seq: usize,
) -> Vec<SeqChunk> {
    (0..batch)
        .map(|i| SeqChunk {
            seq: seq0 + i as u64,
            tokens: (0..len)
                .map(|t| ((t as u64 * 7919 + i as u64 * 104729 + step * 31) % 100_000) as u32)
                .collect(),
            start,
            blocks: (i * per_seq..(i + 1) * per_seq).map(|b| b as u32).collect(),
            ..SeqChunk::default()
        })
        .collect()
}

/// Prefill tokens/s for `batch` fresh sequences of `len` tokens.
fn prefill(
    runner: &mut ShardRunner,
    batch: usize,
    len: usize,
    seq0: u64,
    per_seq: usize,
) -> Result<f64> {
    let t = Instant::now();
    runner.lead_step(&StepPlan {
        chunks: chunks(batch, len, 0, seq0, 0, per_seq),
        ..Default::default()
    })?;
    let tps = (batch * len) as f64 / t.elapsed().as_secs_f64();
    runner.lead_step(&StepPlan {
        free: (seq0..seq0 + batch as u64).collect(),
        ..Default::default()
    })?;
    Ok(tps)
}

/// Decode tokens/s: prefill `len` (untimed), then `steps` one-token steps for every sequence.
fn decode(
    runner: &mut ShardRunner,
    batch: usize,
    len: usize,
    steps: usize,
    seq0: u64,
    per_seq: usize,
) -> Result<(f64, f64)> {
    runner.lead_step(&StepPlan {
        chunks: chunks(batch, len, 0, seq0, 0, per_seq),
        ..Default::default()
    })?;
    let t = Instant::now();
    for s in 0..steps {
        runner.lead_step(&StepPlan {
            chunks: chunks(batch, 1, len + s, seq0, s as u64 + 1, per_seq),
            ..Default::default()
        })?;
    }
    let secs = t.elapsed().as_secs_f64();
    runner.lead_step(&StepPlan {
        free: (seq0..seq0 + batch as u64).collect(),
        ..Default::default()
    })?;
    Ok(((batch * steps) as f64 / secs, secs / steps as f64))
}

/// Runs the benchmark.
pub fn run(args: DecoderArgs, threads: usize) -> Result<()> {
    let cfg = vl13b_lm_config()?;
    cfg.check_tensor_parallel(args.tp)?;
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let exe = std::env::current_exe()?;
    let commands = RankLaunch {
        program: exe,
        mode: vec!["--threads".into(), threads.to_string(), "decoder-worker".into()],
        leader: addr.clone(),
        world: args.tp,
        base_device: dsvl_core::DeviceSpec::Cpu,
        extra: vec![],
    }
    .commands(0, args.tp);
    let _workers = LocalWorkers::spawn(commands).context("cannot start worker ranks")?;
    let shard = Shard { rank: 0, world: args.tp };
    let per_seq = blocks_per_seq(args.prompt_len.max(16), args.steps);
    let most = args.batches.iter().copied().max().unwrap_or(1);
    let kv =
        PagedKvConfig { num_blocks: most * per_seq, block_size: PagedKvConfig::DEFAULT_BLOCK_SIZE };
    let mut runner = lead_group(
        &listener,
        &spec(args.tp, 0, &addr),
        GroupTimeouts::default(),
        json!({ "kv": kv }),
        &Device::Cpu,
        || {
            with_kv_pool(
                DeepSeekLlm::new(&cfg, shard, random::var_builder(DType::F32, &Device::Cpu))?,
                kv,
            )
        },
    )?;
    let mut reference = if args.no_reference || args.tp > 1 {
        None
    } else {
        Some(Reference::start("decoder_reference.py", &["--threads".into(), threads.to_string()])?)
    };
    prefill(&mut runner, 1, 16, 1_000_000, per_seq)?; // warm-up

    let mut rows = Vec::new();
    let mut step_ms = Vec::new();
    for &b in &args.batches {
        let mut pre = Row {
            name: format!("prefill b{b} x{} tokens/s", args.prompt_len),
            ours: vec![],
            theirs: vec![],
        };
        let mut dec = Row { name: format!("decode b{b} tokens/s"), ours: vec![], theirs: vec![] };
        let mut ms = Vec::new();
        for round in 0..args.rounds {
            let seq0 = (round * 1000) as u64;
            pre.ours.push(prefill(&mut runner, b, args.prompt_len, seq0, per_seq)?);
            if let Some(r) = &mut reference {
                pre.theirs.push(
                    r.call(json!({"op": "prefill", "batch": b, "prompt_len": args.prompt_len}))?
                        ["tokens_per_s"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                );
            }
            let (tps, secs) =
                decode(&mut runner, b, args.prompt_len, args.steps, seq0 + 500, per_seq)?;
            dec.ours.push(tps);
            ms.push(secs * 1e3);
            if let Some(r) = &mut reference {
                dec.theirs.push(
                    r.call(json!({"op": "decode", "batch": b, "prompt_len": args.prompt_len, "steps": args.steps}))?["tokens_per_s"]
                        .as_f64()
                        .unwrap_or(f64::NAN),
                );
            }
            eprintln!("batch {b}: round {}/{} done", round + 1, args.rounds);
        }
        step_ms.push((b, crate::reference::median(ms)));
        rows.push(pre);
        rows.push(dec);
    }
    runner.shutdown();
    print_table(
        &format!("DeepSeek LLM decoder at VL-1.3B dims, f32, CPU, TP {} x {threads} threads (random weights)", args.tp),
        &rows,
    );
    for (b, ms) in step_ms {
        println!("decode step time b{b}: {ms:.1} ms (TP {})", args.tp);
    }
    if let Some(r) = &reference {
        println!(
            "reference: torch {} ({} threads), transformers LlamaForCausalLM (eager)",
            r.hello["torch"], r.hello["threads"]
        );
    }
    Ok(())
}
