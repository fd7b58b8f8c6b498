//! `dsvl-bench constraint`: the cost of a grammar mask per generated token (llguidance), the
//! CPU work structured outputs add to each step of a constrained sequence. The scheduler
//! computes masks on another thread while the model runs the step, so this cost only shows
//! when it exceeds the step.
//!
//! Each schema is walked by drawing uniformly among the allowed tokens (what a random-weight
//! model does), timing every `mask()` and `consume()`.

use std::time::Instant;

use anyhow::{Context, Result};
use clap::Args;
use dsvl_engine::constraint::{ConstraintCompiler, Grammar};
use dsvl_engine::Rng;
use serde_json::json;

/// Arguments of `dsvl-bench constraint`.
#[derive(Args)]
pub struct ConstraintArgs {
    /// Checkpoint directory whose `tokenizer.json` is used (default: the bundled tiny model).
    #[arg(long)]
    model: Option<std::path::PathBuf>,
    /// Vocabulary size of the logits (the mask's width).
    #[arg(long, default_value_t = 102_400)]
    vocab: usize,
    /// End-of-sequence id.
    #[arg(long, default_value_t = 1001)]
    eos: u32,
    /// Walks per schema.
    #[arg(long, default_value_t = 20)]
    walks: u64,
}

fn schemas() -> Vec<(&'static str, Grammar)> {
    vec![
        (
            "object: string, integer, enum array",
            Grammar::JsonSchema(json!({"type": "object",
            "properties": {"name": {"type": "string", "maxLength": 16},
                "age": {"type": "integer", "minimum": 0, "maximum": 120},
                "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 4}},
            "required": ["name", "age", "tags"], "additionalProperties": false})),
        ),
        (
            "array of objects with a pattern",
            Grammar::JsonSchema(json!({"type": "array", "maxItems": 4,
            "items": {"type": "object", "properties": {
                "code": {"type": "string", "pattern": "^[A-Z]{2}[0-9]{3}$"},
                "score": {"type": "number", "minimum": 0, "maximum": 1}},
                "required": ["code", "score"], "additionalProperties": false}})),
        ),
        ("regex", Grammar::Regex("[a-z]{3,8}(-[0-9]{2}){1,3}".into())),
    ]
}

fn percentile(v: &mut [f64], p: f64) -> f64 {
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * p).round() as usize]
}

/// Runs the benchmark.
pub fn run(args: ConstraintArgs) -> Result<()> {
    let dir = args.model.clone().unwrap_or_else(|| {
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../assets/tiny-dsvl")
    });
    let json = std::fs::read(dir.join("tokenizer.json")).context("tokenizer.json")?;
    let t = Instant::now();
    let compiler = ConstraintCompiler::from_tokenizer_json(&json, args.vocab, args.eos)?;
    println!(
        "token trie of {} ({} logits): built in {:.1} ms",
        dir.display(),
        args.vocab,
        t.elapsed().as_secs_f64() * 1e3
    );
    println!(
        "{:<38} {:>10} {:>8} {:>12} {:>12} {:>12}",
        "grammar", "compile ms", "tokens", "mask µs p50", "mask µs p99", "consume µs"
    );
    for (name, g) in schemas() {
        let (mut masks, mut consumes, mut compile) = (Vec::new(), Vec::new(), Vec::new());
        for walk in 0..args.walks {
            let t = Instant::now();
            let mut c = compiler.compile(&g)?;
            compile.push(t.elapsed().as_secs_f64() * 1e3);
            let mut rng = Rng::new(walk);
            for _ in 0..512 {
                if c.is_complete() {
                    break;
                }
                let t = Instant::now();
                let m = c.mask()?;
                masks.push(t.elapsed().as_secs_f64() * 1e6);
                let allowed: Vec<u32> = (0..args.vocab as u32).filter(|&i| m.allows(i)).collect();
                let tok = allowed[(rng.uniform() * allowed.len() as f64) as usize];
                if tok == args.eos {
                    break;
                }
                let t = Instant::now();
                c.consume(tok)?;
                consumes.push(t.elapsed().as_secs_f64() * 1e6);
            }
        }
        let n = masks.len();
        println!(
            "{name:<38} {:>10.2} {n:>8} {:>12.1} {:>12.1} {:>12.1}",
            percentile(&mut compile, 0.5),
            percentile(&mut masks, 0.5),
            percentile(&mut masks, 0.99),
            percentile(&mut consumes, 0.5)
        );
    }
    Ok(())
}
