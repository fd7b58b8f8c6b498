//! `dsvl-bench decoder`: prefill and decode tokens/s of the DeepSeek LLM decoder at the
//! DeepSeek-VL-1.3B language-model dimensions (random weights, f32, CPU by default), alternating
//! rounds with `transformers`' `LlamaForCausalLM`; and, with `--tp 2`, the same group split over
//! two rank processes on loopback (the TCP communicator's overhead). With `--dims vl-7b --device
//! cuda:N --dtype bf16 --json` it is the decoder step of `scripts/gpu-check`: one JSON line per
//! batch size with tokens/s and the share of the HBM roofline (see `roofline.rs`), and the
//! reference's tokens/s on the same GPU when the host's PyTorch has it (`--reference-optional`).

use std::net::TcpListener;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use candle_core::{DType, Device};
use clap::Args;
use dsvl_core::{DeviceSpec, WeightDType};
use dsvl_engine::group::{
    device_for, kv_from_welcome, lead_group, run_worker, with_kv_pool, GroupTimeouts, LocalWorkers,
    RankLaunch,
};
use dsvl_models::device::{candle_dtype, open_device};
use dsvl_models::llm::{
    DeepSeekLlm, LlmConfig, PagedKvConfig, SeqChunk, Shard, ShardRunner, StepPlan,
};
use dsvl_parallel::{GroupKey, GroupSpec};
use serde_json::json;

use crate::dims::Dims;
use crate::machine;
use crate::random;
use crate::reference::{ask, median, print_table, ratio, Reference, Row};
use crate::roofline::{
    decoder_flops_per_token, decoder_weight_params, kv_bytes_per_token_all, Peak,
};

const TAG: &str = "dsvl-bench-decoder";

/// The VL-1.3B language model's config.
pub fn vl13b_lm_config() -> Result<LlmConfig> {
    Dims::Vl13b.lm_config()
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
    /// Go on without the reference when it cannot start or fails (its figures are then absent).
    #[arg(long)]
    reference_optional: bool,
    /// Language-model dimensions (random weights).
    #[arg(long, value_enum, default_value = "vl-1.3b")]
    dims: Dims,
    /// Working dtype (weights, activations, KV cache).
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
    /// Device of rank 0 (cpu or cuda:N; rank i uses cuda:N+i).
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    /// One JSON object per batch size (tokens/s, bytes per step, HBM share on CUDA).
    #[arg(long)]
    json: bool,
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
    /// `RankLaunch`'s convention: the node's base device and this rank's offset from it.
    #[arg(long, default_value_t = 0)]
    local_rank: usize,
    #[arg(long, default_value = "cpu")]
    device: DeviceSpec,
    #[arg(long)]
    die_with_parent: bool,
    #[arg(long, value_enum, default_value = "vl-1.3b")]
    dims: Dims,
    #[arg(long, default_value = "f32")]
    dtype: WeightDType,
}

fn spec(world: usize, rank: usize, leader: &str, key: GroupKey) -> GroupSpec {
    GroupSpec {
        world_size: world,
        rank,
        leader_addr: leader.into(),
        rendezvous_timeout: Duration::from_secs(300),
        collective_timeout: Duration::from_secs(600),
        tag: TAG.into(),
        key: Some(key),
    }
}

