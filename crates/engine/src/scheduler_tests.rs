//! The scheduler against a fake model: admission, FIFO order, token and sequence limits,
//! preemption by recomputation, reaping of cancelled and expired sequences, and refusals.
//!
//! [`FakeModel`] is a [`StepExecutor`] whose "KV pool" holds, per block slot, the token whose
//! KV was written there: it reads each chunk's history through its block table (a position
//! never written is a bug; a block overwritten by another sequence gives a wrong history and
//! so wrong tokens), checks that tables cover the tokens, and answers with
//! logits whose argmax is a fixed function of the history, so the expected greedy output of any
//! prompt is known without a model.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use candle_core::{Device, Tensor};
use dsvl_models::llm::{PagedKvConfig, SeqId, StepPlan};
use dsvl_models::ModelError;
use tokio::sync::mpsc::UnboundedReceiver;

use crate::blocks::BlockManager;
use crate::generate::{FinishReason, StepExecutor};
use crate::scheduler::{Event, Failure, NewRequest, Scheduler, SchedulerConfig};
use crate::token_filter::TokenFilter;

const VOCAB: usize = 50;
const BLOCK: usize = 4;

/// The token a history leads to.
fn next_token(history: &[u32]) -> u32 {
    let h = history.iter().fold(7u64, |a, &t| a.wrapping_mul(31).wrapping_add(u64::from(t)));
    (h % VOCAB as u64) as u32
}

/// Greedy output of `prompt` for `n` tokens.
fn expected(prompt: &[u32], n: usize) -> Vec<u32> {
    let mut h = prompt.to_vec();
    for _ in 0..n {
        h.push(next_token(&h));
    }
    h[prompt.len()..].to_vec()
}

/// One plan as the fake saw it: chunks as `(seq, start, tokens)`, and the freed sequences.
type PlanSummary = (Vec<(SeqId, usize, usize)>, Vec<SeqId>);

/// What one KV slot holds: the token written there.
type Slots = [Option<u32>; BLOCK];

#[derive(Default)]
struct FakeModel {
    /// The paged pool: what each block's slots hold (the token whose KV was written there).
    pool: HashMap<u32, Slots>,
    /// Every plan, for assertions: (chunks as (seq, start, len), freed).
    plans: Vec<PlanSummary>,
    /// Wall time a step takes: a fixed part and a part per token (none by default), for the
    /// pace guard, which measures steps.
    cost: Option<(Duration, Duration)>,
}

impl StepExecutor for FakeModel {
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        let mut logits = Vec::with_capacity(plan.chunks.len() * VOCAB);
        let mut rows = 0;
        for c in &plan.chunks {
            assert!(
                c.blocks.len() * BLOCK >= c.start + c.tokens.len(),
                "seq {}: blocks do not cover the tokens",
                c.seq
            );
            // The history the kernel reads through the block table: every position before the
            // chunk must have been written (by this sequence or by the one whose cached blocks
            // it adopted).
            let cached: Vec<u32> = (0..c.start)
                .map(|p| {
                    self.pool
                        .get(&c.blocks[p / BLOCK])
                        .and_then(|s| s[p % BLOCK])
                        .unwrap_or_else(|| panic!("seq {}: position {p} was never written", c.seq))
                })
                .collect();
            for (i, &t) in c.tokens.iter().enumerate() {
                let p = c.start + i;
                self.pool.entry(c.blocks[p / BLOCK]).or_default()[p % BLOCK] = Some(t);
            }
            let n = c.logits.count(c.tokens.len());
            for i in c.tokens.len() - n..c.tokens.len() {
                let mut row = vec![0f32; VOCAB];
                let history: Vec<u32> = cached.iter().chain(&c.tokens[..=i]).copied().collect();
                row[next_token(&history) as usize] = 10.0;
                logits.extend(row);
            }
            rows += n;
        }
        if let Some((fixed, per_token)) = self.cost {
            let tokens: usize = plan.chunks.iter().map(|c| c.tokens.len()).sum();
            std::thread::sleep(fixed + per_token * tokens as u32);
        }
        let summary = plan.chunks.iter().map(|c| (c.seq, c.start, c.tokens.len())).collect();
        self.plans.push((summary, plan.free.clone()));
        if plan.chunks.is_empty() {
            return Ok(None);
        }
        Ok(Some(Tensor::from_vec(logits, (rows, VOCAB), &Device::Cpu)?))
    }

    fn kv_config(&self) -> PagedKvConfig {
        PagedKvConfig { num_blocks: 64, block_size: BLOCK }
    }
}

