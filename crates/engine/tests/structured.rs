//! Constrained decoding on the bundled random-weight model: whatever the weights, every output
//! under a bounded JSON schema ends with `stop` within the token budget, parses, and validates
//! against the schema (checked by an independent validator), at temperature 0 and 1; regular
//! expressions and Lark grammars are followed the same way; constrained and unconstrained
//! sequences share a batch without changing the unconstrained ones' tokens.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Result};
use candle_core::{DType, Device};
use dsvl_engine::blocks::BlockManager;
use dsvl_engine::constraint::{ConstraintCompiler, Grammar};
use dsvl_engine::scheduler::{Event, NewRequest, Scheduler, SchedulerConfig};
use dsvl_engine::{FinishReason, SamplingParams};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::llm::{DeepSeekLlm, PagedKvConfig, Shard, ShardRunner};
use dsvl_parallel::LinkSet;
use dsvl_testkit::tiny_model_dir;
use serde_json::{json, Value};
use tokio::sync::mpsc::UnboundedReceiver;

const EOS: u32 = 1001;
const MAX_NEW: usize = 400;

fn engine() -> Result<(ShardRunner, Scheduler)> {
    let ckpt = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let model = DeepSeekLlm::load(&ckpt, DType::F32, &Device::Cpu, Shard::SINGLE, None)?;
    let kv = PagedKvConfig::for_tokens(16_384, PagedKvConfig::DEFAULT_BLOCK_SIZE);
    let pool = model.kv_pool(kv)?;
    let runner = ShardRunner::new(model, pool, Arc::new(LinkSet::Single), Duration::from_secs(30));
    let cfg = SchedulerConfig {
        max_num_seqs: 32,
        max_batched_tokens: 4096,
        max_positions: 16_384,
        max_step_stretch: None,
    };
    Ok((runner, Scheduler::new(cfg, BlockManager::new(kv.num_blocks, kv.block_size))))
}

fn compiler() -> Result<ConstraintCompiler> {
    let json = std::fs::read(tiny_model_dir().join("tokenizer.json"))?;
    Ok(ConstraintCompiler::from_tokenizer_json(&json, 1024, EOS)?)
}

fn tokenizer() -> Result<tokenizers::Tokenizer> {
    tokenizers::Tokenizer::from_file(tiny_model_dir().join("tokenizer.json"))
        .map_err(|e| anyhow::anyhow!("{e}"))
}

fn sampling(temperature: f32, seed: u64) -> SamplingParams {
    SamplingParams { temperature, seed, ..SamplingParams::greedy() }
}

fn prompt(i: u64) -> Vec<u32> {
    (0..40).map(|j| ((j * 37 + i * 101) % 990) as u32 + 1).collect()
}

/// Tokens and finish reason of one stream, after the scheduler ran dry.
fn collect(rx: &mut UnboundedReceiver<Event>) -> Result<(Vec<u32>, FinishReason)> {
    let mut ids = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, .. } => ids.push(id),
            Event::Finished { reason, .. } => return Ok((ids, reason)),
            Event::Failed(f) => bail!("failed: {f:?}"),
            Event::PromptLogits(_) | Event::PromptLogprobs(_) => {}
        }
    }
    bail!("no finish")
}

fn text(tok: &tokenizers::Tokenizer, ids: &[u32]) -> Result<String> {
    let ids: Vec<u32> = ids.iter().copied().filter(|&t| t != EOS).collect();
    tok.decode(&ids, false).map_err(|e| anyhow::anyhow!("{e}"))
}

