//! Next-token selection with the semantics of `transformers`' `generate` as the reference calls
//! it, plus OpenAI's processors, in vLLM's order: the logit processors first (`logit_bias`,
//! then the repetition penalty and OpenAI's presence and frequency penalties, all over the
//! *generated* tokens only: generation starts from `inputs_embeds`, so the prompt is not in
//! `input_ids`); greedy is then an argmax (first index on ties, like `torch.argmax`; a plain
//! argmax of the model's logits when no processor is set). Sampling goes on with temperature,
//! `min_p`, top-k and top-p, then draws from the softmax with a seeded generator, so a seed
//! reproduces its output. The vocabulary is never sorted: top-k takes its threshold by
//! selection, and the top-p cut and the draw walk the kept tokens in rank order through
//! buckets of score ([`crate::draw`]), ordering only the bucket where the walk stops. The
//! parameters, their defaults and their validation are [`dsvl_core::sampling`]'s, shared with
//! every API.

pub use dsvl_core::sampling::SamplingParams;

use crate::draw::{self, Cand};

/// SplitMix64: small, fast, and stable across versions (reproducible seeds matter more here
/// than statistical strength).
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// First index of the maximum (like `torch.argmax`).
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = 0;
    for (i, &v) in logits.iter().enumerate() {
        if v > logits[best] {
            best = i;
        }
    }
    best as u32
}

/// Indices of a score row in descending order (ties by ascending index, as a stable sort of
/// `0..n` gives), sorted lazily: only the prefix looked at is ever ordered, by partial
/// selection, so a 102,400-token vocabulary is not sorted for its few most likely tokens
/// ([`top_logprobs`]).
struct Ranked<'a> {
    scores: &'a [f32],
    order: Vec<u32>,
    sorted: usize,
}

impl<'a> Ranked<'a> {
    fn new(scores: &'a [f32]) -> Self {
        Self { scores, order: (0..scores.len() as u32).collect(), sorted: 0 }
    }

    fn before(scores: &[f32], a: u32, b: u32) -> std::cmp::Ordering {
        scores[b as usize].total_cmp(&scores[a as usize]).then(a.cmp(&b))
    }

    /// Makes the first `m` entries the `m` best, in order.
    fn ensure(&mut self, m: usize) {
        let n = self.order.len();
        if m <= self.sorted || self.sorted == n {
            return;
        }
        // Grow geometrically so a long walk costs O(n log n) at worst, like one sort.
        let upto = m.max(2 * self.sorted).max(64).min(n);
        let scores = self.scores;
        let rest = &mut self.order[self.sorted..];
        let take = upto - self.sorted;
        if take < rest.len() {
            rest.select_nth_unstable_by(take - 1, |&a, &b| Self::before(scores, a, b));
        }
        rest[..take].sort_unstable_by(|&a, &b| Self::before(scores, a, b));
        self.sorted = upto;
    }

    /// The `i`-th best index.
    fn at(&mut self, i: usize) -> usize {
        self.ensure(i + 1);
        self.order[i] as usize
    }
}