fn scheduler(max_num_seqs: usize, max_batched_tokens: usize, blocks: usize) -> Scheduler {
    let cfg = SchedulerConfig {
        max_num_seqs,
        max_batched_tokens,
        max_positions: 64,
        max_step_stretch: None,
    };
    Scheduler::new(cfg, BlockManager::new(blocks, BLOCK))
}

fn request(prompt: Vec<u32>, max_new: usize) -> (NewRequest, UnboundedReceiver<Event>) {
    NewRequest::greedy(prompt, None, max_new)
}

fn prompt(i: u32, len: usize) -> Vec<u32> {
    (0..len as u32).map(|j| (i * 13 + j * 7) % VOCAB as u32).collect()
}

/// Everything a stream received: its tokens and how it ended.
fn drain(rx: &mut UnboundedReceiver<Event>) -> (Vec<u32>, Option<Event>) {
    let mut tokens = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, .. } => tokens.push(id),
            end => return (tokens, Some(end)),
        }
    }
    (tokens, None)
}

fn run_to_end(s: &mut Scheduler, model: &mut FakeModel) {
    for _ in 0..10_000 {
        if !s.has_work() {
            return;
        }
        s.step(model).unwrap();
    }
    panic!("the scheduler never ran out of work");
}

#[test]
fn admits_in_arrival_order_within_the_sequence_limit() {
    let mut s = scheduler(2, 1000, 64);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for i in 0..5 {
        let (req, rx) = request(prompt(i, 5), 6);
        s.add(req);
        rxs.push(rx);
    }
    run_to_end(&mut s, &mut model);
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (tokens, end) = drain(rx);
        assert_eq!(tokens, expected(&prompt(i as u32, 5), 6), "request {i}");
        assert!(matches!(end, Some(Event::Finished { reason: FinishReason::Length, .. })));
    }
    assert!(model.plans.iter().all(|(chunks, _)| chunks.len() <= 2), "max_num_seqs");
    // First prefills (start 0) happen in arrival order (ids are given at arrival).
    let first_prefills: Vec<SeqId> =
        model.plans.iter().flat_map(|(c, _)| c.iter().filter(|x| x.1 == 0).map(|x| x.0)).collect();
    assert!(first_prefills.windows(2).all(|w| w[0] < w[1]), "{first_prefills:?}");
    assert_eq!(s.occupancy().blocks_used, 0, "every block returned");
}

#[test]
fn token_budget_caps_every_step_and_long_prompts_are_chunked() {
    let mut s = scheduler(8, 10, 64);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for (i, len) in [6, 6, 25, 3].into_iter().enumerate() {
        let (req, rx) = request(prompt(i as u32, len), 3);
        s.add(req);
        rxs.push((rx, len));
    }
    run_to_end(&mut s, &mut model);
    for (chunks, _) in &model.plans {
        let tokens: usize = chunks.iter().map(|c| c.2).sum();
        assert!(tokens <= 10, "a step of {tokens} tokens: {chunks:?}");
    }
    let long = 3; // the third request's sequence id
    let parts = model.plans.iter().flat_map(|(c, _)| c.iter()).filter(|c| c.0 == long).count();
    assert!(parts >= 3 + 3, "25 tokens in chunks of at most 10, then decodes: {parts} chunks");
    for (i, (rx, len)) in rxs.iter_mut().enumerate() {
        assert_eq!(drain(rx).0, expected(&prompt(i as u32, *len), 3), "request {i}");
    }
}