fn schemas() -> Vec<Value> {
    vec![
        // Nested object, required fields, bounded integer, enum array with maxItems.
        json!({"type": "object", "properties": {
            "name": {"type": "string", "maxLength": 8},
            "age": {"type": "integer", "minimum": 0, "maximum": 120},
            "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3}},
            "required": ["name", "age", "tags"], "additionalProperties": false}),
        // Enums, a nested object, a bounded number, a boolean.
        json!({"type": "object", "properties": {
            "kind": {"enum": ["cat", "dog", "bird"]},
            "pos": {"type": "object", "properties": {
                "x": {"type": "integer", "minimum": -5, "maximum": 5},
                "y": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["x", "y"], "additionalProperties": false},
            "ok": {"type": "boolean"}},
            "required": ["kind", "pos", "ok"], "additionalProperties": false}),
        // A string with a pattern.
        json!({"type": "object", "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
            "note": {"type": "string", "maxLength": 5}},
            "required": ["code", "note"], "additionalProperties": false}),
        // An array of objects, 1 to 3 items.
        json!({"type": "array", "minItems": 1, "maxItems": 3, "items": {"type": "object",
            "properties": {"id": {"type": "integer", "minimum": 0, "maximum": 99},
                           "label": {"type": "string", "maxLength": 4}},
            "required": ["id", "label"], "additionalProperties": false}}),
    ]
}

#[test]
fn bounded_schemas_always_give_valid_json() -> Result<()> {
    let (mut runner, mut sched) = engine()?;
    let compiler = compiler()?;
    let tok = tokenizer()?;
    // Every schema at temperature 0 and 1 (three seeds), all in one batch, next to two
    // unconstrained streams whose tokens must not change.
    let mut cases = Vec::new();
    for (k, schema) in schemas().into_iter().enumerate() {
        for (t, seed) in [(0.0, 0), (1.0, 1), (1.0, 2), (1.0, 3)] {
            let (mut req, rx) = NewRequest::greedy(prompt(k as u64 + seed), None, MAX_NEW);
            req.params = sampling(t, seed);
            req.stop_ids = vec![EOS];
            req.constraint = Some(compiler.compile(&Grammar::JsonSchema(schema.clone()))?);
            sched.add(req);
            cases.push((schema.clone(), t, seed, rx));
        }
    }
    let mut free = Vec::new();
    for i in 0..2 {
        let (req, rx) = NewRequest::greedy(prompt(50 + i), None, 24);
        sched.add(req);
        free.push(rx);
    }
    while sched.has_work() {
        sched.step(&mut runner)?;
    }
    for (schema, t, seed, mut rx) in cases {
        let (ids, reason) = collect(&mut rx)?;
        let out = text(&tok, &ids)?;
        assert_eq!(reason, FinishReason::Stop, "T={t} seed {seed}: {out:?} ({} tokens)", ids.len());
        let value: Value = serde_json::from_str(&out)
            .map_err(|e| anyhow::anyhow!("T={t} seed {seed}: {out:?} does not parse: {e}"))?;
        let validator = jsonschema::validator_for(&schema)?;
        if let Err(e) = validator.validate(&value) {
            bail!("T={t} seed {seed}: {out} does not validate against {schema}: {e}");
        }
        println!("T={t} seed {seed}: {out}");
    }
    // The unconstrained streams give what they give alone.
    let (mut runner2, mut alone) = engine()?;
    for (i, rx) in free.iter_mut().enumerate() {
        let (batched, _) = collect(rx)?;
        let (req, mut rx2) = NewRequest::greedy(prompt(50 + i as u64), None, 24);
        alone.add(req);
        while alone.has_work() {
            alone.step(&mut runner2)?;
        }
        assert_eq!(batched, collect(&mut rx2)?.0, "unconstrained stream {i}");
    }
    Ok(())
}

#[test]
fn regex_and_lark_grammars_are_followed() -> Result<()> {
    let (mut runner, mut sched) = engine()?;
    let compiler = compiler()?;
    let tok = tokenizer()?;
    let regex = "[a-z]{3}-[0-9]{2}";
    let lark = r#"start: answer " " count
answer: "yes" | "no" | "maybe"
count: /[1-9][0-9]?/"#;
    let mut cases = Vec::new();
    for seed in 0..4 {
        for g in [Grammar::Regex(regex.into()), Grammar::Lark(lark.into())] {
            let (mut req, rx) = NewRequest::greedy(prompt(seed), None, 64);
            req.params = sampling(if seed == 0 { 0.0 } else { 1.0 }, seed);
            req.stop_ids = vec![EOS];
            req.constraint = Some(compiler.compile(&g)?);
            sched.add(req);
            cases.push((g, rx));
        }
    }
    while sched.has_work() {
        sched.step(&mut runner)?;
    }
    let rx_re = regex_lite(regex);
    for (g, mut rx) in cases {
        let (ids, reason) = collect(&mut rx)?;
        let out = text(&tok, &ids)?;
        assert_eq!(reason, FinishReason::Stop, "{g:?}: {out:?}");
        match g {
            Grammar::Regex(_) => assert!(rx_re(&out), "{out:?} does not match {regex}"),
            _ => {
                let (answer, count) = out.split_once(' ').expect("two parts");
                assert!(["yes", "no", "maybe"].contains(&answer), "{out:?}");
                let n: u32 = count.parse()?;
                assert!((1..100).contains(&n), "{out:?}");
            }
        }
    }
    Ok(())
}

/// `[a-z]{3}-[0-9]{2}`, checked by hand (no regex crate needed for one pattern).
fn regex_lite(_: &str) -> impl Fn(&str) -> bool {
    |s: &str| {
        let b = s.as_bytes();
        b.len() == 6
            && b[..3].iter().all(u8::is_ascii_lowercase)
            && b[3] == b'-'
            && b[4..].iter().all(u8::is_ascii_digit)
    }
}
