//! One sequence from prompt to stop, for `dsvl generate` and the parity tests: the decoder
//! service's [`Scheduler`] with that one sequence (so the CLI and the service share one
//! generation loop): the prompt's prefill (with the image embeddings spliced in; in one step, or
//! in chunks of `max_batched_tokens`), then one decode step per new token, stopping on EOS, a stop id, the token budget, or
//! when the caller's callback says so.

use candle_core::Tensor;
use dsvl_models::llm::{ImageRows, PagedKvConfig, ShardRunner, StepPlan};
use dsvl_models::ModelError;

use crate::blocks::BlockManager;
use crate::sampler::SamplingParams;
use crate::scheduler::{Event, NewRequest, Scheduler, SchedulerConfig};

/// Anything that runs a [`StepPlan`] for the whole group and returns the logits.
pub trait StepExecutor {
    /// Runs one step (see [`ShardRunner::lead_step`]).
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError>;

    /// The geometry of the group's KV pool (what block tables may name).
    fn kv_config(&self) -> PagedKvConfig;
}

impl StepExecutor for ShardRunner {
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        self.lead_step(plan)
    }

    fn kv_config(&self) -> PagedKvConfig {
        ShardRunner::kv_config(self)
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
    /// Prefill the prompt in chunks of at most this many tokens (`None`: in one step).
    pub max_batched_tokens: Option<usize>,
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

/// Generates for `req` through a [`Scheduler`] holding this one sequence; `on_token` sees each
/// new token (a final stop id too) and returns whether to continue. The sequence's cache is
/// freed on the ranks at the end, also on error paths that leave the group usable.
///
/// # Errors
/// Invalid parameters or inputs, or a failed step.
pub fn generate(
    exec: &mut dyn StepExecutor,
    req: &GenerationRequest,
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenerationOutput, ModelError> {
    req.params.validate().map_err(|e| ModelError::InvalidInput(e.to_string()))?;
    if req.prompt.is_empty() {
        return Err(ModelError::InvalidInput("empty prompt".into()));
    }
    // Room for the whole sequence: the model's own position limit is checked by the step, the
    // pool's size by the scheduler (a prompt that cannot fit fails with a clear message).
    let positions = req.prompt.len() + req.max_new_tokens + 2;
    let kv = exec.kv_config();
    let cfg = SchedulerConfig {
        max_num_seqs: 1,
        max_batched_tokens: req.max_batched_tokens.unwrap_or(positions).max(1),
        max_positions: positions,
        max_step_stretch: None,
    };
    let mut sched = Scheduler::new(cfg, BlockManager::new(kv.num_blocks, kv.block_size));
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    sched.add(NewRequest {
        prompt: req.prompt.clone(),
        image: req.image.clone(),
        params: req.params.clone(),
        max_new_tokens: req.max_new_tokens,
        stop_ids: req.stop_ids.clone(),
        min_new_tokens: 0,
        filter: Default::default(),
        priority: 0,
        logprobs: false,
        top_logprobs: 0,
        deadline: None,
        keep_logits: req.keep_logits,
        prompt_logprobs: false,
        prompt_top_logprobs: 0,
        events: tx,
        prefix: Default::default(),
        constraint: None,
    });
    let result = drive(exec, &mut sched, &mut rx, &req.stop_ids, on_token);
    // Free the sequence on every rank, however it ended.
    drop(rx);
    sched.cancel_all();
    while sched.has_work() {
        if sched.step(exec).is_err() {
            break;
        }
    }
    result
}

fn drive(
    exec: &mut dyn StepExecutor,
    sched: &mut Scheduler,
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    stop_ids: &[u32],
    on_token: &mut dyn FnMut(u32) -> bool,
) -> Result<GenerationOutput, ModelError> {
    let mut out = GenerationOutput {
        tokens: Vec::new(),
        finish: FinishReason::Length,
        prompt_logits: None,
        step_logits: Vec::new(),
    };
    loop {
        if !sched.has_work() {
            return Err(ModelError::InvalidInput("generation ended without a result".into()));
        }
        sched.step(exec)?;
        while let Ok(ev) = rx.try_recv() {
            match ev {
                Event::PromptLogits(t) => out.prompt_logits = Some(t),
                Event::PromptLogprobs(_) => {} // never asked for here
                Event::Token { id, logits, .. } => {
                    out.tokens.push(id);
                    out.step_logits.extend(logits);
                    if !on_token(id) {
                        // A stop id ends with `Stop` whatever the callback says.
                        out.finish = if stop_ids.contains(&id) {
                            FinishReason::Stop
                        } else {
                            FinishReason::Cancelled
                        };
                        return Ok(out);
                    }
                }
                Event::Finished { reason, .. } => {
                    out.finish = reason;
                    return Ok(out);
                }
                Event::Failed(f) => return Err(ModelError::InvalidInput(format!("{f:?}"))),
            }
        }
    }
}
