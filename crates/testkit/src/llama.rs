//! A plain `LlamaForCausalLM` checkpoint (the DeepSeek LLM 7B/67B layout) built from the
//! language model of the tiny DeepSeek-VL fixture: top-level Llama `config.json`, tensors
//! without the `language_model.` prefix, in one `model.safetensors` or in shards listed by
//! `model.safetensors.index.json`. Same weights, so the same golden outputs.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use anyhow::{ensure, Context, Result};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::tiny_model_dir;

/// How to lay the checkpoint out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaLayout {
    /// 1: a single `model.safetensors`; more: `model-0000i-of-0000n.safetensors` shards and an
    /// index. Tensors are dealt out round robin by name, so every layer spans several shards
    /// (as Hugging Face's size-based sharding also does).
    pub shards: usize,
    /// Leave out the keys whose `transformers` `LlamaConfig` default is what the tiny model
    /// uses (`hidden_act`, `rms_norm_eps`, `rope_theta`, `tie_word_embeddings`,
    /// `attention_bias`), so the loader must supply those defaults itself. Otherwise write a
    /// config like deepseek-llm-7b-base's, every key explicit (`rope_scaling: null` included).
    pub rely_on_defaults: bool,
}

/// The tokenizer side files a DeepSeek LLM checkpoint carries (no processor config: it has no
/// vision tower).
pub const LLAMA_TOKENIZER_FILES: [&str; 3] =
    ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"];

/// Writes the tiny model's decoder into `dir` in the plain `LlamaForCausalLM` layout; returns
/// the shard file names (in order). `dir` must exist.
pub fn write_llama_checkpoint(dir: &Path, layout: LlamaLayout) -> Result<Vec<String>> {
    ensure!(layout.shards >= 1, "at least one shard");
    let src = tiny_model_dir();
    let vl_config: Value = serde_json::from_slice(&std::fs::read(src.join("config.json"))?)?;
    let language =
        vl_config["language_config"].as_object().context("tiny config has a language_config")?;

    let mut config = language.clone();
    if layout.rely_on_defaults {
        let defaults = json!({"hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": false});
        for (k, v) in defaults.as_object().unwrap() {
            ensure!(
                config.get(k) == Some(v),
                "tiny language_config `{k}` is not the LlamaConfig default {v}"
            );
            config.remove(k);
        }
        config.remove("attention_bias");
    } else {
        for (k, v) in [
            ("attention_bias", json!(false)),
            ("attention_dropout", json!(0.0)),
            ("initializer_range", json!(0.02)),
            ("pretraining_tp", json!(1)),
            ("rope_scaling", Value::Null),
            ("use_cache", json!(true)),
            ("transformers_version", json!("4.33.1")),
        ] {
            config.insert(k.into(), v);
        }
    }
    config.insert("architectures".into(), json!(["LlamaForCausalLM"]));
    config.insert("model_type".into(), json!("llama"));
    config.insert("bos_token_id".into(), json!(1000));
    config.insert("eos_token_id".into(), json!(1001));
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(&Value::Object(config))?)?;

    let bytes = std::fs::read(src.join("model.safetensors"))?;
    let st = SafeTensors::deserialize(&bytes)?;
    let mut tensors: Vec<(String, TensorView<'_>)> = st
        .tensors()
        .into_iter()
        .filter_map(|(name, view)| {
            name.strip_prefix("language_model.").map(|n| (n.to_string(), view))
        })
        .collect();
    ensure!(tensors.iter().any(|(n, _)| n == "lm_head.weight"), "tiny model has an untied lm_head");
    // Older Llama exports carry the RoPE inverse frequencies as a tensor; loaders ignore it.
    let head_dim = language["hidden_size"].as_u64().context("hidden_size")?
        / language["num_attention_heads"].as_u64().context("heads")?;
    let inv_freq: Vec<u8> = (0..head_dim / 2)
        .flat_map(|i| (1.0f32 / 10000f32.powf(2.0 * i as f32 / head_dim as f32)).to_le_bytes())
        .collect();
    tensors.push((
        "model.layers.0.self_attn.rotary_emb.inv_freq".into(),
        TensorView::new(Dtype::F32, vec![head_dim as usize / 2], &inv_freq)?,
    ));
    tensors.sort_by(|a, b| a.0.cmp(&b.0));

    let meta = Some(HashMap::from([("format".to_string(), "pt".to_string())]));
    if layout.shards == 1 {
        safetensors::serialize_to_file(tensors, meta, &dir.join("model.safetensors"))?;
        return Ok(vec!["model.safetensors".into()]);
    }
    let names: Vec<String> = (1..=layout.shards)
        .map(|i| format!("model-{i:05}-of-{:05}.safetensors", layout.shards))
        .collect();
    let mut per_shard: Vec<Vec<(String, TensorView<'_>)>> = vec![Vec::new(); layout.shards];
    let mut weight_map = BTreeMap::new();
    let mut total_size = 0usize;
    for (i, (name, view)) in tensors.into_iter().enumerate() {
        weight_map.insert(name.clone(), names[i % layout.shards].clone());
        total_size += view.data().len();
        per_shard[i % layout.shards].push((name, view));
    }
    for (file, shard) in names.iter().zip(per_shard) {
        safetensors::serialize_to_file(shard, meta.clone(), &dir.join(file))?;
    }
    let index = json!({"metadata": {"total_size": total_size}, "weight_map": weight_map});
    std::fs::write(dir.join("model.safetensors.index.json"), serde_json::to_vec_pretty(&index)?)?;
    Ok(names)
}

/// Copies the tiny model's tokenizer files ([`LLAMA_TOKENIZER_FILES`]) into `dir`.
pub fn copy_tokenizer_files(dir: &Path) -> Result<()> {
    for f in LLAMA_TOKENIZER_FILES {
        std::fs::copy(tiny_model_dir().join(f), dir.join(f))
            .with_context(|| format!("copy {f}"))?;
    }
    Ok(())
}

/// [`write_llama_checkpoint`] plus [`copy_tokenizer_files`] into a fresh temporary directory
/// (removed on drop); also returns the shard file names.
pub fn temp_llama_checkpoint(layout: LlamaLayout) -> Result<(tempfile::TempDir, Vec<String>)> {
    let dir = tempfile::tempdir()?;
    let shards = write_llama_checkpoint(dir.path(), layout)?;
    copy_tokenizer_files(dir.path())?;
    Ok((dir, shards))
}
