//! Prefix caching on the real (tiny) model, TP 1, f32: the golden conversations answered from a
//! warm cache give the golden ids and logits within the golden tolerance; the same tokens with
//! another image share only the blocks before the image; a second turn (first prompt + answer +
//! a new message) reuses the first turn's blocks and answers exactly as with the cache off;
//! prompt log-probabilities are computed whole from a warm cache, in one chunk or several, and
//! are the golden prompt logits' log-softmax.
//! TP 2 (rank processes) is checked through the decoder service in
//! `services/decoder/tests/prefix_cache_service.rs`.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_core::prefix::{image_key_hash, ImageSpan};
use dsvl_engine::blocks::BlockManager;
use dsvl_engine::scheduler::{Event, NewRequest, PrefixKey, Scheduler, SchedulerConfig};
use dsvl_engine::PromptLogprob;
use dsvl_models::llm::{DeepSeekLlm, ImageRows, PagedKvConfig, Shard, ShardRunner};
use dsvl_parallel::LinkSet;
use dsvl_testkit::assert_close;

mod golden;
use golden::{case_ids, fixture, golden_ids, image_rows, Fixture};

/// The golden logits tolerance (tests/fixtures/golden/README.md).
const LOGITS_ATOL: f64 = 1e-3;

/// A scheduler over the tiny model with the prefix cache on or off.
struct Engine {
    runner: ShardRunner,
    sched: Scheduler,
}

impl Engine {
    fn new(f: &Fixture, prefix_cache: bool) -> Result<Self> {
        Self::with_budget(f, prefix_cache, 4096)
    }

    /// With at most `max_batched_tokens` tokens a step (longer prompts prefill in chunks).
    fn with_budget(f: &Fixture, prefix_cache: bool, max_batched_tokens: usize) -> Result<Self> {
        let model = DeepSeekLlm::load(&f.ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
        let kv = PagedKvConfig::for_tokens(8192, PagedKvConfig::DEFAULT_BLOCK_SIZE);
        let pool = model.kv_pool(kv)?;
        let runner =
            ShardRunner::new(model, pool, Arc::new(LinkSet::Single), Duration::from_secs(30));
        let cfg = SchedulerConfig {
            max_num_seqs: 4,
            max_batched_tokens,
            max_positions: 16384,
            max_step_stretch: None,
        };
        let blocks =
            BlockManager::new(kv.num_blocks, kv.block_size).with_prefix_cache(prefix_cache);
        Ok(Self { runner, sched: Scheduler::new(cfg, blocks) })
    }

    /// Greedy answer of `prompt` (with `image` keyed by `key` at its image positions): the
    /// tokens, each token's logits row, the computed prompt positions' logits, cached tokens.
    fn answer(
        &mut self,
        prompt: &[u32],
        image: Option<(&ImageRows, &str)>,
        max_new: usize,
    ) -> Result<Answer> {
        let (mut req, mut rx) =
            NewRequest::greedy(prompt.to_vec(), image.map(|(rows, _)| rows.clone()), max_new);
        req.keep_logits = true;
        req.stop_ids = vec![];
        if let Some((rows, key)) = image {
            let start = rows.positions[0] as usize;
            req.prefix = PrefixKey {
                salt: b"tenant".to_vec(),
                images: vec![ImageSpan {
                    start,
                    len: rows.positions.len(),
                    key: image_key_hash(key.as_bytes()),
                }],
            };
        } else {
            req.prefix.salt = b"tenant".to_vec();
        }
        self.sched.add(req);
        while self.sched.has_work() {
            self.sched.step(&mut self.runner)?;
        }
        let mut out = Answer::default();
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::PromptLogits(t) => out.prompt_logits = Some(t),
                Event::PromptLogprobs(_) => bail!("prompt logprobs were not asked for"),
                Event::Token { id, logits, .. } => {
                    out.tokens.push(id);
                    out.step_logits.push(logits.context("kept row")?);
                }
                Event::Finished { usage, .. } => {
                    out.cached = usage.cached_tokens;
                    return Ok(out);
                }
                Event::Failed(f) => bail!("{f:?}"),
            }
        }
        bail!("the request did not finish")
    }
}