/// Runs a worker rank with random weights.
pub fn worker(args: WorkerArgs) -> Result<()> {
    let cfg = args.dims.lm_config()?;
    let shard = Shard { rank: args.rank, world: args.world_size };
    if args.die_with_parent {
        dsvl_engine::group::die_with_parent();
    }
    let device = open_device(device_for(args.device, args.local_rank))?;
    let dtype = candle_dtype(args.dtype);
    run_worker(
        &spec(
            args.world_size,
            args.rank,
            &args.leader,
            GroupKey::from_env()?
                .context("decoder-worker is started by its leader, which hands it the group key")?,
        ),
        GroupTimeouts::default(),
        &device,
        |extra| {
            let kv = kv_from_welcome(extra)?;
            with_kv_pool(DeepSeekLlm::new(&cfg, shard, random::var_builder(dtype, &device))?, kv)
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

/// `chunks`' token ids folded into the model's vocabulary (the tiny model has 1,024 ids; the
/// VL presets' 102,400 leave them unchanged).
fn in_vocab(runner: &ShardRunner, mut plan: Vec<SeqChunk>) -> Vec<SeqChunk> {
    let vocab = runner.model().config().vocab_size as u32;
    for c in &mut plan {
        c.tokens.iter_mut().for_each(|t| *t %= vocab);
    }
    plan
}

/// The leader's device (GPU work is asynchronous: timings synchronise with it).
fn runner_device(runner: &ShardRunner) -> Device {
    runner.model().device().clone()
}

/// Prefill tokens/s for `batch` fresh sequences of `len` tokens.
fn prefill(
    runner: &mut ShardRunner,
    batch: usize,
    len: usize,
    seq0: u64,
    per_seq: usize,
) -> Result<f64> {
    let device = runner_device(runner);
    device.synchronize()?;
    let t = Instant::now();
    runner.lead_step(&StepPlan {
        chunks: in_vocab(runner, chunks(batch, len, 0, seq0, 0, per_seq)),
        ..Default::default()
    })?;
    device.synchronize()?;
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
        chunks: in_vocab(runner, chunks(batch, len, 0, seq0, 0, per_seq)),
        ..Default::default()
    })?;
    let device = runner_device(runner);
    device.synchronize()?;
    let t = Instant::now();
    for s in 0..steps {
        runner.lead_step(&StepPlan {
            chunks: in_vocab(runner, chunks(batch, 1, len + s, seq0, s as u64 + 1, per_seq)),
            ..Default::default()
        })?;
    }
    device.synchronize()?;
    let secs = t.elapsed().as_secs_f64();
    runner.lead_step(&StepPlan {
        free: (seq0..seq0 + batch as u64).collect(),
        ..Default::default()
    })?;
    Ok(((batch * steps) as f64 / secs, secs / steps as f64))
}

/// Runs the benchmark.
pub fn run(args: DecoderArgs, threads: usize) -> Result<()> {
    ensure!(args.rounds > 0 && args.steps > 0 && !args.batches.is_empty(), "empty measurement");
    let cfg = args.dims.lm_config()?;
    cfg.check_tensor_parallel(args.tp)?;
    let dtype = candle_dtype(args.dtype);
    let with_reference = !args.no_reference && args.tp == 1;
    ensure!(
        !with_reference || matches!(dtype, DType::F32 | DType::BF16),
        "the PyTorch reference runs in f32 or bf16: add --no-reference"
    );
    let device = open_device(args.device)?;
    // The bandwidth a batch-1 decode is judged against, measured before the weights fill memory.
    let triad = if args.device == DeviceSpec::Cpu {
        eprintln!("{}", machine::describe());
        eprintln!("measuring memory bandwidth (STREAM-like triad, {threads} threads)...");
        Some(machine::triad_bandwidth(5))
    } else {
        None
    };
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let addr = listener.local_addr()?.to_string();
    let exe = std::env::current_exe()?;
    let key = GroupKey::random();
    let commands = RankLaunch {
        program: exe,
        mode: vec!["--threads".into(), threads.to_string(), "decoder-worker".into()],
        leader: addr.clone(),
        world: args.tp,
        base_device: args.device,
        extra: vec![
            "--dims".into(),
            args.dims.name().into(),
            "--dtype".into(),
            args.dtype.to_string(),
        ],
        key: Some(key.clone()),
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
        &spec(args.tp, 0, &addr, key),
        GroupTimeouts::default(),
        json!({ "kv": kv }),
        &device,
        || with_kv_pool(DeepSeekLlm::new(&cfg, shard, random::var_builder(dtype, &device))?, kv),
    )?;
    let optional = args.reference_optional;
    let mut reference = if with_reference {
        let args = [
            "--threads".into(),
            threads.to_string(),
            "--dtype".into(),
            args.dtype.to_string(),
            "--device".into(),
            args.device.to_string(),
            "--config".into(),
            llama_config(&cfg).to_string(),
        ];
        Reference::start_optional("decoder_reference.py", &args, optional)?
    } else {
        None
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
            let cmd = json!({"op": "prefill", "batch": b, "prompt_len": args.prompt_len});
            if let Some(v) = ask(&mut reference, cmd, "tokens_per_s", optional)? {
                pre.theirs.push(v);
            }
            let (tps, secs) =
                decode(&mut runner, b, args.prompt_len, args.steps, seq0 + 500, per_seq)?;
            dec.ours.push(tps);
            ms.push(secs * 1e3);
            let cmd = json!({"op": "decode", "batch": b, "prompt_len": args.prompt_len,
                             "steps": args.steps});
            if let Some(v) = ask(&mut reference, cmd, "tokens_per_s", optional)? {
                dec.theirs.push(v);
            }
            eprintln!("batch {b}: round {}/{} done", round + 1, args.rounds);
        }
        step_ms.push((b, median(ms)));
        rows.push(pre);
        rows.push(dec);
    }
    runner.shutdown();
    if args.json {
        for (i, &(b, ms)) in step_ms.iter().enumerate() {
            let (pre, dec) =
                (median(rows[2 * i].ours.clone()), median(rows[2 * i + 1].ours.clone()));
            let mut line = figures(&args, &cfg, b, [ms, pre, dec], triad);
            let (pre_row, dec_row) = (&rows[2 * i], &rows[2 * i + 1]);
            line["reference_prefill_tokens_per_s"] =
                json!(ratio(pre_row).map(|_| median(pre_row.theirs.clone())));
            line["reference_decode_tokens_per_s"] =
                json!(ratio(dec_row).map(|_| median(dec_row.theirs.clone())));
            line["prefill_ratio"] = json!(ratio(pre_row));
            line["decode_ratio"] = json!(ratio(dec_row));
            line["reference"] = json!(reference.as_ref().map(|r| r.hello.clone()));
            println!("{line}");
        }
        return Ok(());
    }
    print_table(
        &format!(
            "DeepSeek LLM decoder at {} dims, {}, {}, TP {} x {threads} threads (random weights)",
            args.dims.name(),
            args.dtype,
            args.device,
            args.tp
        ),
        &rows,
    );
    for (b, ms) in step_ms {
        let gb_per_s = bytes_per_step(&args, &cfg, b) / (ms / 1e3) / 1e9;
        print!("decode step time b{b}: {ms:.1} ms (TP {}), moves {gb_per_s:.1} GB/s", args.tp);
        match triad {
            Some(t) => println!(" = {:.0} % of the triad", 100.0 * gb_per_s / (t / 1e9)),
            None => println!(),
        }
    }
    if let Some(t) = triad {
        println!("memory bandwidth, STREAM-like f32 triad, {threads} threads: {:.1} GB/s", t / 1e9);
        println!("{}", machine::describe());
    }
    if let Some(r) = &reference {
        println!(
            "reference: torch {} ({} threads, {}), transformers LlamaForCausalLM (eager)",
            r.hello["torch"], r.hello["threads"], r.hello["dtype"]
        );
    }
    Ok(())
}

