//! Batched-step checks of `dsvl-bench parity`, beside the golden ones (which run one sequence
//! at a time):
//! - "batched step vs alone": one step holding a whole prompt, a decode token and a chunk after
//!   cached tokens, with interleaved and out-of-order KV blocks, gives each sequence the logits
//!   it gets alone. This is what tells a paged attention kernel that looks up the wrong
//!   sequence, block or position from one that is right, on any device.
//! - "fused kernels vs op chains" (CUDA only): the same step with the decoder's CUDA kernels
//!   (`DSVL_CUDA_FUSED`) and with candle's op chains, on the tiny model and on a random one with
//!   VL-7B's head size (128, no grouped KV heads), so the kernels are checked at the dimensions
//!   they serve, not only at the tiny model's 32.

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use dsvl_models::llm::model::{DeepSeekLlm, LogitRows, SeqChunk};
use dsvl_models::llm::paged_kv::PagedKvConfig;
use dsvl_models::llm::LlmConfig;
use dsvl_models::llm::Shard;
use dsvl_parallel::SingleRank;
use serde_json::json;

use crate::parity::{Report, Tol};

/// Tokens per KV block here: small, so every sequence spans several blocks.
const BLOCK: usize = 4;

/// One sequence of the check: tokens cached by a first step, then tokens of the checked step.
struct Seq {
    cached: usize,
    new: usize,
    blocks: Vec<u32>,
}

/// Three sequences over interleaved, partly reversed blocks of one pool: a whole prompt of 21
/// tokens, one decode token after 12, a chunk of 7 after 9.
fn sequences() -> Vec<Seq> {
    let interleave = |first: u32, n: u32| (0..n).map(|i| first + 3 * i).collect::<Vec<u32>>();
    let mut prompt = interleave(0, 6);
    prompt.reverse();
    vec![
        Seq { cached: 0, new: 21, blocks: prompt },
        Seq { cached: 12, new: 1, blocks: interleave(1, 4) },
        Seq { cached: 9, new: 7, blocks: interleave(2, 4) },
    ]
}

fn ids(seq: usize, range: std::ops::Range<usize>, vocab: usize) -> Vec<u32> {
    range.map(|p| ((p * 37 + seq * 101 + 11) % vocab) as u32).collect()
}

/// The checked step's logits (every new token's row, in sequence order) of `seqs`, run as one
/// batch (after one batched step caching what each has cached).
fn run_step(model: &DeepSeekLlm, seqs: &[(usize, &Seq)]) -> Result<Tensor> {
    let vocab = model.config().vocab_size;
    let pool = model.kv_pool(PagedKvConfig { num_blocks: 24, block_size: BLOCK })?;
    let chunk = |i: usize, s: &Seq, range: std::ops::Range<usize>, logits| SeqChunk {
        seq: i as u64,
        start: range.start,
        tokens: ids(i, range, vocab),
        logits,
        blocks: s.blocks.clone(),
    };
    let first: Vec<SeqChunk> = seqs
        .iter()
        .filter(|(_, s)| s.cached > 0)
        .map(|&(i, s)| chunk(i, s, 0..s.cached, LogitRows::None))
        .collect();
    if !first.is_empty() {
        model.forward(&first, None, &pool, &SingleRank)?;
    }
    let step: Vec<SeqChunk> = seqs
        .iter()
        .map(|&(i, s)| chunk(i, s, s.cached..s.cached + s.new, LogitRows::All))
        .collect();
    Ok(model.forward(&step, None, &pool, &SingleRank)?.to_device(&Device::Cpu)?)
}

/// "batched step vs alone" on `model`.
pub fn batched_vs_alone(report: &mut Report, model: &DeepSeekLlm, tol: Tol) -> Result<()> {
    let seqs = sequences();
    let all: Vec<(usize, &Seq)> = seqs.iter().enumerate().collect();
    let batched = run_step(model, &all)?;
    let alone = all.iter().map(|&one| run_step(model, &[one])).collect::<Result<Vec<Tensor>>>()?;
    report.tensor("library", "batched step vs alone", &batched, &Tensor::cat(&alone, 0)?, tol)
}

/// The random model with VL-7B's attention head size: 4 heads of 128, 2 layers.
fn head128_config() -> Result<LlmConfig> {
    Ok(LlmConfig::from_json(
        json!({"hidden_size": 512, "intermediate_size": 1376, "num_hidden_layers": 2,
               "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 1024,
               "max_position_embeddings": 4096}),
        "",
    )?)
}

/// "fused kernels vs op chains" on the tiny `model` and on a random head-128 one (CUDA only;
/// nothing to compare elsewhere).
pub fn fused_vs_chains(
    report: &mut Report,
    model: &DeepSeekLlm,
    dtype: DType,
    device: &Device,
    tol: Tol,
) -> Result<()> {
    if !device.is_cuda() {
        return Ok(());
    }
    let random = DeepSeekLlm::new(
        &head128_config()?,
        Shard::SINGLE,
        crate::random::var_builder(dtype, device),
    )?;
    let seqs = sequences();
    let all: Vec<(usize, &Seq)> = seqs.iter().enumerate().collect();
    for (name, m) in [("tiny", model), ("head-128", &random)] {
        dsvl_models::set_fused_cuda_kernels(false);
        let chains = run_step(m, &all);
        dsvl_models::set_fused_cuda_kernels(true);
        let fused = run_step(m, &all)?;
        report.tensor(
            "library",
            &format!("fused kernels vs op chains ({name})"),
            &fused,
            &chains?,
            tol,
        )?;
    }
    Ok(())
}
