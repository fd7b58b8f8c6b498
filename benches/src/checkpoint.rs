//! `dsvl-bench random-checkpoint`: a checkpoint directory in the original Hugging Face layout
//! (`config.json`, `model.safetensors`, tokenizer and processor files) with random weights at a
//! preset's language-model dimensions, for serving benchmarks of the real services at sizes no
//! checkpoint here has (`dsvl up --model DIR`, then `dsvl-bench serve`).
//!
//! The vision tower and aligner are the preset's when it has one, the bundled tiny model's
//! otherwise (VL-1.3B's preset is its language model only), with the aligner widened to the
//! LM's hidden size. Tensor names and shapes are whatever the loaders ask for: the models are
//! built once with a `VarBuilder` that records every tensor it invents.
//!
//! The tokenizer is the bundled tiny one grown to the preset's vocabulary as the real one is
//! laid out: its 1,000 BPE tokens, then placeholder tokens (` t1000`, ` t1001`, ...) up to the
//! special tokens, which sit at 1000/1024 of the vocabulary (100,000 of 102,400 in the real
//! one). Random weights pick ids across the whole vocabulary, so every id must decode to text
//! for the HTTP stream (and its timing) to be realistic; ids past the specials (the padding
//! rows) decode to nothing, as in the real tokenizer.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use dsvl_models::llm::{DeepSeekLlm, LlmConfig, Shard};
use dsvl_models::vision::VisionEncoder;
use serde_json::{json, Value};

use crate::dims::Dims;
use crate::random;

/// The bundled tiny checkpoint: its files are the base of every generated one.
const TINY_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../assets/tiny-dsvl");
/// Files copied unchanged.
const COPIED: [&str; 3] =
    ["preprocessor_config.json", "processor_config.json", "special_tokens_map.json"];
/// BPE tokens of the tiny tokenizer; its added tokens start here.
const TINY_BPE: u64 = 1000;

/// Arguments of `dsvl-bench random-checkpoint`.
#[derive(Args, Debug)]
pub struct CheckpointArgs {
    /// The language model's dimensions.
    #[arg(long, value_enum, default_value = "vl-1.3b")]
    dims: Dims,
    /// The directory to write (created; must be empty or absent).
    #[arg(long)]
    out: PathBuf,
    /// The weights' dtype in the file (the services convert to their --dtype on loading).
    #[arg(long, default_value = "bf16", value_parser = ["bf16", "f16", "f32"])]
    dtype: String,
}

/// Runs `dsvl-bench random-checkpoint`.
pub fn run(a: CheckpointArgs) -> Result<()> {
    let dtype = match a.dtype.as_str() {
        "f16" => DType::F16,
        "f32" => DType::F32,
        _ => DType::BF16,
    };
    write(a.dims, dtype, &a.out)?;
    eprintln!(
        "wrote {} ({} dimensions, random {} weights)",
        a.out.display(),
        a.dims.name(),
        a.dtype
    );
    Ok(())
}

fn read_json(name: &str) -> Result<Value> {
    let path = Path::new(TINY_DIR).join(name);
    let text = std::fs::read(&path).with_context(|| format!("{}", path.display()))?;
    Ok(serde_json::from_slice(&text)?)
}

/// The checkpoint's `config.json`: the tiny model's, with the preset's language model (and
/// vision tower and aligner, when the preset has them) and the aligner's output widened.
pub fn config(dims: Dims, dtype: DType) -> Result<Value> {
    let mut config = read_json("config.json")?;
    let preset = dims.raw_config()?;
    for key in ["vision_config", "aligner_config"] {
        if let Some(v) = preset.get(key) {
            config[key] = v.clone();
        }
    }
    let torch_dtype = match dtype {
        DType::F32 => "float32",
        DType::F16 => "float16",
        _ => "bfloat16",
    };
    // The preset's language model resolved (a released config leaves Llama defaults out), so
    // nothing of the tiny model's is left in it.
    let lm = dims.lm_config()?;
    let mut language = json!({
        "hidden_act": "silu",
        "hidden_size": lm.hidden_size,
        "intermediate_size": lm.intermediate_size,
        "max_position_embeddings": lm.max_position_embeddings,
        "model_type": "llama",
        "num_attention_heads": lm.num_heads,
        "num_hidden_layers": lm.num_layers,
        "num_key_value_heads": lm.num_kv_heads,
        "rms_norm_eps": lm.rms_norm_eps,
        "rope_theta": lm.rope_theta,
        "tie_word_embeddings": lm.tie_word_embeddings,
        "torch_dtype": torch_dtype,
        "vocab_size": lm.vocab_size,
    });
    if lm.head_dim * lm.num_heads != lm.hidden_size {
        language["head_dim"] = json!(lm.head_dim);
    }
    config["language_config"] = language;
    config["aligner_config"]["params"]["n_embed"] = json!(lm.hidden_size);
    config["torch_dtype"] = json!(torch_dtype);
    Ok(config)
}