#[test]
fn running_streams_decode_in_every_step_of_a_long_prefill() {
    let mut s = scheduler(8, 8, 64);
    let mut model = FakeModel::default();
    let (req, mut rx_running) = request(prompt(1, 4), 30);
    s.add(req);
    for _ in 0..3 {
        s.step(&mut model).unwrap();
    }
    let (req, mut rx_long) = request(prompt(2, 40), 2);
    s.add(req);
    let before = model.plans.len();
    run_to_end(&mut s, &mut model);
    // While the 40-token prompt is prefilled (7 tokens a step), sequence 1 decodes every step.
    let during: Vec<_> = model.plans[before..]
        .iter()
        .take_while(|(c, _)| c.iter().any(|x| x.0 == 2 && x.1 + x.2 < 40))
        .collect();
    assert!(during.len() >= 5, "the prompt was not chunked: {during:?}");
    for (chunks, _) in during {
        assert!(chunks.iter().any(|x| x.0 == 1 && x.2 == 1), "no decode in {chunks:?}");
    }
    assert_eq!(drain(&mut rx_running).0, expected(&prompt(1, 4), 30));
    assert_eq!(drain(&mut rx_long).0, expected(&prompt(2, 40), 2));
}

/// A scheduler with the pace guard at a stretch of 1.3, and a fake model whose step costs 1 ms
/// plus 0.25 ms a token.
fn paced(max_num_seqs: usize) -> (Scheduler, FakeModel) {
    let cfg = SchedulerConfig {
        max_num_seqs,
        max_batched_tokens: 512,
        max_positions: 1024,
        max_step_stretch: Some(1.3),
    };
    let model = FakeModel {
        cost: Some((Duration::from_millis(1), Duration::from_micros(250))),
        ..FakeModel::default()
    };
    (Scheduler::new(cfg, BlockManager::new(256, BLOCK)), model)
}

#[test]
fn the_pace_guard_chunks_a_long_prompt_to_its_last_token() {
    // One running stream's step is 1.25 ms: a mixed step has room for one or two prompt tokens.
    let (mut s, mut model) = paced(4);
    let (req, mut rx_running) = request(prompt(1, 4), 2000);
    s.add(req);
    for _ in 0..10 {
        s.step(&mut model).unwrap();
    }
    // Long enough to be paced (over 256 tokens), short enough for the test to be quick.
    let (req, mut rx_long) = request(prompt(2, 300), 1);
    s.add(req);
    let before = model.plans.len();
    for _ in 0..2000 {
        s.step(&mut model).unwrap();
        if matches!(drain(&mut rx_long).1, Some(Event::Finished { .. })) {
            break;
        }
    }
    let long = 2;
    let chunks: Vec<usize> = model.plans[before..]
        .iter()
        .flat_map(|(c, _)| c.iter().filter(|c| c.0 == long).map(|c| c.2))
        .collect();
    assert_eq!(chunks.iter().sum::<usize>(), 300, "the whole prompt ran: {chunks:?}");
    // The first chunk probes (16 tokens); after it every chunk is sized by the measured pace,
    // the last ones too (they once ran as one chunk of what was left under 256 tokens).
    let largest_after_probe = chunks[1..].iter().copied().max().unwrap_or(0);
    assert!(
        largest_after_probe <= 16,
        "a paced prompt ran a chunk of {largest_after_probe} tokens: {chunks:?}"
    );
    assert!(drain(&mut rx_running).1.is_none(), "the running stream goes on");
}

#[test]
fn the_pace_guard_lets_a_burst_of_short_prompts_in_one_a_step() {
    // Four running streams' step is 2 ms: a mixed step has room for two or three prompt tokens.
    let (mut s, mut model) = paced(16);
    let mut running = Vec::new();
    for i in 0..4 {
        let (req, rx) = request(prompt(i, 4), 500);
        s.add(req);
        running.push(rx);
    }
    for _ in 0..10 {
        s.step(&mut model).unwrap();
    }
    // Eight short prompts at once: 8 x 40 tokens fit the token budget, not the pace.
    let mut burst = Vec::new();
    for i in 0..8 {
        let (req, rx) = request(prompt(10 + i, 40), 2);
        s.add(req);
        burst.push((rx, i));
    }
    let before = model.plans.len();
    for _ in 0..50 {
        s.step(&mut model).unwrap();
    }
    for (chunks, _) in &model.plans[before..] {
        let prefills = chunks.iter().filter(|c| c.2 > 1).count();
        assert!(prefills <= 1, "{prefills} prompts prefilled in one step: {chunks:?}");
        // Short prompts run whole, not chunked.
        assert!(chunks.iter().all(|c| c.2 == 1 || (c.1 == 0 && c.2 == 40)), "{chunks:?}");
    }
    for (rx, i) in &mut burst {
        assert_eq!(drain(rx).0, expected(&prompt(10 + *i, 40), 2), "burst prompt {i}");
    }
    for rx in &mut running {
        assert!(drain(rx).1.is_none(), "the running streams go on");
    }
}

