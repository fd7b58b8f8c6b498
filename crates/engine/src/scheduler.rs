//! Continuous batching over a paged KV cache (the decoder tier's scheduler, on the leader).
//!
//! Every step: sequences whose client went away or whose deadline passed are dropped (their
//! blocks freed in this very step); every running sequence gets a slot for its next token,
//! preempting the least important sequence when blocks run out (the highest `priority` value,
//! then the most recently admitted; it goes back to the queue ahead of the requests of its
//! priority and is recomputed from its prompt plus what it generated, without re-streaming
//! anything). A waiting request that a less important running one keeps out (blocks or a
//! seat) preempts it, as vLLM's priority scheduling does (`preempt.rs`). The step's token
//! budget (`max_batched_tokens`) goes to the running decodes first, then to prompts being
//! prefilled and to waiting sequences by priority (lower first, vLLM's `priority`; every
//! request has 0 unless it asks): the prompts of the first waiting request's priority or a
//! lower value, the waiting sequences in priority order and in arrival order within a
//! priority (while `max_num_seqs` and free blocks allow), then the prompts of a higher value,
//! so an urgent request is not queued behind the prefills of less urgent ones; a prompt
//! longer than what is left of the budget is prefilled over several steps (chunked prefill,
//! as vLLM and SGLang do by default), so a long image prompt never stalls the running streams
//! for its whole prefill. One forward pass runs all of it.
//!
//! Prefix caching: a sequence is admitted on the longest run of cached KV blocks that starts
//! its prompt (block hashes that know the tenant and the images, [`dsvl_core::prefix`]), so
//! only the rest is prefilled; every block it fills is registered for later requests (the
//! [`BlockManager`] keeps released blocks until it needs them). At least the prompt's last
//! token is always computed, since its logits choose the first new token.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use candle_core::{Device, Tensor};
use dsvl_core::prefix::{self, BlockHash, ImageSpan};
use dsvl_models::llm::{ImageRows, LogitRows, SeqChunk, SeqId, StepPlan};
use dsvl_models::ModelError;
use tokio::sync::mpsc::UnboundedSender;

use crate::blocks::BlockManager;
use crate::constraint::Constraint;
use crate::generate::{FinishReason, StepExecutor};
use crate::pace::{Pace, StepBudget};
use crate::prompt_logprobs::{self, PromptLogprob};
use crate::request_metrics;
use crate::sampler::{Rng, SamplingParams};
use crate::select::{Ask, Choice, StepLogits};
use crate::token_filter::TokenFilter;

/// Default step token budget on GPUs: a 2,048-token step costs about what a decode step does
/// there (both are bound by reading the weights), as vLLM's default budget assumes.
pub const DEFAULT_MAX_BATCHED_TOKENS_GPU: usize = 2048;

/// Default step token budget on the CPU (with no decode running; while streams decode, the
/// CPU's default [`DEFAULT_MAX_STEP_STRETCH_CPU`] sizes prefill chunks by their cost).
pub const DEFAULT_MAX_BATCHED_TOKENS_CPU: usize = 512;

/// Default `max_step_stretch` on the CPU, where a step's cost grows with its tokens: a step
/// carrying a prefill chunk aims at 1.3x a decode-only step, so running streams keep their
/// pace (within 2x) while a long image prompt is prefilled.
pub const DEFAULT_MAX_STEP_STRETCH_CPU: f64 = 1.3;

/// Limits of one scheduler.
#[derive(Debug, Clone, Copy)]
pub struct SchedulerConfig {
    /// Most sequences in a batch.
    pub max_num_seqs: usize,
    /// Most new tokens per step (decodes always run; prompts are chunked to fit).
    pub max_batched_tokens: usize,
    /// The model's position limit.
    pub max_positions: usize,
    /// With running decodes, keep a step that carries prefill tokens within this multiple of a
    /// decode-only step: prefill chunks are sized from the measured cost of mixed steps
    /// (Sarathi-Serve's stall-free batching, with the budget steered by the measured pace
    /// instead of profiled up front). `None`: the token budget alone decides, as on GPUs, where a chunk
    /// of `max_batched_tokens` costs about a decode step anyway.
    pub max_step_stretch: Option<f64>,
}

/// Token accounting sent with the final event.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Usage {
    /// Prompt tokens.
    pub prompt_tokens: usize,
    /// Generated tokens.
    pub completion_tokens: usize,
    /// Time from arrival to first admission.
    pub queue_seconds: f64,
    /// Time from arrival to the first token.
    pub time_to_first_token_seconds: f64,
    /// Prompt tokens whose KV came from the prefix cache.
    pub cached_tokens: usize,
}

