//! Priority beyond admission order: a waiting request of a lower priority value takes blocks
//! or a seat from running sequences of a higher one (the scheduler's `preempt` module), only
//! as many as it needs and only when they suffice, equal priorities waiting; and it takes the
//! step's prefill budget before the prompts of a higher value being prefilled.

use super::*;

/// The plan index at which `seq` was prefilled from its start, each time.
fn prefills(model: &FakeModel, seq: SeqId) -> Vec<usize> {
    model
        .plans
        .iter()
        .enumerate()
        .filter(|(_, (chunks, _))| chunks.iter().any(|c| c.0 == seq && c.1 == 0))
        .map(|(i, _)| i)
        .collect()
}

/// How many times `seq` let go of its blocks: once at its end, once more per preemption.
fn releases(model: &FakeModel, seq: SeqId) -> usize {
    model.plans.iter().filter(|(_, free)| free.contains(&seq)).count()
}

/// The plan that frees `seq`'s blocks for good (the step after its last token, which
/// the blocks are already free for).
fn freed(model: &FakeModel, seq: SeqId) -> usize {
    model.plans.iter().rposition(|(_, free)| free.contains(&seq)).expect("freed")
}

/// Two sequences of priority `low` fill the 8 blocks (8 + 8 tokens each: 4 blocks); then a
/// request of priority `late` (8 + 4 tokens: 3 blocks at admission) arrives. Every stream's
/// output is checked against the expected tokens; returns the model, which saw every plan.
fn full_pool_then(low: i32, late: i32, max_num_seqs: usize) -> FakeModel {
    let mut s = scheduler(max_num_seqs, 1000, 8);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for i in 0..2 {
        let (mut req, rx) = request(prompt(i, 8), 8);
        req.priority = low;
        s.add(req);
        rxs.push((i, rx));
    }
    for _ in 0..5 {
        s.step(&mut model).unwrap();
    }
    assert_eq!(s.occupancy().blocks_used, 8, "the two fill the pool");
    let (mut req, rx) = request(prompt(2, 8), 4);
    req.priority = late;
    s.add(req);
    rxs.push((2, rx));
    run_to_end(&mut s, &mut model);
    for (i, mut rx) in rxs {
        let n = if i == 2 { 4 } else { 8 };
        assert_eq!(drain(&mut rx).0, expected(&prompt(i, 8), n), "request {i}");
    }
    model
}

#[test]
fn a_more_important_request_takes_the_blocks_of_a_less_important_one() {
    let model = full_pool_then(5, 0, 4);
    // Admitted at once (the step after it arrived), on the blocks of the latest admitted of
    // the two (sequence 2), whose prompt is computed again later; sequence 1 runs on.
    assert_eq!(prefills(&model, 3), [5]);
    assert_eq!(releases(&model, 2), 2, "preempted (and recomputed: its tokens are exact)");
    assert_eq!(releases(&model, 1), 1, "only as many as it needs");
}

#[test]
fn equal_priorities_wait_for_blocks_instead_of_preempting() {
    let model = full_pool_then(0, 0, 4);
    assert_eq!((releases(&model, 1), releases(&model, 2)), (1, 1), "no preemption");
    let first_end = freed(&model, 1).min(freed(&model, 2));
    assert!(prefills(&model, 3)[0] >= first_end, "admitted when blocks were freed");
}

#[test]
fn a_more_important_request_takes_a_seat() {
    // Blocks to spare, seats not: max_num_seqs 2.
    let mut s = scheduler(2, 1000, 64);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for (i, priority) in [(0, 1), (1, 3)] {
        let (mut req, rx) = request(prompt(i, 8), 8);
        req.priority = priority;
        s.add(req);
        rxs.push((i, 8, rx));
    }
    s.step(&mut model).unwrap();
    let (mut req, rx) = request(prompt(2, 8), 4);
    req.priority = 2;
    s.add(req);
    rxs.push((2, 4, rx));
    run_to_end(&mut s, &mut model);
    for (i, n, mut rx) in rxs {
        assert_eq!(drain(&mut rx).0, expected(&prompt(i, 8), n), "request {i}");
    }
    assert_eq!(prefills(&model, 3), [1], "seated at once");
    assert_eq!(releases(&model, 2), 2, "priority 3 gave up its seat");
    assert_eq!(releases(&model, 1), 1, "priority 1 (more important than 2) kept its");
}

#[test]
fn no_preemption_that_cannot_admit_the_request() {
    // Sequence 1 (priority 5) holds 4 of the 8 blocks, sequence 2 (priority 0) the other 4;
    // the late request (priority 0) needs 5 blocks: preempting sequence 1 is not enough.
    let mut s = scheduler(4, 1000, 8);
    let mut model = FakeModel::default();
    let mut rxs = Vec::new();
    for (i, priority) in [(0, 5), (1, 0)] {
        let (mut req, rx) = request(prompt(i, 8), 8);
        req.priority = priority;
        s.add(req);
        rxs.push((i, 8, 8, rx));
    }
    for _ in 0..5 {
        s.step(&mut model).unwrap();
    }
    let (req, rx) = request(prompt(2, 17), 2);
    s.add(req);
    rxs.push((2, 17, 2, rx));
    run_to_end(&mut s, &mut model);
    for (i, len, n, mut rx) in rxs {
        assert_eq!(drain(&mut rx).0, expected(&prompt(i, len), n), "request {i}");
    }
    assert_eq!((releases(&model, 1), releases(&model, 2)), (1, 1), "no preemption");
    assert!(prefills(&model, 3)[0] >= freed(&model, 1).min(freed(&model, 2)), "after an end");
}

/// The plan at which `seq`'s prompt of `len` tokens was prefilled to its end.
fn prefilled(model: &FakeModel, seq: SeqId, len: usize) -> usize {
    model
        .plans
        .iter()
        .position(|(chunks, _)| chunks.iter().any(|c| c.0 == seq && c.1 + c.2 == len))
        .expect("prefilled")
}

/// 8 tokens a step: two prompts of 24 tokens (priority 0) arrive, the first starts; an urgent
/// one (priority -1) arriving next is admitted at once and takes every later step's budget
/// until its prompt is done, before the one already being prefilled; each still streams
/// exactly its tokens. Of equal priority, it would wait behind both.
#[test]
fn an_urgent_prompt_takes_the_prefill_budget_first() {
    for (late_priority, urgent_first) in [(-1, true), (0, false)] {
        let mut s = scheduler(4, 8, 64);
        let mut model = FakeModel::default();
        let mut rxs = Vec::new();
        for i in 0..2 {
            let (req, rx) = request(prompt(i, 24), 2);
            s.add(req);
            rxs.push((i, rx));
        }
        s.step(&mut model).unwrap();
        let (mut req, rx) = request(prompt(2, 24), 2);
        req.priority = late_priority;
        s.add(req);
        rxs.push((2, rx));
        run_to_end(&mut s, &mut model);
        for (i, mut rx) in rxs {
            assert_eq!(drain(&mut rx).0, expected(&prompt(i, 24), 2), "request {i}");
        }
        let (first, second, late) =
            (prefilled(&model, 1, 24), prefilled(&model, 2, 24), prefilled(&model, 3, 24));
        if urgent_first {
            assert_eq!(late, 3, "steps 1, 2 and 3 after its arrival: {:?}", model.plans);
            assert!(late < first && first < second, "{:?}", model.plans);
        } else {
            assert!(first < second && second < late, "{:?}", model.plans);
        }
    }
}