#[test]
fn preemption_recomputes_without_restreaming() {
    // 6 blocks of 4 slots for 3 sequences of 5 + 10 tokens: someone must be preempted.
    let mut s = scheduler(4, 1000, 6);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for i in 0..3 {
        let (req, rx) = request(prompt(i, 5), 10);
        s.add(req);
        rxs.push(rx);
    }
    run_to_end(&mut s, &mut model);
    assert!(s.occupancy().preemptions > 0, "the pool was large enough: no preemption tested");
    for (i, rx) in rxs.iter_mut().enumerate() {
        let (tokens, end) = drain(rx);
        // Exactly the expected tokens, each once: the recompute re-streams nothing.
        assert_eq!(tokens, expected(&prompt(i as u32, 5), 10), "request {i}");
        assert!(matches!(end, Some(Event::Finished { .. })));
    }
    assert_eq!(s.occupancy().blocks_used, 0);
}

/// vLLM's `priority`: lower values are admitted first, ties in arrival order; every request
/// still gets exactly its tokens.
#[test]
fn lower_priority_values_are_admitted_first() {
    let mut s = scheduler(1, 1000, 64);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for (i, priority) in [0, 5, -1, 0].into_iter().enumerate() {
        let (mut req, rx) = request(prompt(i as u32, 5), 3);
        req.priority = priority;
        s.add(req);
        rxs.push(rx);
    }
    run_to_end(&mut s, &mut model);
    let first_prefills: Vec<SeqId> =
        model.plans.iter().flat_map(|(c, _)| c.iter().filter(|x| x.1 == 0).map(|x| x.0)).collect();
    assert_eq!(first_prefills, [3, 1, 4, 2], "ids are given at arrival, from 1");
    for (i, rx) in rxs.iter_mut().enumerate() {
        assert_eq!(drain(rx).0, expected(&prompt(i as u32, 5), 3), "request {i}");
    }
}

/// When blocks run out, the sequence preempted first is the one with the highest priority
/// value (without priorities: the latest admitted), and outputs stay exact.
#[test]
fn the_least_important_sequence_is_preempted_first() {
    let first_victim = |priorities: [i32; 3]| {
        // 6 blocks of 4 slots for 3 sequences of 5 + 10 tokens: someone must be preempted.
        let mut s = scheduler(4, 1000, 6);
        let mut model = FakeModel::default();
        let mut rxs = Vec::new();
        for (i, priority) in priorities.into_iter().enumerate() {
            let (mut req, rx) = request(prompt(i as u32, 5), 10);
            req.priority = priority;
            s.add(req);
            rxs.push(rx);
        }
        run_to_end(&mut s, &mut model);
        for (i, rx) in rxs.iter_mut().enumerate() {
            assert_eq!(drain(rx).0, expected(&prompt(i as u32, 5), 10), "request {i}");
        }
        // The first sequence whose prompt is prefilled a second time.
        let mut seen = std::collections::HashSet::new();
        model
            .plans
            .iter()
            .flat_map(|(c, _)| c.iter().filter(|x| x.1 == 0).map(|x| x.0))
            .find(|&id| !seen.insert(id))
            .expect("a preemption")
    };
    assert_eq!(first_victim([0, 0, 0]), 3, "the latest admitted");
    assert_eq!(first_victim([3, 0, 0]), 1, "the highest priority value");
    assert_eq!(first_victim([0, 2, 1]), 2);
}

