//! The decoder loads a plain `LlamaForCausalLM` checkpoint (the deepseek-llm-7b/67b layout:
//! top-level Llama `config.json`, `model.layers.N...` and `lm_head.weight` without the
//! `language_model.` prefix), single-file or sharded with `model.safetensors.index.json`, and
//! gives the golden outputs: the checkpoint is the tiny DeepSeek-VL fixture's language model
//! rewritten in that layout (`dsvl_testkit::write_llama_checkpoint`), so `golden/lm.safetensors`
//! applies unchanged. The loader calls are the ones the decoder service and the CLI make.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_chat::{render_prompt, ChatTokenizer, Message};
use dsvl_engine::{generate, GenerationRequest, SamplingParams};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::llm::{DeepSeekLlm, ImageRows, LlmConfig, PagedKvConfig, Shard, ShardRunner};
use dsvl_models::vision::VisionEncoder;
use dsvl_parallel::LinkSet;
use dsvl_testkit::{assert_close, golden_dir, temp_llama_checkpoint, tiny_model_dir, LlamaLayout};

/// Writes the layout into a fresh temp dir, tokenizer files included, and opens it.
fn llama_checkpoint(layout: LlamaLayout) -> Result<(impl AsRef<Path>, Checkpoint, Vec<String>)> {
    let (dir, shards) = temp_llama_checkpoint(layout)?;
    let ckpt = Checkpoint::open(&ModelSource::Dir(dir.path().to_path_buf()))?;
    Ok((dir, ckpt, shards))
}

/// The config resolves to the VL model's `language_config` with an empty prefix, the tensors
/// are the VL model's `language_model.*` ones without the prefix (plus the ignored inv_freq).
fn check_layout(ckpt: &Checkpoint) -> Result<()> {
    let vl = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let vl_cfg = LlmConfig::from_checkpoint(&vl)?;
    let cfg = LlmConfig::from_checkpoint(ckpt)?;
    assert_eq!(cfg.prefix, "");
    assert_eq!(cfg, LlmConfig { prefix: String::new(), ..vl_cfg });
    let mut expected: Vec<String> = vl
        .tensor_names()
        .iter()
        .filter_map(|n| n.strip_prefix("language_model."))
        .map(str::to_string)
        .collect();
    expected.push("model.layers.0.self_attn.rotary_emb.inv_freq".into());
    expected.sort();
    assert_eq!(ckpt.tensor_names(), expected);
    Ok(())
}

fn tokenizer(ckpt: &Checkpoint) -> Result<ChatTokenizer> {
    Ok(ChatTokenizer::from_bytes(&ckpt.read_file("tokenizer.json")?.context("tokenizer.json")?)?)
}

fn case_ids(tok: &ChatTokenizer, name: &str) -> Result<Vec<u32>> {
    let chat: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    let case =
        chat["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).context("case")?;
    let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone())?;
    let prompt = render_prompt(case["system_prompt"].as_str().unwrap(), &messages)?;
    Ok(tok.encode_prompt(&prompt, 576)?.ids)
}

fn golden_lm() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?)
}

fn golden_ids(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
}

/// The image rows of the golden image prompt, from the DeepSeek-VL fixture's vision tower
/// (a DeepSeek LLM checkpoint has none): golden photo_jpeg pixels through our encoder.
fn image_rows() -> Result<Tensor> {
    let vl = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let u8s = pre["photo_jpeg.pixel_values_u8"].flatten_all()?.to_dtype(DType::U32)?;
    let pixels = pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?;
    let enc = VisionEncoder::load(&vl, DType::F32, &Device::Cpu, None)?;
    Ok(enc.forward(&pixels)?.reshape((576, 128))?)
}

