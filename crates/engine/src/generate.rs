//! One sequence from prompt to stop: a prefill step over the whole prompt (with the image
//! embeddings spliced in), then one decode step per new token, stopping on EOS, a stop id, the
//! token budget, or when the caller's callback says so.

use candle_core::Tensor;
use dsvl_models::llm::{ImageRows, SeqChunk, SeqId, ShardRunner, StepPlan};
use dsvl_models::ModelError;

use crate::sampler::{sample, Rng, SamplingParams};

/// Anything that runs a [`StepPlan`] for the whole group and returns the logits.
pub trait StepExecutor {
    /// Runs one step (see [`ShardRunner::lead_step`]).
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError>;
}

impl StepExecutor for ShardRunner {
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        self.lead_step(plan)
    }
}

/// What to generate.
#[derive(Debug, Clone)]
pub struct GenerationRequest {
    /// Prompt ids, image placeholders already expanded.
    pub prompt: Vec<u32>,
    /// Image embedding rows and their positions in the prompt.
    pub image: Option<ImageRows>,
    /// Token selection.
    pub params: SamplingParams,
    /// Budget of new tokens.
    pub max_new_tokens: usize,
    /// Ids that end generation (EOS and any extra stop ids); the stop id is kept in the output.
    pub stop_ids: Vec<u32>,
    /// Keep the full-prompt logits and every step's logits (parity checks; costs memory).
    pub keep_logits: bool,
}

/// Why generation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    /// A stop id (EOS) was produced.
    Stop,
    /// `max_new_tokens` reached.
    Length,
    /// The callback asked to stop (client went away, stop string matched).
    Cancelled,
}

/// The result of [`generate`].
#[derive(Debug, Clone)]
pub struct GenerationOutput {
    /// New tokens (including a final stop id, if any).
    pub tokens: Vec<u32>,
    /// Why it ended.
    pub finish: FinishReason,
    /// With `keep_logits`: `[prompt_len, vocab]` logits of the prefill.
    pub prompt_logits: Option<Tensor>,
    /// With `keep_logits`: the logits each new token was chosen from.
    pub step_logits: Vec<Vec<f32>>,
}

/// Generates for `req` as sequence `seq`; `on_token` sees each new token (a final stop id too)
/// and returns whether to continue. The sequence's cache is freed at the end, also on error paths that leave the group
/// usable.
pub fn generate(
    exec: &mut dyn StepExecutor,
    req: &GenerationRequest,
    seq: SeqId,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenerationOutput, ModelError> {
    req.params.validate().map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    if req.prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    let result = run(exec, req, seq, on_token);
    let _ = exec.step(&StepPlan { free: vec![seq], ..StepPlan::default() });
    result
}

fn run(
    exec: &mut dyn StepExecutor,
    req: &GenerationRequest,
    seq: SeqId,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenerationOutput, ModelError> {
    let mut rng = Rng::new(req.params.seed);
    let mut out = GenerationOutput {
        tokens: Vec::new(),
        finish: FinishReason::Length,
        prompt_logits: None,
        step_logits: Vec::new(),
    };
    let mut plan = StepPlan {
        chunks: vec![SeqChunk {
            seq,
            tokens: req.prompt.clone(),
            start: 0,
            all_logits: req.keep_logits,
            blocks: Vec::new(),
        }],
        free: Vec::new(),
        image: req.image.clone(),
    };
    let mut pos = req.prompt.len();
    while out.tokens.len() < req.max_new_tokens {
        let logits = exec
            .step(&plan)?
            .ok_or_else(|| ModelError::InvalidInput("step returned no logits".into()))?;
        if req.keep_logits && out.prompt_logits.is_none() {
            out.prompt_logits = Some(logits.clone());
        }
        let last: Vec<f32> = logits.get(logits.dim(0)? - 1)?.to_vec1()?;
        let token = sample(&last, &req.params, &out.tokens, &mut rng);
        if req.keep_logits {
            out.step_logits.push(last);
        }
        out.tokens.push(token);
        let keep_going = on_token(token);
        if req.stop_ids.contains(&token) {
            out.finish = FinishReason::Stop;
            break;
        }
        if !keep_going {
            out.finish = FinishReason::Cancelled;
            break;
        }
        plan = StepPlan {
            chunks: vec![SeqChunk {
                seq,
                tokens: vec![token],
                start: pos,
                all_logits: false,
                blocks: Vec::new(),
            }],
            free: Vec::new(),
            image: None,
        };
        pos += 1;
    }
    Ok(out)
}