/// Why a sequence could not complete.
#[derive(Debug, Clone, PartialEq)]
pub enum Failure {
    /// Its deadline passed.
    DeadlineExceeded,
    /// The request cannot be served (too long for the model or the cache).
    Invalid(String),
    /// The group failed.
    Unavailable(String),
}

/// What a request's stream receives.
#[derive(Debug, Clone)]
pub enum Event {
    /// One generated token.
    Token {
        /// Token id.
        id: u32,
        /// Log-probability under the model's (unprocessed) distribution, when asked for.
        logprob: Option<f32>,
        /// With `top_logprobs`: the most likely tokens and their log-probabilities.
        top: Vec<(u32, f32)>,
        /// With `keep_logits`: the logits row the token was chosen from.
        logits: Option<Vec<f32>>,
        /// On the first token only: prompt tokens taken from the prefix cache.
        cached_tokens: Option<usize>,
    },
    /// With `keep_logits`: `[prompt_len - cached, vocab]` logits of the prefill's computed
    /// positions (those after the prefix taken from the cache), before the first token.
    PromptLogits(Tensor),
    /// With `prompt_logprobs`: prompt positions `1..`, each token's log-probability given the
    /// tokens before it and the `prompt_top_logprobs` most likely there; before the first token.
    PromptLogprobs(Vec<PromptLogprob>),
    /// Generation ended normally.
    Finished {
        /// Why.
        reason: FinishReason,
        /// Accounting.
        usage: Usage,
    },
    /// Generation failed.
    Failed(Failure),
}

/// What a request's KV blocks are cached under (see [`dsvl_core::prefix`]).
#[derive(Debug, Clone, Default)]
pub struct PrefixKey {
    /// The tenant's cache salt (empty: the deployment's shared space).
    pub salt: Vec<u8>,
    /// The prompt's images, sorted by start, with their content keys.
    pub images: Vec<ImageSpan>,
}

/// A request handed to the scheduler.
pub struct NewRequest {
    /// Prompt ids (image placeholders expanded).
    pub prompt: Vec<u32>,
    /// Image rows and their positions in the prompt.
    pub image: Option<ImageRows>,
    /// Token selection.
    pub params: SamplingParams,
    /// Budget of new tokens.
    pub max_new_tokens: usize,
    /// Ids that end generation.
    pub stop_ids: Vec<u32>,
    /// The stop ids cannot be chosen before this many tokens are generated (vLLM's
    /// `min_tokens`; 0: no minimum). A grammar's completion still ends generation.
    pub min_new_tokens: usize,
    /// vLLM's `allowed_token_ids` and `bad_words`.
    pub filter: TokenFilter,
    /// vLLM's `priority`: lower is admitted first (ties in arrival order) and preempted last.
    pub priority: i32,
    /// Report log-probabilities.
    pub logprobs: bool,
    /// Report this many most likely tokens at each step (0: none).
    pub top_logprobs: usize,
    /// Give up after this instant.
    pub deadline: Option<Instant>,
    /// Send the prefill's logits of every prompt position and each token's logits row (parity
    /// checks; costs memory and host copies).
    pub keep_logits: bool,
    /// Send each prompt token's log-probability ([`Event::PromptLogprobs`]): the prompt is
    /// prefilled whole, not from the prefix cache, and every prefill row is read on the host.
    pub prompt_logprobs: bool,
    /// With `prompt_logprobs`: this many most likely tokens at each prompt position (0: none).
    pub prompt_top_logprobs: usize,
    /// Where events go; closing the receiver cancels the sequence at the next step.
    pub events: UnboundedSender<Event>,
    /// The tenant and images its cached KV blocks are keyed by.
    pub prefix: PrefixKey,
    /// A grammar the output must match (compiled by [`crate::constraint::ConstraintCompiler`]).
    pub constraint: Option<Constraint>,
}