#[test]
fn cancelled_and_expired_sequences_are_reaped_and_freed() {
    let mut s = scheduler(4, 1000, 64);
    let mut model = FakeModel::default();
    let (req, rx_cancel) = request(prompt(1, 5), 50);
    s.add(req);
    let (mut req, mut rx_expire) = request(prompt(2, 5), 50);
    req.deadline = Some(Instant::now() + Duration::from_millis(30));
    s.add(req);
    let (req, mut rx_keep) = request(prompt(3, 5), 5);
    s.add(req);
    s.step(&mut model).unwrap();
    assert_eq!(s.occupancy().running, 3);
    drop(rx_cancel);
    std::thread::sleep(Duration::from_millis(40));
    s.step(&mut model).unwrap();
    assert_eq!(s.occupancy().running, 1, "the cancelled and the expired sequence are gone");
    let (_, freed) = model.plans.last().unwrap();
    assert_eq!(freed.len(), 2, "both freed on the workers in the same step: {freed:?}");
    let (_, end) = drain(&mut rx_expire);
    assert!(matches!(end, Some(Event::Failed(Failure::DeadlineExceeded))), "{end:?}");
    run_to_end(&mut s, &mut model);
    assert_eq!(drain(&mut rx_keep).0, expected(&prompt(3, 5), 5));
    assert_eq!(s.occupancy().blocks_used, 0);
    let mut freed: Vec<SeqId> = model.plans.iter().flat_map(|(_, f)| f.clone()).collect();
    freed.sort_unstable();
    assert_eq!(freed, vec![1, 2, 3], "every sequence was freed on the ranks, once");
}

/// Runs `prompt` to the end alone; returns its tokens and how many prompt tokens came from
/// the prefix cache.
fn answer(
    s: &mut Scheduler,
    model: &mut FakeModel,
    prompt: Vec<u32>,
    n: usize,
) -> (Vec<u32>, usize) {
    let (req, mut rx) = request(prompt, n);
    s.add(req);
    run_to_end(s, model);
    let mut cached_first = None;
    let mut tokens = Vec::new();
    while let Ok(ev) = rx.try_recv() {
        match ev {
            Event::Token { id, cached_tokens, .. } => {
                if tokens.is_empty() {
                    cached_first = cached_tokens;
                }
                tokens.push(id);
            }
            Event::Finished { usage, .. } => {
                assert_eq!(Some(usage.cached_tokens), cached_first, "first token and usage agree");
                return (tokens, usage.cached_tokens);
            }
            other => panic!("{other:?}"),
        }
    }
    panic!("no finish");
}

#[test]
fn prefix_cache_reuses_finished_blocks_and_keeps_outputs() {
    let mut s = scheduler(4, 1000, 64);
    let mut model = FakeModel::default();
    let p = prompt(1, 10);
    assert_eq!(answer(&mut s, &mut model, p.clone(), 6), (expected(&p, 6), 0), "cold");
    // The same prompt again: two full blocks (8 tokens) cached, the rest computed.
    assert_eq!(answer(&mut s, &mut model, p.clone(), 6), (expected(&p, 6), 8));
    let (chunks, _) = model.plans.iter().rev().find(|(c, _)| c.iter().any(|x| x.2 > 1)).unwrap();
    assert_eq!(chunks[0].1, 8, "the prefill started after the cached blocks: {chunks:?}");
    // A prompt of exactly two blocks keeps its last token to compute: one block cached.
    assert_eq!(answer(&mut s, &mut model, p[..8].to_vec(), 3).1, 4);
    // The next turn of the conversation: prompt + answer + a new message. The blocks filled
    // while generating are cached too (16 tokens computed, 4 full blocks).
    let mut turn2 = p.clone();
    turn2.extend(expected(&p, 6));
    turn2.extend([3, 1, 4, 1, 5]);
    let (tokens, cached) = answer(&mut s, &mut model, turn2.clone(), 5);
    assert_eq!(tokens, expected(&turn2, 5));
    assert_eq!(cached, 12, "blocks 0-2 (block 3 holds the last answer token, never computed)");
    // A different prompt shares nothing.
    assert_eq!(answer(&mut s, &mut model, prompt(2, 10), 2).1, 0);
    let occ = s.occupancy();
    assert_eq!(occ.blocks_used, 0, "nothing held once every request ended");
    assert!(occ.blocks_cached > 0, "the finished blocks stay cached");
    assert_eq!(occ.prefix_hit_tokens, 8 + 4 + 12);
}

