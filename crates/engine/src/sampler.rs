//! Next-token selection with the semantics of `transformers`' `generate` as the reference calls
//! it: greedy is a plain argmax (first index on ties, like `torch.argmax`); sampling
//! applies, in this order, the repetition penalty over the *generated* tokens only (generation
//! starts from `inputs_embeds`, so the prompt is not in `input_ids`), temperature, top-k and
//! top-p, then draws from the
//! softmax with a seeded generator, so a seed reproduces its output. Only the head of the
//! distribution that the draw reaches is ever ordered (partial selection, not a sort of the
//! vocabulary). The parameters, their
//! defaults and their validation are [`dsvl_core::sampling`]'s, shared with every API.

pub use dsvl_core::sampling::SamplingParams;

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
/// `0..n` gives), sorted lazily: only the prefix that sampling looks at is ever ordered, by
/// partial selection, so a 102,400-token vocabulary is not sorted to draw from its head.
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

/// Picks the next token from one row of logits.
pub fn sample(logits: &[f32], params: &SamplingParams, generated: &[u32], rng: &mut Rng) -> u32 {
    if params.is_greedy() {
        return argmax(logits);
    }
    let mut scores = logits.to_vec();
    if params.repetition_penalty != 1.0 {
        let mut seen = std::collections::HashSet::new();
        for &t in generated {
            // HF gathers then scatters: a repeated token is penalised once.
            if seen.insert(t) {
                if let Some(s) = scores.get_mut(t as usize) {
                    *s = if *s < 0.0 {
                        *s * params.repetition_penalty
                    } else {
                        *s / params.repetition_penalty
                    };
                }
            }
        }
    }
    for s in &mut scores {
        *s /= params.temperature;
    }
    let n = scores.len();
    let mut ranked = Ranked::new(&scores);
    let mut keep = n;
    let top_k = params.top_k as usize;
    if top_k > 0 && top_k < keep {
        // Ties with the k-th value are kept, as `scores < topk_values[-1]` removes only lower ones.
        let kth = scores[ranked.at(top_k - 1)];
        keep = scores.iter().filter(|&&s| s >= kth).count();
    }
    let max = scores[ranked.at(0)];
    let prob = |i: usize| f64::from(scores[i] - max).exp();
    // The normaliser over the kept tokens: in rank order when they are a prefix, as before;
    // over the whole row (index order) when nothing is cut.
    let total: f64 =
        if keep < n { (0..keep).map(|j| prob(ranked.at(j))).sum() } else { (0..n).map(prob).sum() };
    if params.top_p < 1.0 {
        // HF sorts ascending and drops tokens whose cumulative probability is <= 1 - top_p,
        // always keeping at least one: equivalently keep the descending prefix until the
        // remaining tail would be <= 1 - top_p.
        let mut tail = 1.0;
        let mut m = 0;
        while m < keep {
            if m > 0 && tail <= 1.0 - f64::from(params.top_p) {
                break;
            }
            tail -= prob(ranked.at(m)) / total;
            m += 1;
        }
        keep = m.max(1);
    }
    let total: f64 = if keep < n { (0..keep).map(|j| prob(ranked.at(j))).sum() } else { total };
    let mut u = rng.uniform() * total;
    for j in 0..keep {
        let i = ranked.at(j);
        let p = prob(i);
        if u < p {
            return i as u32;
        }
        u -= p;
    }
    ranked.at(keep - 1) as u32
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
        };
        let mut rng = Rng::new(0);
        assert_eq!(sample(&logits, &p, &[0, 0], &mut rng), 2);
        assert_eq!(sample(&logits, &p, &[], &mut rng), 0);
    }

    /// The sampler as it was before partial selection (a full sort of the row), kept as the
    /// oracle: the same seeds must give the same tokens.
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
            let mut tail = 1.0;
            let mut n = 0;
            for p in &probs {
                if n > 0 && tail <= 1.0 - f64::from(params.top_p) {
                    break;
                }
                tail -= p / total;
                n += 1;
            }
            keep = n.max(1);
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
    fn partial_selection_draws_what_the_full_sort_drew() {
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
    }

    #[test]
    fn validation_names_the_field() {
        let p = SamplingParams { top_p: 0.0, ..SamplingParams::greedy() };
        assert_eq!(p.validate().unwrap_err().field, "top_p");
    }
}
