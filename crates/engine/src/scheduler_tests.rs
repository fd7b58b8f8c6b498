//! The scheduler against a fake model: admission, FIFO order, token and sequence limits,
//! preemption by recomputation, reaping of cancelled and expired sequences, and refusals.
//!
//! [`FakeModel`] is a [`StepExecutor`] whose "KV cache" is each sequence's token history: it
//! checks every plan the scheduler sends (a decode step needs the history the cache should
//! hold, block tables must cover the tokens, freed sequences lose their state) and answers with
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

#[derive(Default)]
struct FakeModel {
    /// What the KV cache holds per sequence.
    cache: HashMap<SeqId, Vec<u32>>,
    /// Every plan, for assertions: (chunks as (seq, start, len), freed).
    plans: Vec<PlanSummary>,
}

impl StepExecutor for FakeModel {
    fn step(&mut self, plan: &StepPlan) -> Result<Option<Tensor>, ModelError> {
        for id in &plan.free {
            self.cache.remove(id);
        }
        let mut logits = Vec::with_capacity(plan.chunks.len() * VOCAB);
        let mut rows = 0;
        for c in &plan.chunks {
            let cached = self.cache.entry(c.seq).or_default();
            assert_eq!(
                cached.len(),
                c.start,
                "seq {}: cache holds {} tokens, step starts at {}",
                c.seq,
                cached.len(),
                c.start
            );
            assert!(
                c.blocks.len() * BLOCK >= c.start + c.tokens.len(),
                "seq {}: blocks do not cover the tokens",
                c.seq
            );
            let n = c.logits.count(c.tokens.len());
            for i in c.tokens.len() - n..c.tokens.len() {
                let mut row = vec![0f32; VOCAB];
                let history: Vec<u32> = cached.iter().chain(&c.tokens[..=i]).copied().collect();
                row[next_token(&history) as usize] = 10.0;
                logits.extend(row);
            }
            rows += n;
            cached.extend_from_slice(&c.tokens);
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
    assert!(model.cache.is_empty(), "every sequence's state was freed on the model");
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