#[test]
fn prefix_cache_off_computes_everything() {
    let cfg = SchedulerConfig {
        max_num_seqs: 4,
        max_batched_tokens: 1000,
        max_positions: 64,
        max_step_stretch: None,
    };
    let mut s = Scheduler::new(cfg, BlockManager::new(64, BLOCK).with_prefix_cache(false));
    let mut model = FakeModel::default();
    let p = prompt(1, 10);
    for _ in 0..2 {
        assert_eq!(answer(&mut s, &mut model, p.clone(), 4), (expected(&p, 4), 0));
    }
    assert_eq!(s.occupancy().blocks_cached, 0);
}

#[test]
fn cached_blocks_are_evicted_under_pressure_and_outputs_hold() {
    // 8 blocks of 4: each 10 + 6 token request needs 4. Many distinct prompts and repeats
    // churn the cache through eviction; every answer must stay exact.
    let mut s = scheduler(2, 1000, 8);
    let mut model = FakeModel::default();
    for round in 0..3 {
        for i in 0..4u32 {
            let p = prompt(i, 10);
            let (tokens, _) = answer(&mut s, &mut model, p.clone(), 6);
            assert_eq!(tokens, expected(&p, 6), "round {round} prompt {i}");
        }
    }
    assert_eq!(s.occupancy().blocks_used, 0);
    assert!(s.occupancy().blocks_cached <= 8);
    // Concurrent identical prompts share blocks and still answer exactly.
    let mut rxs = Vec::new();
    for _ in 0..2 {
        let (req, rx) = request(prompt(9, 10), 6);
        s.add(req);
        rxs.push(rx);
    }
    run_to_end(&mut s, &mut model);
    for rx in &mut rxs {
        assert_eq!(drain(rx).0, expected(&prompt(9, 10), 6));
    }
}

#[test]
fn impossible_requests_fail_at_once() {
    let mut s = scheduler(4, 1000, 4); // 16 slots, 64 positions
    for (p, why) in [(vec![], "empty"), (prompt(0, 64), "positions"), (prompt(0, 20), "KV blocks")]
    {
        let (req, mut rx) = request(p, 4);
        s.add(req);
        match drain(&mut rx).1 {
            Some(Event::Failed(Failure::Invalid(m))) => assert!(m.contains(why), "{m}"),
            other => panic!("{why}: {other:?}"),
        }
    }
    assert!(!s.has_work(), "nothing was queued");
}

#[test]
fn stop_ids_end_with_stop_and_report_usage() {
    let mut s = scheduler(4, 1000, 64);
    let mut model = FakeModel::default();
    let p = prompt(4, 5);
    let want = expected(&p, 8);
    let (mut req, mut rx) = request(p.clone(), 8);
    req.stop_ids = vec![want[2]];
    s.add(req);
    run_to_end(&mut s, &mut model);
    let (tokens, end) = drain(&mut rx);
    let cut = want.iter().position(|&t| t == want[2]).unwrap() + 1;
    assert_eq!(tokens, want[..cut], "stops after the stop id, which is kept");
    match end {
        Some(Event::Finished { reason: FinishReason::Stop, usage }) => {
            assert_eq!((usage.prompt_tokens, usage.completion_tokens), (5, cut));
        }
        other => panic!("{other:?}"),
    }
}