/// Greedy generation of 16 tokens on `ckpt` (TP 1, f32) compared with golden `prefix.*`:
/// full-sequence logits and every step's logits within atol 1e-3, ids identical.
fn check_against_golden(ckpt: &Checkpoint, prefix: &str, image: Option<Tensor>) -> Result<()> {
    let tok = tokenizer(ckpt)?;
    let lm = golden_lm()?;
    let ids = case_ids(&tok, if image.is_some() { "one_image" } else { "text_only" })?;
    assert_eq!(ids, golden_ids(&lm[&format!("{prefix}.input_ids")])?, "prompt ids");
    let model = DeepSeekLlm::load(ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let pool = model.kv_pool(PagedKvConfig::for_tokens(4096, PagedKvConfig::DEFAULT_BLOCK_SIZE))?;
    let mut runner =
        ShardRunner::new(model, pool, Arc::new(LinkSet::Single), std::time::Duration::from_secs(5));
    let image_token = tok.special().image;
    let req = GenerationRequest {
        prompt: ids.clone(),
        image: image
            .map(|rows| ImageRows::for_image_tokens(&ids, image_token, rows))
            .transpose()?,
        params: SamplingParams::greedy(),
        max_new_tokens: 16,
        stop_ids: vec![tok.special().eos],
        keep_logits: true,
        max_batched_tokens: None,
    };
    let out = generate(&mut runner, &req, &mut |_| true)?;
    let logits = out.prompt_logits.context("prompt logits")?.unsqueeze(0)?;
    let d = assert_close(
        &format!("{prefix} full-sequence logits"),
        &logits,
        &lm[&format!("{prefix}.logits")],
        1e-3,
        0.0,
    )?;
    println!("{prefix} logits max |diff| {:.2e}", d.max_abs);
    assert_eq!(
        out.tokens,
        golden_ids(&lm[&format!("{prefix}.generated_ids")])?,
        "{prefix}: greedy ids"
    );
    let steps = Tensor::new(out.step_logits, &Device::Cpu)?;
    let d = assert_close(
        &format!("{prefix} step logits"),
        &steps,
        &lm[&format!("{prefix}.generated_step_logits")],
        1e-3,
        0.0,
    )?;
    println!("{prefix} step logits max |diff| {:.2e}", d.max_abs);
    Ok(())
}

/// Two shards and an index, config relying on LlamaConfig defaults: golden text and image
/// outputs, and every rank of TP 2 and TP 4 (KV heads replicated) finds its slices.
#[test]
fn sharded_llama_checkpoint_matches_reference() -> Result<()> {
    let (dir, ckpt, shards) = llama_checkpoint(LlamaLayout { shards: 2, rely_on_defaults: true })?;
    assert_eq!(shards, ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]);
    let dir = dir.as_ref();
    assert!(!dir.join("model.safetensors").exists());
    for s in &shards {
        assert!(std::fs::metadata(dir.join(s))?.len() > 100_000, "{s} holds part of the weights");
    }
    check_layout(&ckpt)?;
    for world in [2, 4] {
        for rank in 0..world {
            DeepSeekLlm::load(&ckpt, DType::F32, &Device::Cpu, Shard { rank, world }, None)
                .with_context(|| format!("rank {rank} of {world}"))?;
        }
    }
    check_against_golden(&ckpt, "text", None)?;
    check_against_golden(&ckpt, "image", Some(image_rows()?))
}

/// One `model.safetensors`, every config key explicit as in deepseek-llm-7b-base
/// (`rope_scaling: null`, `pretraining_tp: 1`, ...): golden text outputs.
#[test]
fn single_file_llama_checkpoint_matches_reference() -> Result<()> {
    let (_dir, ckpt, shards) =
        llama_checkpoint(LlamaLayout { shards: 1, rely_on_defaults: false })?;
    assert_eq!(shards, ["model.safetensors"]);
    assert_eq!(ckpt.config()["architectures"][0], "LlamaForCausalLM");
    assert!(ckpt.config().get("language_config").is_none());
    check_layout(&ckpt)?;
    check_against_golden(&ckpt, "text", None)
}

/// An index naming a shard that is not there, or a shard lacking a tensor the model needs,
/// is a clear error naming the file or tensor.
#[test]
fn broken_sharded_llama_checkpoint_is_an_error() -> Result<()> {
    let (tmp, shards) = temp_llama_checkpoint(LlamaLayout { shards: 3, rely_on_defaults: true })?;
    let dir = tmp.path();
    let open = |p: &Path| Checkpoint::open(&ModelSource::Dir(p.to_path_buf()));

    let index_path = dir.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path)?;
    std::fs::rename(dir.join(&shards[2]), dir.join("elsewhere.safetensors"))?;
    let err = open(dir).err().context("missing shard accepted")?.to_string();
    assert!(err.contains("lists shard") && err.contains(&shards[2]), "{err}");

    // The index without that shard: the files open, the model misses one of its tensors.
    std::fs::remove_file(dir.join("elsewhere.safetensors"))?;
    let mut idx: serde_json::Value = serde_json::from_str(&index)?;
    let map = idx["weight_map"].as_object_mut().context("weight_map")?;
    let dropped: Vec<String> =
        map.iter().filter(|(_, v)| *v == &shards[2]).map(|(k, _)| k.clone()).collect();
    map.retain(|_, v| v != &shards[2]);
    std::fs::write(&index_path, serde_json::to_vec(&idx)?)?;
    let ckpt = open(dir)?;
    let err = DeepSeekLlm::load(&ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)
        .err()
        .context("missing tensor accepted")?
        .to_string();
    assert!(
        err.contains("checkpoint has no tensor")
            && dropped.iter().any(|n| err.contains(&format!("`{n}`"))),
        "error names one of the tensors of the dropped shard: {err}"
    );
    Ok(())
}
