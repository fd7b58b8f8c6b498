//! Decoder parity with the reference on `golden/lm.safetensors` (f32, TP 1, in-process):
//! prompt ids, `inputs_embeds` (with the image rows spliced in), full-sequence logits, the 16
//! greedy ids, and the logits of every generation step. TP > 1 (process ranks) is checked
//! through the CLI in `crates/cli/tests/generate_cli.rs`.

use std::sync::Arc;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_engine::{generate, GenerationRequest, SamplingParams};
use dsvl_models::llm::{
    splice_image_rows, DeepSeekLlm, ImageRows, PagedKvConfig, Shard, ShardRunner,
};
use dsvl_parallel::{LinkSet, SingleRank};
use dsvl_testkit::assert_close;

mod golden;
use golden::{case_ids, fixture, golden_ids, image_rows};

fn check_case(prefix: &str, image: Option<Tensor>) -> Result<()> {
    let f = fixture()?;
    let name = if image.is_some() { "one_image" } else { "text_only" };
    let ids = case_ids(&f, name)?;
    assert_eq!(ids, golden_ids(&f.lm[&format!("{prefix}.input_ids")])?, "prompt ids");

    let model = DeepSeekLlm::load(&f.ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let image_token = f.tok.special().image;
    let mut embeds = model.embed(&ids, &SingleRank)?;
    if let Some(rows) = &image {
        embeds = splice_image_rows(&embeds, &ids, image_token, rows)?;
    }
    let d = assert_close(
        "inputs_embeds",
        &embeds.unsqueeze(0)?,
        &f.lm[&format!("{prefix}.inputs_embeds")],
        1e-4,
        0.0,
    )?;
    println!("{prefix} inputs_embeds max |diff| {:.2e}", d.max_abs);

    let pool =
        model.kv_pool(PagedKvConfig::for_tokens(16_448, PagedKvConfig::DEFAULT_BLOCK_SIZE))?;
    let mut runner =
        ShardRunner::new(model, pool, Arc::new(LinkSet::Single), std::time::Duration::from_secs(5));
    let req_ids = ids.clone();
    let mut req = GenerationRequest {
        prompt: ids,
        image: image
            .map(|rows| ImageRows::for_image_tokens(&req_ids, image_token, rows))
            .transpose()?,
        params: SamplingParams::greedy(),
        max_new_tokens: 16,
        stop_ids: vec![f.tok.special().eos],
        keep_logits: true,
        max_batched_tokens: None,
    };
    // The prompt in one step, then prefilled in chunks of 37 tokens (chunk edges fall inside
    // KV blocks and inside the image's rows): both must match the reference.
    for chunk in [None, Some(37)] {
        req.max_batched_tokens = chunk;
        let out = generate(&mut runner, &req, &mut |_| true)?;
        let what = format!("{prefix} chunks {chunk:?}");
        let logits = out.prompt_logits.context("prompt logits")?.unsqueeze(0)?;
        let d = assert_close(
            &format!("{what}: full-sequence logits"),
            &logits,
            &f.lm[&format!("{prefix}.logits")],
            1e-3,
            0.0,
        )?;
        println!("{what}: logits max |diff| {:.2e}", d.max_abs);
        let want = golden_ids(&f.lm[&format!("{prefix}.generated_ids")])?;
        assert_eq!(out.tokens, want, "{what}: greedy ids");
        let steps = Tensor::new(out.step_logits, &Device::Cpu)?;
        let d = assert_close(
            &format!("{what}: step logits"),
            &steps,
            &f.lm[&format!("{prefix}.generated_step_logits")],
            1e-3,
            0.0,
        )?;
        println!("{what}: step logits max |diff| {:.2e}", d.max_abs);
    }
    Ok(())
}

#[test]
fn text_prompt_matches_reference() -> Result<()> {
    check_case("text", None)
}

#[test]
fn image_prompt_matches_reference() -> Result<()> {
    let f = fixture()?;
    check_case("image", Some(image_rows(&f)?))
}

/// A wrong number of image rows is an error, never a silent partial splice.
#[test]
fn image_count_mismatch_is_an_error() -> Result<()> {
    let f = fixture()?;
    let ids = case_ids(&f, "one_image")?;
    let model = DeepSeekLlm::load(&f.ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let embeds = model.embed(&ids, &SingleRank)?;
    let rows = Tensor::zeros((575, 128), DType::F32, &Device::Cpu)?;
    let err = splice_image_rows(&embeds, &ids, f.tok.special().image, &rows).unwrap_err();
    assert!(err.to_string().contains("576 image-token positions but 575"), "{err}");
    Ok(())
}

/// Out-of-range ids and prompts beyond the model's positions are refused before any compute.
#[test]
fn invalid_inputs_are_refused() -> Result<()> {
    let f = fixture()?;
    let model = DeepSeekLlm::load(&f.ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let pool =
        model.kv_pool(PagedKvConfig::for_tokens(16_448, PagedKvConfig::DEFAULT_BLOCK_SIZE))?;
    let mut runner =
        ShardRunner::new(model, pool, Arc::new(LinkSet::Single), std::time::Duration::from_secs(5));
    let mut req = GenerationRequest {
        prompt: vec![1000, 5000],
        image: None,
        params: SamplingParams::greedy(),
        max_new_tokens: 4,
        stop_ids: vec![],
        keep_logits: false,
        max_batched_tokens: None,
    };
    let err = generate(&mut runner, &req, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("token id 5000 is outside the vocabulary of 1024"), "{err}");
    req.prompt = vec![5; 16385];
    let err = generate(&mut runner, &req, &mut |_| true).unwrap_err();
    assert!(err.to_string().contains("beyond the model's 16384 positions"), "{err}");
    Ok(())
}