/// `min_new_tokens`: the stop ids cannot be chosen before the minimum (greedy takes the best
/// other token), and end generation as usual after it.
#[test]
fn stop_ids_wait_for_the_minimum_of_new_tokens() {
    let p = prompt(4, 5);
    let first = expected(&p, 1)[0];
    // The token a greedy row of the fake model takes when its best is banned: the first of the
    // ties at 0.
    let stop_ids = vec![first, 0, 1];
    let fallback = (0..VOCAB as u32).find(|t| !stop_ids.contains(t)).unwrap();
    for min in [0, 1, 3, 6] {
        let (max_new, mut want, mut want_reason) = (20, Vec::new(), FinishReason::Length);
        let mut h = p.clone();
        while want.len() < max_new {
            let mut t = next_token(&h);
            if want.len() < min && stop_ids.contains(&t) {
                t = fallback;
            }
            h.push(t);
            want.push(t);
            if stop_ids.contains(&t) {
                want_reason = FinishReason::Stop;
                break;
            }
        }
        let mut s = scheduler(4, 1000, 64);
        let mut model = FakeModel::default();
        let (mut req, mut rx) = request(p.clone(), max_new);
        req.stop_ids = stop_ids.clone();
        req.min_new_tokens = min;
        s.add(req);
        run_to_end(&mut s, &mut model);
        let (tokens, end) = drain(&mut rx);
        assert_eq!(tokens, want, "min {min}");
        assert!(tokens.len() >= min.max(1), "min {min}: {tokens:?}");
        assert!(tokens.iter().take(min).all(|t| !stop_ids.contains(t)), "min {min}: {tokens:?}");
        match end {
            Some(Event::Finished { reason, .. }) => assert_eq!(reason, want_reason, "min {min}"),
            other => panic!("{other:?}"),
        }
        if min == 0 {
            assert_eq!(tokens, [first], "without a minimum the first token stops");
        }
    }
}

/// vLLM's `bad_words` and `allowed_token_ids` reach the choice: a bad word's last token is not
/// taken after the rest of it (greedy takes the best other token, the first of the ties at 0),
/// and only allowed tokens are ever taken.
#[test]
fn bad_words_and_allowed_tokens_shape_the_choice() {
    let p = prompt(6, 5);
    let want = expected(&p, 2);
    let run = |filter: TokenFilter| {
        let mut s = scheduler(4, 1000, 64);
        let mut model = FakeModel::default();
        let (mut req, mut rx) = request(p.clone(), 6);
        req.filter = filter;
        s.add(req);
        run_to_end(&mut s, &mut model);
        drain(&mut rx).0
    };
    let tokens = run(TokenFilter { allowed: None, bad_words: vec![want.clone()] });
    let fallback = if want[1] == 0 { 1 } else { 0 };
    assert_eq!(tokens[..2], [want[0], fallback], "{want:?}");
    let allowed = vec![3u32, 5];
    let tokens = run(TokenFilter { allowed: Some(allowed.clone()), bad_words: vec![] });
    let mut h = p.clone();
    for &t in &tokens {
        let best = next_token(&h);
        assert_eq!(t, if allowed.contains(&best) { best } else { 3 }, "{tokens:?}");
        h.push(t);
    }
    assert_eq!(tokens.len(), 6);
}

#[test]
fn identical_prompts_arriving_together_prefill_once() {
    // Three copies of a 22-token prompt (the n choices of one request) and a different prompt
    // behind them: the first copy prefills, the others wait for its blocks and take 20 cached
    // tokens; the different prompt is not held up. Every answer stays exact.
    let mut s = scheduler(8, 1000, 64);
    let mut model = FakeModel::default();
    let p = prompt(3, 22);
    let mut rxs = Vec::new();
    for _ in 0..3 {
        let (req, rx) = request(p.clone(), 5);
        s.add(req);
        rxs.push(rx);
    }
    let other = prompt(40, 9);
    let (req, mut other_rx) = request(other.clone(), 5);
    s.add(req);
    s.step(&mut model).unwrap();
    let first: Vec<_> = model.plans[0].0.iter().map(|&(_, start, len)| (start, len)).collect();
    assert_eq!(first, [(0, 22), (0, 9)], "one copy and the other prompt prefill in step 1");
    run_to_end(&mut s, &mut model);
    let cached: Vec<usize> = rxs
        .iter_mut()
        .map(|rx| match drain(rx) {
            (tokens, Some(Event::Finished { usage, .. })) => {
                assert_eq!(tokens, expected(&p, 5));
                usage.cached_tokens
            }
            other => panic!("{other:?}"),
        })
        .collect();
    assert_eq!(cached, [0, 20, 20]);
    assert_eq!(drain(&mut other_rx).0, expected(&other, 5));
    // With the cache off there is nothing to wait for: all prefill at once.
    let mut s = Scheduler::new(
        SchedulerConfig {
            max_num_seqs: 8,
            max_batched_tokens: 1000,
            max_positions: 1000,
            max_step_stretch: None,
        },
        BlockManager::new(64, BLOCK).with_prefix_cache(false),
    );
    let mut model = FakeModel::default();
    for _ in 0..3 {
        let (req, rx) = request(p.clone(), 5);
        s.add(req);
        std::mem::forget(rx);
    }
    s.step(&mut model).unwrap();
    assert_eq!(model.plans[0].0.len(), 3);
}