impl Engine {
    /// `prompt`'s prompt log-probabilities with `top` alternatives (one new token), and the
    /// prompt tokens the request took from the cache.
    fn score(&mut self, prompt: &[u32], top: usize) -> Result<(Vec<PromptLogprob>, usize)> {
        let (mut req, mut rx) = NewRequest::greedy(prompt.to_vec(), None, 1);
        req.prompt_logprobs = true;
        req.prompt_top_logprobs = top;
        req.prefix.salt = b"tenant".to_vec();
        self.sched.add(req);
        while self.sched.has_work() {
            self.sched.step(&mut self.runner)?;
        }
        let mut scored = None;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::PromptLogprobs(p) => {
                    anyhow::ensure!(scored.is_none(), "prompt logprobs sent twice");
                    scored = Some(p);
                }
                Event::Token { .. } => {
                    anyhow::ensure!(scored.is_some(), "prompt logprobs come before the token");
                }
                Event::Finished { usage, .. } => {
                    return Ok((scored.context("prompt logprobs")?, usage.cached_tokens))
                }
                Event::PromptLogits(_) => bail!("prompt logits were not asked for"),
                Event::Failed(f) => bail!("{f:?}"),
            }
        }
        bail!("the request did not finish")
    }
}

#[derive(Default)]
struct Answer {
    tokens: Vec<u32>,
    step_logits: Vec<Vec<f32>>,
    prompt_logits: Option<Tensor>,
    cached: usize,
}

impl Answer {
    fn steps(&self) -> Result<Tensor> {
        Ok(Tensor::new(self.step_logits.clone(), &Device::Cpu)?)
    }
}

/// Cold, then warm: golden ids both times; warm, every whole block before the last prompt token
/// comes from the cache, and the step logits and the computed prompt rows match golden.
fn golden_from_warm_cache(prefix: &str, case: &str, image: Option<Tensor>) -> Result<()> {
    let f = fixture()?;
    let ids = case_ids(&f, case)?;
    let rows =
        image.map(|r| ImageRows::for_image_tokens(&ids, f.tok.special().image, r)).transpose()?;
    let mut e = Engine::new(&f, true)?;
    let want = golden_ids(&f.lm[&format!("{prefix}.generated_ids")])?;
    let n = want.len();
    let cold = e.answer(&ids, rows.as_ref().map(|r| (r, "image-a")), n)?;
    assert_eq!(cold.tokens, want, "{prefix}: cold cache");
    assert_eq!(cold.cached, 0);
    let warm = e.answer(&ids, rows.as_ref().map(|r| (r, "image-a")), n)?;
    assert_eq!(warm.tokens, want, "{prefix}: warm cache");
    assert_eq!(warm.cached, (ids.len() - 1) / 32 * 32, "{prefix}: whole blocks cached");
    let d = assert_close(
        &format!("{prefix} warm: step logits"),
        &warm.steps()?,
        &f.lm[&format!("{prefix}.generated_step_logits")],
        LOGITS_ATOL,
        0.0,
    )?;
    println!("{prefix} warm: step logits max |diff| {:.2e}", d.max_abs);
    let golden_prompt = f.lm[&format!("{prefix}.logits")].squeeze(0)?;
    let computed = warm.prompt_logits.context("prompt logits")?;
    assert_eq!(computed.dim(0)?, ids.len() - warm.cached, "only the uncached rows are computed");
    assert_close(
        &format!("{prefix} warm: computed prompt rows"),
        &computed,
        &golden_prompt.narrow(0, warm.cached, ids.len() - warm.cached)?,
        LOGITS_ATOL,
        0.0,
    )?;
    Ok(())
}

#[test]
fn text_prompt_from_a_warm_cache_gives_golden_ids() -> Result<()> {
    golden_from_warm_cache("text", "text_only", None)
}

#[test]
fn image_prompt_from_a_warm_cache_gives_golden_ids_and_other_images_miss() -> Result<()> {
    let f = fixture()?;
    let rows = image_rows(&f)?;
    golden_from_warm_cache("image", "one_image", Some(rows.clone()))?;

    // Same tokens, another image: only the blocks before the image's first position are shared.
    let ids = case_ids(&f, "one_image")?;
    let image = ImageRows::for_image_tokens(&ids, f.tok.special().image, rows.clone())?;
    let other = ImageRows::for_image_tokens(&ids, f.tok.special().image, (rows * 0.5)?)?;
    let first_image = image.positions[0] as usize;
    let mut e = Engine::new(&f, true)?;
    let a = e.answer(&ids, Some((&image, "image-a")), 4)?;
    let b = e.answer(&ids, Some((&other, "image-b")), 4)?;
    assert_eq!(b.cached, first_image / 32 * 32, "image b shares only the text before the image");
    // Its answer is image b's, as with the cache off.
    let mut off = Engine::new(&f, false)?;
    let b_off = off.answer(&ids, Some((&other, "image-b")), 4)?;
    assert_eq!(b.tokens, b_off.tokens);
    assert_close("image b: cache vs no cache", &b.steps()?, &b_off.steps()?, LOGITS_ATOL, 0.0)?;
    let a_off = off.answer(&ids, Some((&image, "image-a")), 4)?;
    assert_eq!(a.tokens, a_off.tokens);
    Ok(())
}