impl NewRequest {
    /// A greedy request for `max_new_tokens` tokens of `prompt` (no stop ids, logprobs,
    /// deadline or kept logits), and the receiver of its events.
    pub fn greedy(
        prompt: Vec<u32>,
        image: Option<ImageRows>,
        max_new_tokens: usize,
    ) -> (Self, tokio::sync::mpsc::UnboundedReceiver<Event>) {
        let (events, rx) = tokio::sync::mpsc::unbounded_channel();
        let req = Self {
            prompt,
            image,
            params: SamplingParams::greedy(),
            max_new_tokens,
            stop_ids: vec![],
            min_new_tokens: 0,
            filter: TokenFilter::default(),
            priority: 0,
            logprobs: false,
            top_logprobs: 0,
            deadline: None,
            keep_logits: false,
            prompt_logprobs: false,
            prompt_top_logprobs: 0,
            events,
            prefix: PrefixKey::default(),
            constraint: None,
        };
        (req, rx)
    }
}

/// Most prompt positions a step computes whole logits rows for, for prompt log-probabilities
/// (a row is `vocab` floats: 512 rows of a 102,400-token vocabulary are 200 MiB); a longer
/// prompt that asks for them is prefilled over several steps.
const MAX_SCORED_ROWS: usize = 512;

/// What is left of a step's [`MAX_SCORED_ROWS`].
struct ScoredRows(usize);

impl ScoredRows {
    /// Tokens `s` prefills this step out of `left`, as `take` grants them, held to what is left
    /// of the rows when it is scoring its prompt.
    fn take(&mut self, s: &Seq, left: usize, take: impl FnOnce(usize) -> usize) -> usize {
        if !s.scoring() {
            return take(left);
        }
        let n = take(left.min(self.0));
        self.0 -= n;
        n
    }
}

struct Seq {
    id: SeqId,
    req: NewRequest,
    generated: Vec<u32>,
    rng: Rng,
    /// Tokens in the KV cache (0: nothing yet, or preempted).
    cached: usize,
    /// Hashes of the sequence's first blocks, as far as they are known (the chain continues
    /// from the last).
    hashes: Vec<BlockHash>,
    /// Of those, how many are registered in (or were adopted from) the block manager.
    registered: usize,
    /// Prompt tokens taken from the prefix cache at the first admission.
    cached_tokens: usize,
    /// Tokens in the KV cache when this admission began: its prefill runs from here.
    prefill_from: usize,
    /// With `keep_logits`: the prefill's logits so far, one tensor per chunk.
    prompt_logits: Vec<Tensor>,
    /// With `prompt_logprobs`: the prompt positions' entries so far.
    prompt_logprobs: Vec<PromptLogprob>,
    arrived: Instant,
    admitted: Option<Instant>,
    first_token: Option<Instant>,
    last_token: Option<Instant>,
}

impl Seq {
    /// Prompt plus generated tokens.
    fn tokens(&self) -> usize {
        self.req.prompt.len() + self.generated.len()
    }

    /// Tokens still to run through the model before the next one can be chosen (1 for a
    /// sequence that is decoding).
    fn remaining(&self) -> usize {
        self.tokens() - self.cached
    }

    /// Whether its prompt's log-probabilities are still to compute: the prefill then returns
    /// every row and takes nothing from the prefix cache.
    fn scoring(&self) -> bool {
        self.req.prompt_logprobs && self.generated.is_empty()
    }

    /// Whether this admission's prefill is long enough for the pace guard to chunk it:
    /// judged on the whole prefill, so its last chunks are paced too (judged on what is left,
    /// the last `LONG_PROMPT` tokens ran as one chunk: on the tiny model, a step 20x a
    /// decode-only one).
    fn long_prefill(&self) -> bool {
        self.tokens() - self.prefill_from > Pace::LONG_PROMPT
    }

    /// Tokens `from..to` of prompt + generated.
    fn token_range(&self, from: usize, to: usize) -> Vec<u32> {
        let p = self.req.prompt.len();
        let mut out = Vec::with_capacity(to - from);
        if from < p {
            out.extend_from_slice(&self.req.prompt[from..to.min(p)]);
        }
        if to > p {
            out.extend_from_slice(&self.generated[from.max(p) - p..to - p]);
        }
        out
    }

    /// Its times, for the request metrics.
    fn times(&self) -> request_metrics::Times {
        request_metrics::Times {
            arrived: self.arrived,
            admitted: self.admitted,
            first_token: self.first_token,
        }
    }

    /// Extends `hashes` to the first `blocks` blocks (their tokens must be known).
    fn hash_blocks(&mut self, blocks: usize, block_size: usize) {
        while self.hashes.len() < blocks {
            let b = self.hashes.len();
            let parent = match self.hashes.last() {
                Some(h) => *h,
                None => prefix::root_hash(&self.req.prefix.salt),
            };
            let tokens = self.token_range(b * block_size, (b + 1) * block_size);
            let h = prefix::block_hash(&parent, b * block_size, &tokens, &self.req.prefix.images);
            self.hashes.push(h);
        }
    }
}