#[test]
fn prompt_logprobs_score_every_prompt_token_in_capped_chunks() {
    let mut s = scheduler(4, 1000, 64).with_max_scored_rows(8);
    let mut model = FakeModel::default();
    let scored_prompt = prompt(1, 30);
    let (mut req, mut scored) = request(scored_prompt.clone(), 2);
    req.prompt_logprobs = true;
    req.prompt_top_logprobs = 2;
    s.add(req);
    let (req, mut plain) = request(prompt(2, 30), 2);
    s.add(req);
    run_to_end(&mut s, &mut model);
    // The scoring sequence (id 1) prefills 8 rows a step; the other one is not held back.
    let chunks = |seq| -> Vec<usize> {
        model.plans.iter().flat_map(|(c, _)| c.iter()).filter(|c| c.0 == seq).map(|c| c.2).collect()
    };
    assert_eq!(chunks(1), [8, 8, 8, 6, 1], "30 prompt tokens in chunks of 8, then a decode");
    assert_eq!(chunks(2), [30, 1]);
    assert_eq!(drain(&mut plain).0, expected(&prompt(2, 30), 2));
    let Ok(Event::PromptLogprobs(entries)) = scored.try_recv() else {
        panic!("the prompt logprobs come first")
    };
    assert_eq!(entries.len(), 29);
    // The fake's row at position p is 10 at the token its history leads to, 0 elsewhere.
    let lse = (10f64.exp() + (VOCAB - 1) as f64).ln();
    for (p, e) in entries.iter().enumerate() {
        assert_eq!(e.id, scored_prompt[p + 1]);
        let likely = next_token(&scored_prompt[..=p]);
        let want = if e.id == likely { 10.0 - lse } else { -lse };
        assert!((f64::from(e.logprob) - want).abs() < 1e-5, "position {}: {e:?}", p + 1);
        assert_eq!(e.top.len(), 2);
        assert_eq!(e.top[0].0, likely, "the most likely first");
    }
    assert_eq!(drain(&mut scored).0, expected(&scored_prompt, 2), "then the tokens as usual");
}

#[test]
fn prompt_logprobs_survive_preemption_whole_and_once() {
    // 8 blocks of 4 slots: a decoding stream (4 + 20 tokens) and a scored prompt of 20 tokens,
    // 4 rows a step, admitted second. The stream outgrows its blocks while the prompt is
    // still prefilling: the prompt is preempted mid-prefill and computed again from the start.
    let mut s = scheduler(4, 1000, 8).with_max_scored_rows(4);
    let mut model = FakeModel::default();
    let (req, mut stream) = request(prompt(0, 4), 20);
    s.add(req);
    let scored_prompt = prompt(1, 20);
    let (mut req, mut scored) = request(scored_prompt.clone(), 2);
    req.prompt_logprobs = true;
    s.add(req);
    run_to_end(&mut s, &mut model);
    assert!(s.occupancy().preemptions > 0, "no preemption tested");
    let firsts = model.plans.iter().flat_map(|(c, _)| c.iter()).filter(|c| c.0 == 2 && c.1 == 0);
    assert!(firsts.count() > 1, "the scored prompt was not prefilled again");
    assert_eq!(drain(&mut stream).0, expected(&prompt(0, 4), 20));
    let Ok(Event::PromptLogprobs(entries)) = scored.try_recv() else {
        panic!("the prompt logprobs come first")
    };
    let ids: Vec<u32> = entries.iter().map(|e| e.id).collect();
    assert_eq!(ids, scored_prompt[1..], "every position once, in order");
    let (tokens, end) = drain(&mut scored);
    assert_eq!(tokens, expected(&scored_prompt, 2));
    assert!(matches!(end, Some(Event::Finished { .. })), "{end:?}");
}

#[path = "preempt_tests.rs"]
mod preempt_tests;