/// Applies the logit processors in place: `logit_bias`, then the repetition penalty (HF's
/// sign rule: a positive logit is divided, a negative one multiplied; once per distinct
/// token), then OpenAI's `logit -= count * frequency_penalty + (count > 0) * presence_penalty`.
pub fn process(scores: &mut [f32], params: &SamplingParams, generated: &[u32]) {
    for &(id, bias) in &params.logit_bias {
        if let Some(s) = scores.get_mut(id as usize) {
            *s += bias;
        }
    }
    let occurrence = params.presence_penalty != 0.0 || params.frequency_penalty != 0.0;
    if params.repetition_penalty == 1.0 && !occurrence {
        return;
    }
    let mut counts: std::collections::HashMap<u32, u32> = std::collections::HashMap::new();
    for &t in generated {
        *counts.entry(t).or_default() += 1;
    }
    for (&t, &count) in &counts {
        let Some(s) = scores.get_mut(t as usize) else { continue };
        if params.repetition_penalty != 1.0 {
            *s = if *s < 0.0 {
                *s * params.repetition_penalty
            } else {
                *s / params.repetition_penalty
            };
        }
        if occurrence {
            *s -= count as f32 * params.frequency_penalty + params.presence_penalty;
        }
    }
}

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], params: &SamplingParams, generated: &[u32], rng: &mut Rng) -> u32 {
    if params.is_greedy() && !params.processes_logits() {
        return argmax(logits);
    }
    let mut scores = logits.to_vec();
    process(&mut scores, params, generated);
    if params.is_greedy() {
        return argmax(&scores);
    }
    for s in &mut scores {
        *s /= params.temperature;
    }
    if params.min_p > 0.0 {
        // p_i >= min_p * p_max  <=>  s_i >= s_max + ln(min_p); the most likely token stays.
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let floor = max + params.min_p.ln();
        for s in &mut scores {
            if *s < floor {
                *s = f32::NEG_INFINITY;
            }
        }
    }
    let n = scores.len();
    let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        return 0; // nothing has any probability: the first token, as a sort would rank it
    }
    let mut keep = n;
    let mut kth = f32::NEG_INFINITY;
    let top_k = params.top_k as usize;
    if top_k > 0 && top_k < n {
        // Ties with the k-th value are kept, as `scores < topk_values[-1]` removes only lower ones.
        let mut copy = scores.clone();
        let (_, &mut k, _) = copy.select_nth_unstable_by(top_k - 1, |a, b| b.total_cmp(a));
        kth = k;
        keep = scores.iter().filter(|&&s| s >= kth).count();
    }
    // The kept tokens with any probability, in id order (those without never win a draw).
    let mut kept: Vec<Cand> = scores
        .iter()
        .enumerate()
        .filter(|&(_, &s)| s >= kth)
        // A score that overflowed to +inf (a tiny temperature) is the top: probability 1, as
        // `exp(s - max)` would be NaN there.
        .map(|(i, &s)| Cand {
            s,
            i: i as u32,
            p: if s == max { 1.0 } else { f64::from(s - max).exp() },
        })
        .filter(|c| c.p > 0.0)
        .collect();
    // The normaliser over the kept tokens: in rank order when they are a prefix of up to
    // `SORTED_UP_TO` tokens, as before; in id order for more, or when nothing is cut.
    let ranked_mass = |kept: &mut [Cand]| {
        if kept.len() <= draw::SORTED_UP_TO {
            draw::sort(kept);
        }
        draw::mass(kept)
    };
    let mut total = if keep < n { ranked_mass(&mut kept) } else { draw::mass(&kept) };
    if params.top_p < 1.0 {
        // HF sorts ascending and drops tokens whose cumulative probability is <= 1 - top_p,
        // always keeping at least one: keep the descending prefix up to the first token at
        // which the kept mass reaches top_p.
        // (The same cut as a tail of `1 - top_p`, but the running sum of unnormalised
        // probabilities is exact where they are, as for tied scores: a flat row of 5,000 at
        // `top_p` 0.5 keeps 2,500, where subtracting `1 / 5000` at a time kept 2,501.)
        let target = f64::from(params.top_p) * total;
        let last = draw::first_past(&mut kept, target, true).unwrap_or(kept.len() - 1);
        kept.truncate(last + 1);
        if kept.len() < n {
            total = ranked_mass(&mut kept);
        }
    }
    let u = rng.uniform() * total;
    match draw::first_past(&mut kept, u, false) {
        Some(at) => kept[at].i,
        // Rounding left `u` past the end: the last token that had any probability.
        None => draw::last_in_rank(&kept).map_or(0, |at| kept[at].i),
    }
}

/// `ln(sum(exp(row)))`, summed in f64 from the row's maximum: the normaliser every reported
/// log-probability is taken against (a chosen token's, its alternatives', a prompt token's), so
/// figures of one row computed apart agree to the bit.
pub fn log_sum_exp(row: &[f32]) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln() as f32 + max
}

