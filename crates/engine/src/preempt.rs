//! Preemption by recomputation: which running sequence gives up its KV blocks, and when.
//!
//! Two causes. A running sequence that needs a block for its next token when none is left
//! takes one from the least important running sequence (the highest `priority` value, then the
//! latest admitted). And, as vLLM's priority scheduling does, the first waiting request, which
//! has the lowest priority value, takes blocks or a seat from running sequences of a strictly
//! higher value when it cannot be admitted otherwise: least important first, only as many as it
//! needs, and only when taking all of them would be enough (a preemption that cannot admit it
//! only throws their work away). Requests of the same priority never preempt each other for
//! admission: that would only thrash.
//!
//! A preempted sequence releases its blocks and goes back to the queue ahead of the waiting
//! requests of its priority (they arrived after it); it is recomputed from its prompt plus
//! what it generated, without re-streaming anything.

use std::cmp::Reverse;

use dsvl_models::llm::SeqId;

use super::Scheduler;
use crate::request_metrics;

impl Scheduler {
    /// The running sequence to preempt when blocks run out: the highest priority value, then
    /// the latest admitted.
    pub(super) fn least_important(&self) -> Option<usize> {
        (0..self.running.len()).max_by_key(|&j| (self.running[j].req.priority, j))
    }

    /// Preempts `self.running[v]`: its blocks are released and it goes back to the queue.
    pub(super) fn preempt(&mut self, v: usize) {
        let mut victim = self.running.remove(v);
        self.drop_seq(&victim);
        victim.cached = 0;
        victim.registered = 0;
        victim.prompt_logits.clear();
        self.preemptions += 1;
        request_metrics::preempted();
        tracing::debug!(seq = victim.id, priority = victim.req.priority, "preempted (recompute)");
        // Ahead of the waiting requests of its priority (they arrived after it).
        let at = self.waiting.partition_point(|w| w.req.priority < victim.req.priority);
        self.waiting.insert(at, victim);
    }

    /// Makes room for the first waiting request by preempting running sequences of a
    /// strictly higher priority value, when it cannot be admitted as things stand and
    /// preempting them can admit it; whether any was preempted.
    pub(super) fn preempt_for_priority(&mut self) -> bool {
        let Some(head) = self.waiting.front() else { return false };
        let (priority, tokens) = (head.req.priority, head.tokens());
        // The cached prefix admission would start it on; a running prefill of its next
        // uncached block: admission waits for that, not for room.
        let (reusable, waits) = self.admission_prefix(0);
        if waits {
            return false;
        }
        let hashes = self.waiting[0].hashes[..reusable].to_vec();
        let seated = self.running.len() < self.cfg.max_num_seqs;
        let short = self.blocks.shortfall(&hashes, tokens + 1);
        if seated && short == 0 {
            return false;
        }
        let mut lower: Vec<usize> =
            (0..self.running.len()).filter(|&j| self.running[j].req.priority > priority).collect();
        lower.sort_by_key(|&j| Reverse((self.running[j].req.priority, j)));
        let all: Vec<SeqId> = lower.iter().map(|&j| self.running[j].id).collect();
        if all.is_empty() || self.blocks.released_by(&all, &hashes) < short {
            return false;
        }
        // The fewest, least important first, that give it a seat and its blocks.
        let mut victims: Vec<SeqId> = Vec::new();
        for id in all {
            victims.push(id);
            if self.blocks.released_by(&victims, &hashes) >= short {
                break;
            }
        }
        for id in victims {
            let v = self.running.iter().position(|s| s.id == id).expect("a running victim");
            self.preempt(v);
        }
        true
    }
}
