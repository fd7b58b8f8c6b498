//! The pace guard of `max_step_stretch` (CPU serving): while streams decode, how many prompt
//! tokens a step may carry so that it costs at most `stretch` times a decode-only step, learnt
//! from the measured steps; and a step's token budget as the scheduler hands it to prompts
//! (long prompts chunked to the guard's share, short ones whole and one a step beyond it).
//!
//! Sarathi-Serve's stall-free batching with a profiled token budget is the anchor; here the
//! budget is steered by the measured pace instead, as a CPU step's cost grows with its tokens
//! and differs from machine to machine.

/// The pace guard of `max_step_stretch`: the decode-only step's cost (moving average) and the
/// current prefill cap, steered by each mixed step's measured cost: shrunk in proportion when a
/// step overshoots, grown by a quarter when it has room (fixed per-step costs and the context
/// growing under a long prompt are both absorbed by the measurement).
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Pace {
    /// Seconds of a decode-only step.
    decode: Option<f64>,
    /// Prefill tokens a mixed step may carry.
    cap: Option<usize>,
}

impl Pace {
    /// First chunk before any mixed step was measured.
    pub(crate) const PROBE_TOKENS: usize = 16;
    /// Prompts with more tokens than this to prefill (at admission) are chunked to the
    /// guard's share; shorter ones run whole, beyond the share at most one a step.
    pub(crate) const LONG_PROMPT: usize = 256;

    pub(crate) fn prefill_cap(&self) -> usize {
        self.cap.unwrap_or(Self::PROBE_TOKENS)
    }

    /// Learns from a step: its time, its prefill tokens and decodes.
    pub(crate) fn record(&mut self, secs: f64, prefill: usize, decodes: usize, stretch: f64) {
        if prefill == 0 {
            self.decode = Some(self.decode.map_or(secs, |d| d + 0.2 * (secs - d)));
            return;
        }
        let (Some(d), true) = (self.decode, decodes > 0) else { return };
        let ratio = secs / d.max(1e-9);
        let cap = self.prefill_cap();
        let next = if ratio > stretch {
            prefill as f64 * (stretch - 1.0) / (ratio - 1.0).max(1e-9) * 0.9
        } else if prefill >= cap {
            // The cap bound this step and there was room: grow it.
            cap as f64 * 1.25 + 1.0
        } else {
            cap as f64
        };
        self.cap = Some(next.clamp(1.0, 1e9) as usize);
    }
}

/// What is left of a step's token budget, and of the pace guard's share of it for prefills.
pub(crate) struct StepBudget {
    /// Tokens left of the step's budget.
    tokens: usize,
    /// Prefill tokens the pace guard still allows this step (`usize::MAX` without the guard).
    paced: usize,
    /// Whether a short prompt has run this step.
    short_taken: bool,
}

impl StepBudget {
    /// A step of `tokens` new tokens, of which the pace guard allows `share` to prefills
    /// (`None`: no guard this step).
    pub(crate) fn new(tokens: usize, share: Option<usize>) -> Self {
        Self { tokens, paced: share.unwrap_or(usize::MAX), short_taken: false }
    }

    /// Tokens left of the step's budget.
    pub(crate) fn tokens(&self) -> usize {
        self.tokens
    }

    /// Tokens a prompt with `left` tokens to prefill gets this step. Under the pace guard a
    /// long prompt (`long`, like vLLM's long-prefill threshold) is chunked to the guard's
    /// share; a short one runs whole (chunking it would only add steps), beyond the share at
    /// most once a step: one short prompt costs one slightly longer step, but a burst of them
    /// in one step would stall the streams like a long prompt (8 prompts of 64 tokens made a
    /// 16-stream run's inter-token p99 15x its median on a CPU), so a burst enters one a step.
    pub(crate) fn take(&mut self, left: usize, long: bool) -> usize {
        let mut n = left.min(self.tokens);
        if long {
            n = n.min(self.paced);
        } else if n > self.paced && self.short_taken {
            n = 0;
        }
        self.short_taken |= !long && n > 0;
        self.paced = self.paced.saturating_sub(n);
        self.tokens -= n;
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STRETCH: f64 = 1.3;

    /// A guard that has seen decode-only steps of 100 ms.
    fn measured() -> Pace {
        let mut p = Pace::default();
        p.record(0.1, 0, 4, STRETCH);
        p
    }

    #[test]
    fn the_first_mixed_step_probes_then_the_cap_follows_the_measured_cost() {
        let mut p = measured();
        assert_eq!(p.prefill_cap(), Pace::PROBE_TOKENS);
        // 16 tokens made the step 2x: 0.3 of a decode step's room is 4.8 tokens at that cost,
        // less a tenth of margin.
        p.record(0.2, 16, 4, STRETCH);
        assert_eq!(p.prefill_cap(), 4);
        // Room at the cap: it grows by a quarter (plus one, so a cap of 1 can grow).
        p.record(0.12, 4, 4, STRETCH);
        assert_eq!(p.prefill_cap(), 6);
        // Room but the cap did not bind (the prompt had fewer tokens left): unchanged.
        p.record(0.11, 2, 4, STRETCH);
        assert_eq!(p.prefill_cap(), 6);
    }

    #[test]
    fn the_cap_never_falls_below_one_token() {
        let mut p = measured();
        p.record(1.0, 16, 4, STRETCH);
        assert_eq!(p.prefill_cap(), 1);
        p.record(1.0, 1, 4, STRETCH);
        assert_eq!(p.prefill_cap(), 1);
    }

    #[test]
    fn steps_without_decodes_or_a_baseline_teach_nothing() {
        let mut p = measured();
        p.record(5.0, 16, 0, STRETCH);
        assert_eq!(p.prefill_cap(), Pace::PROBE_TOKENS);
        // Before any decode-only step there is no baseline to compare with.
        let mut fresh = Pace::default();
        fresh.record(5.0, 16, 4, STRETCH);
        assert_eq!(fresh.prefill_cap(), Pace::PROBE_TOKENS);
    }

    fn budget(tokens: usize, share: usize) -> StepBudget {
        StepBudget::new(tokens, Some(share))
    }

    #[test]
    fn long_prompts_are_chunked_to_the_share_and_short_ones_run_whole_one_a_step() {
        let mut b = budget(512, 10);
        assert_eq!(b.take(1000, true), 10, "a long prompt gets the share");
        assert_eq!(b.take(1000, true), 0, "and a second one nothing more");
        assert_eq!(b.take(64, false), 64, "the first short prompt runs whole beyond the share");
        assert_eq!(b.take(64, false), 0, "a second one waits for the next step");
        assert_eq!(b.tokens(), 512 - 74);

        let mut b = budget(512, 100);
        assert_eq!(b.take(30, false), 30);
        assert_eq!(b.take(30, false), 30, "short prompts within the share all run");
        assert_eq!(b.take(64, false), 0, "beyond it, only the first of the step did");
    }

    #[test]
    fn without_the_guard_the_token_budget_alone_decides() {
        let mut b = StepBudget::new(100, None);
        assert_eq!(b.take(64, false), 64);
        assert_eq!(b.take(64, false), 36, "chunked by the token budget");
        assert_eq!(b.take(1000, true), 0);
    }
}