/// The `k` most likely tokens of a raw logits row with their log-probabilities, most likely
/// first (ties by ascending id).
pub fn top_logprobs(logits: &[f32], k: usize) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    top_logprobs_under(logits, k, log_sum_exp(logits))
}

/// [`top_logprobs`] with the row's [`log_sum_exp`] already known.
pub(crate) fn top_logprobs_under(logits: &[f32], k: usize, lse: f32) -> Vec<(u32, f32)> {
    if k == 0 || logits.is_empty() {
        return Vec::new();
    }
    let mut ranked = Ranked::new(logits);
    (0..k.min(logits.len()))
        .map(|j| {
            let i = ranked.at(j);
            (i as u32, logits[i] - lse)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_is_first_argmax() {
        assert_eq!(argmax(&[0.1, 3.0, 3.0, -1.0]), 1);
        let mut rng = Rng::new(0);
        assert_eq!(sample(&[0.1, 3.0, 3.0], &SamplingParams::greedy(), &[], &mut rng), 1);
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_varies_with_seed() {
        let logits: Vec<f32> = (0..100).map(|i| (i as f32 * 0.37).sin()).collect();
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 7,
            ..SamplingParams::DEFAULTS
        };
        let run = |seed| {
            let mut rng = Rng::new(seed);
            (0..20).map(|_| sample(&logits, &p, &[], &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
    }

    #[test]
    fn top_k_one_is_greedy() {
        let logits = [0.5, 2.0, 1.0, 1.9];
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 1,
            top_p: 1.0,
            repetition_penalty: 1.0,
            seed: 1,
            ..SamplingParams::DEFAULTS
        };
        let mut rng = Rng::new(3);
        assert!((0..50).all(|_| sample(&logits, &p, &[], &mut rng) == 1));
    }

    #[test]
    fn top_p_keeps_the_nucleus() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: top_p 0.7 keeps the first two only.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.7,
            repetition_penalty: 1.0,
            seed: 1,
            ..SamplingParams::DEFAULTS
        };
        let mut rng = Rng::new(11);
        let picks: Vec<u32> = (0..400).map(|_| sample(&logits, &p, &[], &mut rng)).collect();
        assert!(picks.iter().all(|&t| t < 2), "only tokens 0 and 1 may be drawn");
        assert!(picks.contains(&1) && picks.contains(&0));
    }

    #[test]
    fn repetition_penalty_follows_hf_sign_rule() {
        // Token 0 (positive logit) is divided, token 1 (negative) multiplied; with top_k 1 the
        // penalised best token loses to the runner-up.
        let logits = [2.0f32, -1.0, 1.5];
        let p = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            repetition_penalty: 2.0,
            seed: 0,
            ..SamplingParams::DEFAULTS
        };
        let mut rng = Rng::new(0);
        assert_eq!(sample(&logits, &p, &[0, 0], &mut rng), 2);
        assert_eq!(sample(&logits, &p, &[], &mut rng), 0);
    }

    /// The sampler as it was before partial selection and the bucketed walk (a full sort of
    /// the row), kept as the oracle: the same seeds must give the same tokens.
    fn full_sort_sample(
        logits: &[f32],
        params: &SamplingParams,
        generated: &[u32],
        rng: &mut Rng,
    ) -> u32 {
        let mut scores = logits.to_vec();
        let mut seen = std::collections::HashSet::new();
        for &t in generated {
            if params.repetition_penalty != 1.0 && seen.insert(t) {
                let s = &mut scores[t as usize];
                *s = if *s < 0.0 {
                    *s * params.repetition_penalty
                } else {
                    *s / params.repetition_penalty
                };
            }
        }
        scores.iter_mut().for_each(|s| *s /= params.temperature);
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&a, &b| scores[b].total_cmp(&scores[a]));
        let mut keep = order.len();
        let top_k = params.top_k as usize;
        if top_k > 0 && top_k < keep {
            let kth = scores[order[top_k - 1]];
            keep = order.iter().take_while(|&&i| scores[i] >= kth).count();
        }
        let max = scores[order[0]];
        let probs: Vec<f64> =
            order[..keep].iter().map(|&i| f64::from(scores[i] - max).exp()).collect();
        let total: f64 = probs.iter().sum();
        if params.top_p < 1.0 {
            let mut left = f64::from(params.top_p) * total;
            let mut n = 0;
            for p in &probs {
                n += 1;
                if left <= *p {
                    break;
                }
                left -= p;
            }
            keep = n;
        }
        let total: f64 = probs[..keep].iter().sum();
        let mut u = rng.uniform() * total;
        for (j, p) in probs[..keep].iter().enumerate() {
            if u < *p {
                return order[j] as u32;
            }
            u -= p;
        }
        order[keep - 1] as u32
    }

    #[test]
    fn the_sampler_draws_what_the_full_sort_drew() {
        let vocab = 5000;
        let mut gen = Rng::new(99);
        let mut draws = 0;
        for case in 0..60u64 {
            // Peaked and flat rows, with ties (quantised values).
            let spread = [0.5f64, 3.0, 12.0][case as usize % 3];
            let row: Vec<f32> =
                (0..vocab).map(|_| ((gen.uniform() * spread * 8.0).round() / 8.0) as f32).collect();
            let params = SamplingParams {
                temperature: [0.7, 1.0, 1.3][case as usize % 3],
                top_k: [0, 1, 40, 4999, 6000][case as usize % 5],
                top_p: [1.0, 0.9, 0.3, 0.999][case as usize % 4],
                repetition_penalty: if case % 2 == 0 { 1.0 } else { 1.3 },
                seed: case,
                ..SamplingParams::DEFAULTS
            };
            let generated: Vec<u32> = (0..20).map(|i| (i * 37 % vocab) as u32).collect();
            let (mut a, mut b) = (Rng::new(case), Rng::new(case));
            for _ in 0..25 {
                let want = full_sort_sample(&row, &params, &generated, &mut a);
                assert_eq!(sample(&row, &params, &generated, &mut b), want, "case {case}");
                draws += 1;
            }
        }
        assert_eq!(draws, 1500);
        // Flat rows, below and above the sorted-set size: the cut falls on a tie.
        for (n, top_p) in [(3000, 0.5f32), (5000, 0.5), (10_000, 0.25), (10_000, 0.75)] {
            let params = SamplingParams { top_p, ..SamplingParams::DEFAULTS };
            let (mut a, mut b) = (Rng::new(n as u64), Rng::new(n as u64));
            for _ in 0..50 {
                let want = full_sort_sample(&vec![0.0; n], &params, &[], &mut a);
                assert_eq!(sample(&vec![0.0; n], &params, &[], &mut b), want, "{n} at {top_p}");
                let kept = (f64::from(top_p) * n as f64) as u32;
                assert!(want < kept, "{want} past the {kept} kept of {n} at {top_p}");
            }
        }
    }

    #[test]
    fn a_score_that_overflows_to_infinity_wins() {
        // Temperatures this small decode greedily; a row with a logit of 3.4e33 would still
        // overflow at 1e-5, so the sampler must not turn +inf into NaN.
        let params = SamplingParams { temperature: 1e-38, ..SamplingParams::DEFAULTS };
        assert!(params.is_greedy());
        let mut rng = Rng::new(3);
        for logits in [[1.0f32, 5.0, -2.0], [5.0, 1.0, 3.0], [-5.0, -1.0, -3.0]] {
            let top = logits.iter().enumerate().max_by(|a, b| a.1.total_cmp(b.1)).unwrap().0 as u32;
            assert!((0..50).all(|_| sample(&logits, &params, &[], &mut rng) == top), "{logits:?}");
        }
        // Above the greedy threshold, an overflow to +inf.
        let params = SamplingParams { temperature: 2e-5, ..SamplingParams::DEFAULTS };
        for logits in [[1.0f32, 1e34, -2.0], [1e34, 1.0, 3.0]] {
            let top = if logits[0] > 1.0 { 0 } else { 1 };
            assert!((0..50).all(|_| sample(&logits, &params, &[], &mut rng) == top), "{logits:?}");
        }
    }

    #[test]
    fn occurrence_penalties_follow_openai_definition() {
        // logit -= count * frequency + (count > 0) * presence; greedy sees them too.
        let logits = [5.0f32, 4.0, 3.5];
        let generated = [0, 0, 0, 1];
        let p = SamplingParams {
            presence_penalty: 0.4,
            frequency_penalty: 0.6,
            ..SamplingParams::greedy()
        };
        let mut scores = logits.to_vec();
        process(&mut scores, &p, &generated);
        let want = [5.0 - 3.0 * 0.6 - 0.4, 4.0 - 0.6 - 0.4, 3.5];
        for (a, b) in scores.iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{scores:?} vs {want:?}");
        }
        let mut rng = Rng::new(0);
        assert_eq!(sample(&logits, &p, &generated, &mut rng), 2, "3.5 beats 2.8 and 3.0");
        assert_eq!(sample(&logits, &p, &[], &mut rng), 0, "nothing generated: no penalty");
        // Negative values encourage repetition.
        let p = SamplingParams { presence_penalty: -2.0, ..SamplingParams::greedy() };
        assert_eq!(sample(&[1.0, 2.0], &p, &[0], &mut rng), 0);
    }

    #[test]
    fn logit_bias_applies_to_greedy_and_sampling() {
        let logits = [0.0f32, 1.0, 2.0, 3.0];
        let greedy =
            SamplingParams { logit_bias: vec![(0, 10.0), (3, -100.0)], ..SamplingParams::greedy() };
        let mut rng = Rng::new(5);
        assert_eq!(sample(&logits, &greedy, &[], &mut rng), 0);
        // -100 bans a token in practice; +100 forces it.
        let banned =
            SamplingParams { logit_bias: vec![(3, -100.0)], seed: 5, ..SamplingParams::DEFAULTS };
        assert!((0..300).all(|_| sample(&logits, &banned, &[], &mut rng) != 3));
        let forced = SamplingParams { logit_bias: vec![(1, 100.0)], ..SamplingParams::DEFAULTS };
        assert!((0..300).all(|_| sample(&logits, &forced, &[], &mut rng) == 1));
    }

    #[test]
    fn min_p_drops_the_unlikely_tail() {
        // Probabilities ~ [0.64, 0.24, 0.09, 0.03]: min_p 0.3 keeps tokens with p >= 0.19.
        let logits = [3.0f32, 2.0, 1.0, 0.0];
        let p = SamplingParams { min_p: 0.3, ..SamplingParams::DEFAULTS };
        let mut rng = Rng::new(1);
        let picks: Vec<u32> = (0..400).map(|_| sample(&logits, &p, &[], &mut rng)).collect();
        assert!(picks.iter().all(|&t| t < 2), "only tokens 0 and 1 may be drawn");
        assert!(picks.contains(&1) && picks.contains(&0));
        // Without it the tail is drawn.
        let free: Vec<u32> =
            (0..400).map(|_| sample(&logits, &SamplingParams::DEFAULTS, &[], &mut rng)).collect();
        assert!(free.iter().any(|&t| t >= 2));
    }

    #[test]
    fn top_logprobs_are_the_head_of_the_raw_distribution() {
        let logits = [1.0f32, 3.0, 2.0, 3.0];
        let top = top_logprobs(&logits, 3);
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, [1, 3, 2], "ties by ascending id");
        let total: f32 = logits.iter().map(|v| v.exp()).sum();
        for (id, lp) in top {
            assert!((lp - (logits[id as usize].exp() / total).ln()).abs() < 1e-6);
        }
        assert_eq!(top_logprobs(&logits, 10).len(), 4);
        assert!(top_logprobs(&logits, 0).is_empty());
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams { top_p: 0.0, ..SamplingParams::greedy() };
        assert_eq!(p.validate().unwrap_err().field, "top_p");
    }
}