/// Where the special tokens start in a vocabulary of `vocab_size` ids (1000/1024 of it).
pub fn first_special(vocab_size: u64) -> u64 {
    vocab_size * TINY_BPE / 1024
}

/// The tiny `tokenizer.json` grown to `vocab_size` (see the module docs), and the map of old to
/// new ids of its added tokens.
pub fn tokenizer(vocab_size: u64) -> Result<(Value, BTreeMap<u64, u64>)> {
    let mut t = read_json("tokenizer.json")?;
    let base = first_special(vocab_size);
    if base < TINY_BPE {
        bail!("a vocabulary of {vocab_size} is smaller than the tiny tokenizer's");
    }
    let vocab = t["model"]["vocab"].as_object_mut().context("model.vocab")?;
    for id in TINY_BPE..base {
        // `Ġ` is the byte-level space: the token decodes to " t<id>".
        vocab.insert(format!("\u{120}t{id}"), json!(id));
    }
    let mut moved = BTreeMap::new();
    for added in t["added_tokens"].as_array_mut().context("added_tokens")? {
        let old = added["id"].as_u64().context("added token id")?;
        let new =
            old.checked_sub(TINY_BPE).context("an added token inside the BPE vocabulary")? + base;
        moved.insert(old, new);
        added["id"] = json!(new);
    }
    if let Some(specials) = t.pointer_mut("/post_processor/special_tokens") {
        for special in specials.as_object_mut().context("special_tokens")?.values_mut() {
            for id in special["ids"].as_array_mut().context("special token ids")? {
                let old = id.as_u64().context("special token id")?;
                *id = json!(moved.get(&old).copied().unwrap_or(old));
            }
        }
    }
    Ok((t, moved))
}

/// `tokenizer_config.json` with its `added_tokens_decoder` keyed by the moved ids.
fn tokenizer_config(moved: &BTreeMap<u64, u64>) -> Result<Value> {
    let mut c = read_json("tokenizer_config.json")?;
    if let Some(decoder) = c.get_mut("added_tokens_decoder").and_then(Value::as_object_mut) {
        let entries = std::mem::take(decoder);
        for (k, v) in entries {
            let old: u64 = k.parse().with_context(|| format!("added_tokens_decoder key {k}"))?;
            decoder.insert(moved.get(&old).copied().unwrap_or(old).to_string(), v);
        }
    }
    Ok(c)
}

/// Random tensors of every name and shape the models ask for, in `dtype`: the models are built
/// in it, so memory holds one copy of the weights in the file's dtype.
fn tensors(config: &Value, dtype: DType) -> Result<BTreeMap<String, Tensor>> {
    let recorded = Arc::new(Mutex::new(BTreeMap::new()));
    let vb = random::recording_var_builder(dtype, &Device::Cpu, recorded.clone());
    let (tower, aligner) = Dims::vision_of(config)?;
    let preprocess = serde_json::from_value(read_json("preprocessor_config.json")?)?;
    VisionEncoder::new(tower, aligner, preprocess, vb.clone()).context("vision tower")?;
    let lm = LlmConfig::from_json(config["language_config"].clone(), "language_model.")?;
    eprintln!(
        "inventing {} layers x {} hidden, vocabulary {} ...",
        lm.num_layers, lm.hidden_size, lm.vocab_size
    );
    DeepSeekLlm::new(&lm, Shard::SINGLE, vb).context("language model")?;
    let recorded = std::mem::take(&mut *recorded.lock().expect("not poisoned"));
    Ok(recorded)
}