/// Turn 2 = turn 1's prompt + its answer + a new user message: the blocks of turn 1 (prompt and
/// generated) are reused, and the answer equals the one computed without the cache.
#[test]
fn second_turn_reuses_the_first_and_answers_the_same() -> Result<()> {
    let f = fixture()?;
    let turn1 = case_ids(&f, "text_only")?;
    let mut on = Engine::new(&f, true)?;
    let first = on.answer(&turn1, None, 24)?;
    let mut turn2 = turn1.clone();
    turn2.extend(&first.tokens);
    turn2.extend(f.tok.encode_prompt("User: and then?\n\nAssistant:", 576)?.ids);
    let warm = on.answer(&turn2, None, 12)?;
    let computed_before = turn1.len() + first.tokens.len() - 1;
    assert_eq!(warm.cached, computed_before / 32 * 32, "turn 1's whole blocks are reused");
    let mut off = Engine::new(&f, false)?;
    let cold = off.answer(&turn2, None, 12)?;
    assert_eq!(cold.cached, 0);
    assert_eq!(warm.tokens, cold.tokens, "greedy tokens with and without the cache");
    let d = assert_close("turn 2 step logits", &warm.steps()?, &cold.steps()?, LOGITS_ATOL, 0.0)?;
    println!("turn 2: step logits max |diff| cache vs no cache {:.2e}", d.max_abs);
    Ok(())
}

/// The log-probability of token `i` under the logits `row`, in f64.
fn log_softmax_at(row: &[f32], i: usize) -> f64 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|&v| f64::from(v - max).exp()).sum::<f64>().ln() + f64::from(max);
    f64::from(row[i]) - lse
}

/// Prompt log-probabilities from a warm cache: nothing is taken from it (every position needs
/// its logits row), in one chunk and in chunks of 40 tokens alike; each prompt token's figure is
/// the log-softmax of the golden prompt logits at that token, and each alternative's likewise,
/// most likely first, and its rank the count of golden logits above it. Logits within the
/// golden 1e-3 put a log-softmax within 2e-3 (the row's log-sum-exp moves by at most the
/// largest logit difference).
#[test]
fn prompt_logprobs_are_the_golden_prompt_rows_computed_whole_from_a_warm_cache() -> Result<()> {
    const LOGPROB_ATOL: f64 = 2.0 * LOGITS_ATOL;
    let f = fixture()?;
    let ids = case_ids(&f, "text_only")?;
    let golden: Vec<Vec<f32>> = f.lm["text.logits"].squeeze(0)?.to_dtype(DType::F32)?.to_vec2()?;
    anyhow::ensure!(ids.len() > 80, "a prompt of several 40-token chunks");
    for budget in [4096, 40] {
        let mut e = Engine::with_budget(&f, true, budget)?;
        e.answer(&ids, None, 1)?; // the cache is warm now
        let (scored, cached) = e.score(&ids, 3)?;
        assert_eq!(cached, 0, "budget {budget}: the prompt is computed whole");
        assert_eq!(scored.len(), ids.len() - 1, "budget {budget}: positions 1..");
        let mut worst = 0f64;
        for (p, entry) in scored.iter().enumerate() {
            assert_eq!(entry.id, ids[p + 1], "budget {budget}: position {}", p + 1);
            let want = log_softmax_at(&golden[p], entry.id as usize);
            worst = worst.max((f64::from(entry.logprob) - want).abs());
            // The rank counts the golden logits above the token's, up to near-ties within
            // the logits' tolerance either way.
            let score = golden[p][entry.id as usize];
            let above = |margin: f32| golden[p].iter().filter(|&&v| v > score + margin).count();
            let tol = 2.0 * LOGITS_ATOL as f32;
            let ranks = 1 + above(tol) as u32..=1 + above(-tol) as u32;
            assert!(
                ranks.contains(&entry.rank),
                "position {}: {} not in {ranks:?}",
                p + 1,
                entry.rank
            );
            assert_eq!(entry.top.len(), 3);
            for pair in entry.top.windows(2) {
                assert!(pair[0].1 >= pair[1].1, "most likely first: {:?}", entry.top);
            }
            for &(id, lp) in &entry.top {
                let want = log_softmax_at(&golden[p], id as usize);
                worst = worst.max((f64::from(lp) - want).abs());
            }
            let best = golden[p].iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let top_want =
                log_softmax_at(&golden[p], golden[p].iter().position(|&v| v == best).unwrap_or(0));
            assert!(
                (f64::from(entry.top[0].1) - top_want).abs() <= LOGPROB_ATOL,
                "the most likely's figure"
            );
        }
        println!("budget {budget}: prompt logprobs max |diff| {worst:.2e}");
        assert!(worst <= LOGPROB_ATOL, "budget {budget}: {worst:.2e} over {LOGPROB_ATOL:.0e}");
    }
    Ok(())
}