/// Scheduler state.
pub struct Scheduler {
    cfg: SchedulerConfig,
    blocks: BlockManager,
    waiting: VecDeque<Seq>,
    running: Vec<Seq>,
    next_id: SeqId,
    to_free: Vec<SeqId>,
    preemptions: u64,
    pace: Pace,
    prefix_queried: u64,
    prefix_hits: u64,
    /// [`MAX_SCORED_ROWS`] (smaller in tests).
    max_scored_rows: usize,
}

/// Queue and cache occupancy, for `Load` reports and metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct Occupancy {
    /// Sequences waiting for admission.
    pub waiting: usize,
    /// Sequences in the batch.
    pub running: usize,
    /// KV blocks in use.
    pub blocks_used: usize,
    /// KV blocks in the pool.
    pub blocks_total: usize,
    /// KV blocks only the prefix cache holds (evictable; not in `blocks_used`).
    pub blocks_cached: usize,
    /// Preemptions so far.
    pub preemptions: u64,
    /// Prompt tokens looked up in the prefix cache so far (first admissions).
    pub prefix_queried_tokens: u64,
    /// Of those, tokens found cached.
    pub prefix_hit_tokens: u64,
}

impl Scheduler {
    /// A scheduler over `blocks`.
    pub fn new(cfg: SchedulerConfig, blocks: BlockManager) -> Self {
        Self {
            cfg,
            blocks,
            waiting: VecDeque::new(),
            running: Vec::new(),
            next_id: 1,
            to_free: Vec::new(),
            preemptions: 0,
            pace: Pace::default(),
            prefix_queried: 0,
            prefix_hits: 0,
            max_scored_rows: MAX_SCORED_ROWS,
        }
    }

    /// With at most `rows` scored prompt rows a step instead of [`MAX_SCORED_ROWS`].
    #[cfg(test)]
    pub(crate) fn with_max_scored_rows(self, rows: usize) -> Self {
        Self { max_scored_rows: rows, ..self }
    }