/// Writes the checkpoint directory `out`.
pub fn write(dims: Dims, dtype: DType, out: &Path) -> Result<()> {
    if out.exists() && std::fs::read_dir(out)?.next().is_some() {
        bail!("{} is not empty", out.display());
    }
    std::fs::create_dir_all(out)?;
    let config = config(dims, dtype)?;
    let vocab = config["language_config"]["vocab_size"].as_u64().context("vocab_size")?;
    let (tok, moved) = tokenizer(vocab)?;
    let put = |name: &str, v: &Value| -> Result<()> {
        std::fs::write(out.join(name), serde_json::to_vec_pretty(v)?)?;
        Ok(())
    };
    put("config.json", &config)?;
    put("tokenizer.json", &tok)?;
    put("tokenizer_config.json", &tokenizer_config(&moved)?)?;
    for name in COPIED {
        std::fs::copy(Path::new(TINY_DIR).join(name), out.join(name))?;
    }
    let tensors = tensors(&config, dtype)?;
    let params: usize = tensors.values().map(Tensor::elem_count).sum();
    eprintln!("writing {} tensors, {:.2} G parameters ...", tensors.len(), params as f64 / 1e9);
    let map: std::collections::HashMap<String, Tensor> = tensors.into_iter().collect();
    candle_core::safetensors::save(&map, out.join("model.safetensors"))?;
    std::fs::write(
        out.join("README.md"),
        format!(
            "Random weights at the {} language-model dimensions, written by \
             `dsvl-bench random-checkpoint --dims {}`: for serving benchmarks only (its answers \
             are noise). Layout and tokenizer: see benches/src/checkpoint.rs.\n",
            dims.name(),
            dims.name()
        ),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsvl_models::checkpoint::{Checkpoint, ModelSource};

    #[test]
    fn the_grown_tokenizer_has_the_real_layout() -> Result<()> {
        let (t, moved) = tokenizer(102_400)?;
        assert_eq!(first_special(102_400), 100_000);
        assert_eq!(moved.get(&1000), Some(&100_000), "BOS where the real vocabulary has it");
        assert_eq!(moved.get(&1015), Some(&100_015), "<image_placeholder>");
        let tok = dsvl_chat::ChatTokenizer::from_bytes(&serde_json::to_vec(&t)?)?;
        let special = tok.special();
        assert_eq!((special.bos, special.eos, special.image), (100_000, 100_001, 100_015));
        assert_eq!(tok.decode(&[5000, 99_999], false)?, " t5000 t99999");
        // Encoding is the tiny tokenizer's, BOS from the moved post-processor.
        let ids = tok.encode("hello")?;
        assert_eq!(ids[0], 100_000);
        assert!(ids[1..].iter().all(|&i| i < 1000), "{ids:?}");
        Ok(())
    }

    #[test]
    fn every_preset_writes_its_own_language_model() -> Result<()> {
        for dims in [Dims::Vl7b, Dims::Vl13b, Dims::Tiny] {
            let config = config(dims, DType::BF16)?;
            let written = LlmConfig::from_json(config["language_config"].clone(), "")?;
            assert_eq!(format!("{written:?}"), format!("{:?}", dims.lm_config()?), "{dims:?}");
            assert_eq!(config["aligner_config"]["params"]["n_embed"], json!(written.hidden_size));
        }
        Ok(())
    }

    #[test]
    fn a_written_checkpoint_loads_in_the_services_loaders() -> Result<()> {
        let dir = tempfile::tempdir()?;
        let out = dir.path().join("ckpt");
        write(Dims::Tiny, DType::F32, &out)?;
        let ckpt = Checkpoint::open(&ModelSource::Dir(out.clone()))?;
        let lm = DeepSeekLlm::load(&ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
        drop(lm);
        VisionEncoder::load(&ckpt, DType::F32, &Device::Cpu, None)?;
        // The tiny preset keeps the tiny tokenizer's ids.
        let tok =
            dsvl_chat::ChatTokenizer::from_bytes(&std::fs::read(out.join("tokenizer.json"))?)?;
        assert_eq!(tok.special().bos, 1000);
        assert!(write(Dims::Tiny, DType::F32, &out).is_err(), "wrote over a checkpoint");
        Ok(())
    }
}