/// The language model's dimensions as `transformers.LlamaConfig` fields, so the reference
/// builds the same model whatever the preset.
fn llama_config(cfg: &LlmConfig) -> serde_json::Value {
    json!({
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
        "rms_norm_eps": cfg.rms_norm_eps, "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_position_embeddings,
        "tie_word_embeddings": cfg.tie_word_embeddings,
    })
}

/// One batch size's JSON line: tokens/s, and what a decode step moves (weights + the KV it
/// reads) against the HBM roofline, and prefill FLOPs against the peak (CUDA only).
fn figures(
    args: &DecoderArgs,
    cfg: &LlmConfig,
    batch: usize,
    times: [f64; 3],
    triad: Option<f64>,
) -> serde_json::Value {
    let [step_ms, prefill_tps, decode_tps] = times;
    let dtype = candle_dtype(args.dtype);
    let peak = Peak::for_device(args.device != DeviceSpec::Cpu, dtype);
    let weight_bytes = decoder_weight_params(cfg) * dtype.size_in_bytes() as f64;
    let kv_bytes = bytes_per_step(args, cfg, batch) - weight_bytes;
    let bytes_per_s = (weight_bytes + kv_bytes) / (step_ms / 1e3);
    // A causal prompt's tokens attend to half of it on average.
    let prefill_flops_per_s =
        prefill_tps * decoder_flops_per_token(cfg, args.prompt_len as f64 / 2.0);
    json!({
        "bench": "decoder", "dims": args.dims.name(), "device": args.device.to_string(),
        "dtype": args.dtype.to_string(), "tp": args.tp, "batch": batch,
        "prompt_len": args.prompt_len, "steps": args.steps, "rounds": args.rounds,
        "prefill_tokens_per_s": prefill_tps, "decode_tokens_per_s": decode_tps,
        "decode_step_ms": step_ms, "weight_gb": weight_bytes / 1e9,
        "kv_gb_read_per_step": kv_bytes / 1e9, "achieved_gb_per_s": bytes_per_s / 1e9,
        "hbm_roofline_share": Peak::hbm_share(peak, bytes_per_s),
        "prefill_mfu": Peak::mfu(peak, prefill_flops_per_s),
        "triad_gb_per_s": triad.map(|t| t / 1e9),
        "triad_share": triad.map(|t| bytes_per_s / t),
        "processor": machine::processor_model(),
    })
}

/// Bytes one decode step must read: every weight once, and the KV cache of the batch.
fn bytes_per_step(args: &DecoderArgs, cfg: &LlmConfig, batch: usize) -> f64 {
    let dtype = candle_dtype(args.dtype);
    // Step s of the timed decode attends to prompt_len + s + 1 positions.
    let context = args.prompt_len as f64 + (args.steps as f64 + 1.0) / 2.0;
    decoder_weight_params(cfg) * dtype.size_in_bytes() as f64
        + batch as f64 * context * kv_bytes_per_token_all(cfg, dtype)
}