    /// Queues a request, or fails it at once when it can never run.
    pub fn add(&mut self, req: NewRequest) {
        let need = req.prompt.len() + 1;
        let problem = if req.prompt.is_empty() {
            Some("empty prompt".to_string())
        } else if need > self.cfg.max_positions {
            Some(format!(
                "the prompt has {} tokens; the model takes at most {} positions",
                req.prompt.len(),
                self.cfg.max_positions
            ))
        } else if self.blocks.blocks_for(need) > self.blocks.total() {
            Some(format!(
                "the prompt needs {} KV blocks; the cache has {}",
                self.blocks.blocks_for(need),
                self.blocks.total()
            ))
        } else {
            None
        };
        if let Some(p) = problem {
            let _ = req.events.send(Event::Failed(Failure::Invalid(p)));
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let rng = Rng::new(req.params.seed);
        // Behind every waiting request of its priority or a lower value.
        let at = self.waiting.partition_point(|w| w.req.priority <= req.priority);
        self.waiting.insert(
            at,
            Seq {
                id,
                req,
                generated: Vec::new(),
                rng,
                cached: 0,
                hashes: Vec::new(),
                registered: 0,
                cached_tokens: 0,
                prefill_from: 0,
                prompt_logits: Vec::new(),
                prompt_logprobs: Vec::new(),
                arrived: Instant::now(),
                admitted: None,
                first_token: None,
                last_token: None,
            },
        );
    }

    /// Whether anything is queued or running (or blocks wait to be freed on the workers).
    pub fn has_work(&self) -> bool {
        !self.waiting.is_empty() || !self.running.is_empty() || !self.to_free.is_empty()
    }

    /// Current occupancy.
    pub fn occupancy(&self) -> Occupancy {
        Occupancy {
            waiting: self.waiting.len(),
            running: self.running.len(),
            blocks_used: self.blocks.used(),
            blocks_total: self.blocks.total(),
            blocks_cached: self.blocks.cached(),
            preemptions: self.preemptions,
            prefix_queried_tokens: self.prefix_queried,
            prefix_hit_tokens: self.prefix_hits,
        }
    }

    /// Drops every sequence without an event (the caller stopped listening): their blocks are
    /// freed, on the ranks too at the next [`step`](Self::step).
    pub fn cancel_all(&mut self) {
        let all: Vec<Seq> = self.running.drain(..).chain(self.waiting.drain(..)).collect();
        for s in &all {
            self.drop_seq(s);
        }
    }

    /// Ends every sequence with `failure` (the group broke).
    pub fn fail_all(&mut self, failure: Failure) {
        for s in self.running.drain(..).chain(self.waiting.drain(..)) {
            let (prompt, generated) = (s.req.prompt.len(), s.generated.len());
            request_metrics::finished("failed", "abort", prompt, generated, &s.times());
            let _ = s.req.events.send(Event::Failed(failure.clone()));
        }
    }

    fn drop_seq(&mut self, s: &Seq) {
        self.blocks.release(s.id);
        self.to_free.push(s.id);
    }

    /// Removes cancelled (receiver dropped) and expired sequences.
    fn reap(&mut self, now: Instant) {
        let mut keep = Vec::with_capacity(self.running.len());
        for s in std::mem::take(&mut self.running) {
            if let Some(reason) = Self::gone(&s, now) {
                self.finish_gone(&s, reason);
                self.drop_seq(&s);
            } else {
                keep.push(s);
            }
        }
        self.running = keep;
        let mut waiting = VecDeque::with_capacity(self.waiting.len());
        for s in std::mem::take(&mut self.waiting) {
            match Self::gone(&s, now) {
                Some(reason) => {
                    self.finish_gone(&s, reason);
                    self.drop_seq(&s);
                }
                None => waiting.push_back(s),
            }
        }
        self.waiting = waiting;
    }

    /// The cached prefix waiting request `w` may be admitted on, as a count of its leading
    /// block hashes (whole blocks, short of its last token, whose logits choose the first new
    /// token; none while its prompt's logprobs are still to compute: a cached position has no
    /// logits row), and whether it waits instead: a running sequence is prefilling its next
    /// uncached block right now (the n choices of one request, or identical prompts arriving
    /// together, prefill the shared prompt once).
    fn admission_prefix(&mut self, w: usize) -> (usize, bool) {
        let (bs, prefix_cache) = (self.blocks.block_size(), self.blocks.prefix_cache());
        let cand = &mut self.waiting[w];
        let reusable = if prefix_cache && !cand.scoring() { (cand.tokens() - 1) / bs } else { 0 };
        cand.hash_blocks(reusable, bs);
        let hashes = &cand.hashes[..reusable];
        let hit = self.blocks.lookup(hashes);
        let waits = hit < reusable
            && self
                .running
                .iter()
                .any(|r| r.registered <= hit && r.hashes.get(hit) == hashes.get(hit));
        (reusable, waits)
    }

    fn gone(s: &Seq, now: Instant) -> Option<&'static str> {
        if s.req.events.is_closed() {
            Some("cancelled")
        } else if s.req.deadline.is_some_and(|d| now >= d) {
            Some("deadline")
        } else {
            None
        }
    }

    fn finish_gone(&self, s: &Seq, reason: &'static str) {
        request_metrics::finished(
            reason,
            "abort",
            s.req.prompt.len(),
            s.generated.len(),
            &s.times(),
        );
        if reason == "deadline" {
            let _ = s.req.events.send(Event::Failed(Failure::DeadlineExceeded));
        }
    }

    /// One scheduling step and one forward pass. An error means the group is broken.
    pub fn step(&mut self, exec: &mut dyn StepExecutor) -> Result<(), ModelError> {
        let now = Instant::now();
        self.reap(now);

        // Every running sequence needs a slot for the token it appends this step.
        let mut preempted = false;
        let mut i = 0;
        while i < self.running.len() {
            let (id, need) =
                (self.running[i].id, self.running[i].cached.max(self.running[i].tokens()) + 1);
            if self.blocks.grow(id, need) {
                i += 1;
                continue;
            }
            let v = self.least_important().expect("non-empty");
            self.preempt(v);
            if v < i {
                i -= 1; // the sequence being grown moved down one place
            }
            preempted = true;
        }
        // A more important request waiting for blocks or a seat takes them (vLLM's priority
        // preemption); not while the running ones are short themselves.
        if !preempted {
            self.preempt_for_priority();
        }

        // The step's token budget: running decodes first (one token each), then the prompts
        // being prefilled and new admissions, by priority: the prompts of the best waiting
        // request's priority or a lower value (in admission order within a priority), the
        // admissions, then the prompts of a higher value. A prompt longer than what is left is
        // prefilled over several steps (chunked prefill).
        let decodes = self.running.iter().filter(|s| s.remaining() == 1).count();
        let guarded = self.cfg.max_step_stretch.is_some() && decodes > 0;
        let mut budget = StepBudget::new(
            self.cfg.max_batched_tokens.saturating_sub(decodes),
            guarded.then(|| self.pace.prefill_cap()),
        );
        let mut work: Vec<(usize, usize)> = Vec::with_capacity(self.running.len());
        let mut scored_rows = ScoredRows(self.max_scored_rows);
        let mut prefilling = Vec::new();
        for (i, s) in self.running.iter().enumerate() {
            if s.remaining() == 1 {
                work.push((i, 1));
            } else {
                prefilling.push(i);
            }
        }
        // Stable: admission order within a priority.
        prefilling.sort_by_key(|&i| self.running[i].req.priority);
        let best_waiting = self.waiting.front().filter(|_| !preempted).map(|w| w.req.priority);
        let before_admissions = prefilling
            .partition_point(|&i| best_waiting.is_none_or(|p| self.running[i].req.priority <= p));
        let later = prefilling.split_off(before_admissions);
        for i in prefilling {
            prefill_share(&self.running[i], i, &mut budget, &mut scored_rows, &mut work);
        }
        // Admit in queue order, priority then arrival (not while preempting: that would only
        // thrash). A request whose next uncached block a running sequence is prefilling right
        // now waits for it (the n choices of one request, or identical prompts arriving
        // together, prefill the shared prompt once); the requests behind it go ahead.
        let mut w = 0;
        while !preempted && budget.tokens() > 0 && self.running.len() < self.cfg.max_num_seqs {
            let bs = self.blocks.block_size();
            let Some(need) = self.waiting.get(w).map(Seq::tokens) else { break };
            let (reusable, waits) = self.admission_prefix(w);
            if waits {
                w += 1;
                continue;
            }
            let cand = &self.waiting[w];
            let Some(hit) = self.blocks.admit(cand.id, &cand.hashes[..reusable], need + 1) else {
                break;
            };
            let mut s = self.waiting.remove(w).expect("candidate exists");
            s.cached = hit * bs;
            s.prefill_from = s.cached;
            s.registered = hit;
            if s.admitted.is_none() {
                s.admitted = Some(now);
                s.cached_tokens = s.cached;
                self.prefix_queried += s.req.prompt.len() as u64;
                self.prefix_hits += s.cached as u64;
                request_metrics::admitted(
                    s.req.prompt.len(),
                    s.cached,
                    now.duration_since(s.arrived).as_secs_f64(),
                );
            }
            let need = s.remaining();
            let n = scored_rows.take(&s, need, |need| budget.take(need, s.long_prefill()));
            if n == 0 {
                // Admitted (its blocks are held) but paced out of this step.
                self.running.push(s);
                break;
            }
            work.push((self.running.len(), n));
            self.running.push(s);
        }
        for i in later {
            prefill_share(&self.running[i], i, &mut budget, &mut scored_rows, &mut work);
        }

        let mut chunks = Vec::with_capacity(work.len());
        let mut positions = Vec::new();
        let mut rows: Vec<Tensor> = Vec::new();
        let mut offset = 0u32;
        for &(i, n) in &work {
            let s = &self.running[i];
            let (from, to) = (s.cached, s.cached + n);
            if let Some(img) = &s.req.image {
                // The image rows whose prompt positions fall in this chunk.
                let first = img.positions.partition_point(|&p| (p as usize) < from);
                let end = img.positions.partition_point(|&p| (p as usize) < to);
                if end > first {
                    positions.extend(
                        img.positions[first..end].iter().map(|&p| p - from as u32 + offset),
                    );
                    rows.push(img.rows.narrow(0, first, end - first)?);
                }
            }
            let finishing = to == s.tokens();
            let logits = if (s.req.keep_logits && s.generated.is_empty()) || s.scoring() {
                // Every prompt position's logits on the first prefill, when asked for.
                LogitRows::All
            } else if finishing {
                LogitRows::Last
            } else {
                LogitRows::None
            };
            chunks.push(SeqChunk {
                seq: s.id,
                tokens: s.token_range(from, to),
                start: from,
                logits,
                blocks: self.blocks.table(s.id).to_vec(),
            });
            offset += n as u32;
        }
        let image = if rows.is_empty() {
            None
        } else {
            Some(ImageRows {
                positions,
                rows: if rows.len() == 1 {
                    rows.pop().expect("one")
                } else {
                    Tensor::cat(&rows, 0)?
                },
            })
        };
        let plan = StepPlan { chunks, free: std::mem::take(&mut self.to_free), image };
        if plan.chunks.is_empty() {
            if !plan.free.is_empty() {
                exec.step(&plan)?;
            }
            return Ok(());
        }
        let prefill_tokens: usize =
            plan.chunks.iter().map(|c| c.tokens.len()).sum::<usize>() - decodes;
        let started = Instant::now();
        // Grammar masks of the constrained sequences that choose a token this step, computed
        // on another thread while the model runs the step.
        let choosing: Vec<usize> = work
            .iter()
            .filter(|&&(i, n)| {
                let s = &self.running[i];
                s.cached + n == s.tokens() && s.req.constraint.is_some()
            })
            .map(|&(i, _)| i)
            .collect();
        let (logits, mut masks) = if choosing.is_empty() {
            (exec.step(&plan), HashMap::new())
        } else {
            let constraints: Vec<(usize, &mut Constraint)> = self
                .running
                .iter_mut()
                .enumerate()
                .filter(|(i, _)| choosing.contains(i))
                .filter_map(|(i, s)| s.req.constraint.as_mut().map(|c| (i, c)))
                .collect();
            std::thread::scope(|scope| {
                let masking = scope.spawn(move || {
                    constraints.into_iter().map(|(i, c)| (i, c.mask())).collect::<HashMap<_, _>>()
                });
                let logits = exec.step(&plan);
                (logits, masking.join().expect("the grammar mask thread panicked. This is a bug."))
            })
        };
        if let Some(stretch) = self.cfg.max_step_stretch {
            let secs = started.elapsed().as_secs_f64();
            self.pace.record(secs, prefill_tokens, decodes, stretch);
        }
        let logits = logits?
            .ok_or_else(|| ModelError::InvalidInput("the step returned no logits".into()))?;
        let mut step_logits = StepLogits::new(logits);

        let now = Instant::now();
        let mut finished = Vec::new();
        let mut failed = Vec::new();
        let mut sampled = 0u64;
        // The sequences that choose a token this step: their logits row and grammar mask.
        let mut choosers = HashMap::new();
        // Per chunk, in order, the rows its `LogitRows` asked for.
        let mut at = 0;
        for (&(i, _), chunk) in work.iter().zip(&plan.chunks) {
            let s = &mut self.running[i];
            let n = chunk.logits.count(chunk.tokens.len());
            if chunk.logits == LogitRows::All {
                let rows = step_logits.tensor().narrow(0, at, n)?.to_device(&Device::Cpu)?;
                if s.req.prompt_logprobs {
                    let top = s.req.prompt_top_logprobs;
                    let known = &mut s.prompt_logprobs;
                    prompt_logprobs::extend(known, &s.req.prompt, &rows, chunk.start, top)?;
                }
                if s.req.keep_logits {
                    s.prompt_logits.push(rows);
                }
            }
            at += n;
            s.cached = chunk.start + chunk.tokens.len();
            // Blocks this step filled are now reusable by later requests.
            let bs = self.blocks.block_size();
            s.hash_blocks(s.cached / bs, bs);
            for b in s.registered..s.cached / bs {
                self.blocks.register(s.id, b, s.hashes[b]);
            }
            s.registered = s.registered.max(s.cached / bs);
            if s.cached < s.tokens() {
                continue; // a prefill chunk that does not end the prompt
            }
            if !s.prompt_logits.is_empty() {
                let parts = std::mem::take(&mut s.prompt_logits);
                let _ = s.req.events.send(Event::PromptLogits(Tensor::cat(&parts, 0)?));
            }
            if s.req.prompt_logprobs && s.generated.is_empty() {
                let entries = std::mem::take(&mut s.prompt_logprobs);
                let _ = s.req.events.send(Event::PromptLogprobs(entries));
            }
            sampled += 1;
            let mask = match masks.remove(&i) {
                Some(Err(e)) => {
                    let _ = s.req.events.send(Event::Failed(Failure::Invalid(e.to_string())));
                    failed.push(s.id);
                    continue;
                }
                Some(Ok(m)) => Some(m),
                None => None,
            };
            choosers.insert(i, (at - 1, mask));
        }
        // Every choosing sequence's token at once (sampled rows are drawn in parallel).
        let mut order = Vec::with_capacity(choosers.len());
        let mut asks = Vec::with_capacity(choosers.len());
        // The choosers with banned tokens this step (bad words, stop ids below the minimum);
        // most have none, and keep the device argmax.
        let banned: HashMap<usize, Vec<u32>> = choosers
            .keys()
            .filter_map(|&i| {
                let s = &self.running[i];
                let b = s.req.filter.banned(&s.generated, &s.req.stop_ids, s.req.min_new_tokens);
                (!b.is_empty()).then_some((i, b))
            })
            .collect();
        for (i, s) in self.running.iter_mut().enumerate() {
            if let Some((row, mask)) = choosers.get(&i) {
                order.push(i);
                asks.push((
                    *row,
                    Ask {
                        params: &s.req.params,
                        generated: &s.generated,
                        rng: &mut s.rng,
                        logprob: s.req.logprobs,
                        top_logprobs: s.req.top_logprobs,
                        keep_row: s.req.keep_logits,
                        mask: mask.as_ref(),
                        banned: banned.get(&i).map_or(&[], Vec::as_slice),
                        allowed: s.req.filter.allowed.as_deref(),
                    },
                ));
            }
        }
        let choices = step_logits.choose_rows(asks)?;
        for (i, choice) in order.into_iter().zip(choices) {
            let s = &mut self.running[i];
            let Choice { id: token, logprob, top, row: kept } = choice;
            let mut complete = false;
            if let Some(c) = s.req.constraint.as_mut() {
                if let Err(e) = c.consume(token) {
                    let _ = s.req.events.send(Event::Failed(Failure::Invalid(e.to_string())));
                    failed.push(s.id);
                    continue;
                }
                complete = c.is_complete();
            }
            s.generated.push(token);
            match s.last_token {
                None => {
                    s.first_token = Some(now);
                    request_metrics::first_token(now.duration_since(s.arrived).as_secs_f64());
                }
                Some(prev) => request_metrics::next_token(now.duration_since(prev).as_secs_f64()),
            }
            s.last_token = Some(now);
            let cached_tokens = (s.generated.len() == 1).then_some(s.cached_tokens);
            let _ = s.req.events.send(Event::Token {
                id: token,
                logprob,
                top,
                logits: kept,
                cached_tokens,
            });
            let reason = if s.req.stop_ids.contains(&token) || complete {
                Some(FinishReason::Stop)
            } else if s.generated.len() >= s.req.max_new_tokens
                || s.cached + 1 >= self.cfg.max_positions
            {
                Some(FinishReason::Length)
            } else {
                None
            };
            if let Some(reason) = reason {
                let usage = Usage {
                    prompt_tokens: s.req.prompt.len(),
                    completion_tokens: s.generated.len(),
                    queue_seconds: s
                        .admitted
                        .map_or(0.0, |a| a.duration_since(s.arrived).as_secs_f64()),
                    time_to_first_token_seconds: s
                        .first_token
                        .map_or(0.0, |f| f.duration_since(s.arrived).as_secs_f64()),
                    cached_tokens: s.cached_tokens,
                };
                let _ = s.req.events.send(Event::Finished { reason, usage });
                let label = if reason == FinishReason::Stop { "stop" } else { "length" };
                request_metrics::finished(
                    "ok",
                    label,
                    s.req.prompt.len(),
                    s.generated.len(),
                    &s.times(),
                );
                finished.push(s.id);
            }
        }
        request_metrics::generated(sampled);
        if !failed.is_empty() {
            for s in self.running.iter().filter(|s| failed.contains(&s.id)) {
                let (prompt, generated) = (s.req.prompt.len(), s.generated.len());
                request_metrics::finished("grammar_error", "abort", prompt, generated, &s.times());
            }
            finished.extend(failed);
        }
        if !finished.is_empty() {
            let (done, keep): (Vec<Seq>, Vec<Seq>) = std::mem::take(&mut self.running)
                .into_iter()
                .partition(|s| finished.contains(&s.id));
            self.running = keep;
            for s in &done {
                self.drop_seq(s);
            }
        }
        Ok(())
    }
}

/// Gives the running prompt `s` (at `i`) its share of what is left of the step's budget.
fn prefill_share(
    s: &Seq,
    i: usize,
    budget: &mut StepBudget,
    scored_rows: &mut ScoredRows,
    work: &mut Vec<(usize, usize)>,
) {
    let n = scored_rows.take(s, s.remaining(), |left| budget.take(left, s.long_prefill()));
    if n > 0 {
        work.push((i, n));
    }
}

#[path = "preempt.rs"]
mod preempt;
