//! Choosing each sequence's next token from a step's logits where the logits are: greedy
//! rows take one argmax over the whole step on the model's device, and their log-probabilities
//! one log-sum-exp, so only the chosen ids (and the log-probabilities asked for) cross to the
//! host. Rows that sample (temperature, top-k, top-p, penalties) or whose logits the caller
//! keeps are read from the device in one copy and drawn by [`sample`] with their own seeded
//! generators, in parallel across rows.

use candle_core::{DType, Tensor, D};
use rayon::prelude::*;

use crate::constraint::Mask;
use crate::sampler::{log_sum_exp, sample, top_logprobs_under, Rng, SamplingParams};

/// What a sequence's next token is chosen from, and how.
pub struct Ask<'a> {
    /// Token selection.
    pub params: &'a SamplingParams,
    /// Tokens generated so far (repetition penalty).
    pub generated: &'a [u32],
    /// The sequence's generator.
    pub rng: &'a mut Rng,
    /// Report the chosen token's log-probability.
    pub logprob: bool,
    /// Also report this many most likely tokens with their log-probabilities (0: none).
    pub top_logprobs: usize,
    /// Return the whole logits row (parity checks).
    pub keep_row: bool,
    /// The tokens a grammar allows (others are set to minus infinity before choosing).
    pub mask: Option<&'a Mask>,
    /// Tokens that may not be chosen (set to minus infinity before choosing): the stop ids
    /// while a sequence is short of its `min_new_tokens`, bad words' next tokens
    /// ([`crate::token_filter`]).
    pub banned: &'a [u32],
    /// Only these may be chosen (`None`: any).
    pub allowed: Option<&'a [u32]>,
}

/// The chosen token.
#[derive(Debug, Clone, PartialEq)]
pub struct Choice {
    /// Token id.
    pub id: u32,
    /// Its log-probability under the unprocessed distribution, when asked for.
    pub logprob: Option<f32>,
    /// The most likely tokens of the unprocessed distribution and their log-probabilities,
    /// most likely first, when asked for (else empty).
    pub top: Vec<(u32, f32)>,
    /// The logits row, when asked for.
    pub row: Option<Vec<f32>>,
}

/// A step's f32 logits (`[rows, vocab]`, on the model's device) and what was computed over all
/// of them, each at most once.
pub struct StepLogits {
    logits: Tensor,
    argmax: Option<Vec<u32>>,
    /// `-ln sum(exp(x - max))` per row: the log-probability of a row's argmax.
    argmax_logprob: Option<Vec<f32>>,
}

impl StepLogits {
    /// Wraps a step's logits.
    pub fn new(logits: Tensor) -> Self {
        Self { logits, argmax: None, argmax_logprob: None }
    }

    /// The step's logits.
    pub fn tensor(&self) -> &Tensor {
        &self.logits
    }

    /// Whether `ask` is met by the step's device argmax: greedy with no processor, mask, ban,
    /// row or alternatives asked for.
    fn greedy_on_device(ask: &Ask<'_>) -> bool {
        ask.params.is_greedy()
            && !ask.params.processes_logits()
            && ask.top_logprobs == 0
            && !ask.keep_row
            && ask.mask.is_none()
            && ask.banned.is_empty()
            && ask.allowed.is_none()
    }

    /// The device-argmax choice of row `row` (see [`Self::greedy_on_device`]).
    fn greedy_choice(&mut self, row: usize, logprob: bool) -> candle_core::Result<Choice> {
        if self.argmax.is_none() {
            self.argmax = Some(self.logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
        }
        let id = self.argmax.as_ref().expect("computed above")[row];
        let logprob = if logprob {
            if self.argmax_logprob.is_none() {
                let max = self.logits.max_keepdim(D::Minus1)?;
                let sum = self.logits.broadcast_sub(&max)?.exp()?.sum(D::Minus1)?;
                let lp = sum.to_dtype(DType::F32)?.log()?.neg()?;
                self.argmax_logprob = Some(lp.to_vec1::<f32>()?);
            }
            Some(self.argmax_logprob.as_ref().expect("computed above")[row])
        } else {
            None
        };
        Ok(Choice { id, logprob, top: Vec::new(), row: None })
    }

    /// Chooses the token of logits row `row`.
    ///
    /// # Errors
    /// A device error reading the logits.
    pub fn choose(&mut self, row: usize, ask: Ask<'_>) -> candle_core::Result<Choice> {
        Ok(self.choose_rows(vec![(row, ask)])?.pop().expect("one choice per ask"))
    }

    /// Chooses the tokens of several rows, in the order asked: what [`Self::choose`] gives row
    /// by row, but the rows drawn on the host are read from the device in one copy and drawn in
    /// parallel. Each sequence has its own generator, so the order they are drawn in changes
    /// nothing. A sampled row of a 102,400-token vocabulary costs 0.3-1 ms on the host
    /// (benches/README.md, "Sampled rows on the host"), so a step of many sampled rows does not
    /// wait for each in turn.
    ///
    /// # Errors
    /// A device error reading the logits.
    pub fn choose_rows(&mut self, asks: Vec<(usize, Ask<'_>)>) -> candle_core::Result<Vec<Choice>> {
        let host_rows: Vec<u32> = asks
            .iter()
            .filter(|(_, ask)| !Self::greedy_on_device(ask))
            .map(|&(row, _)| row as u32)
            .collect();
        let mut values = if host_rows.is_empty() {
            Vec::new()
        } else {
            let index = Tensor::new(host_rows.as_slice(), self.logits.device())?;
            self.logits.index_select(&index, 0)?.to_vec2::<f32>()?
        }
        .into_iter();
        let mut chosen: Vec<Option<Choice>> = Vec::with_capacity(asks.len());
        let mut drawn = Vec::with_capacity(host_rows.len());
        for (at, (row, ask)) in asks.into_iter().enumerate() {
            if Self::greedy_on_device(&ask) {
                chosen.push(Some(self.greedy_choice(row, ask.logprob)?));
            } else {
                chosen.push(None);
                drawn.push((at, ask, values.next().expect("one row read per host ask")));
            }
        }
        let drawn: Vec<(usize, Choice)> =
            drawn.into_par_iter().map(|(at, ask, values)| (at, host_choice(values, ask))).collect();
        for (at, choice) in drawn {
            chosen[at] = Some(choice);
        }
        Ok(chosen.into_iter().map(|c| c.expect("every ask chosen")).collect())
    }
}

/// A row's choice drawn on the host by [`sample`], with what `ask` wants reported.
fn host_choice(values: Vec<f32>, ask: Ask<'_>) -> Choice {
    let id = if ask.mask.is_none() && ask.banned.is_empty() && ask.allowed.is_none() {
        sample(&values, ask.params, ask.generated, ask.rng)
    } else {
        let mut allowed = match ask.allowed {
            None => values.clone(),
            Some(ids) => {
                let mut only = vec![f32::NEG_INFINITY; values.len()];
                for &id in ids {
                    if let Some(v) = values.get(id as usize) {
                        only[id as usize] = *v;
                    }
                }
                only
            }
        };
        if let Some(mask) = ask.mask {
            mask.apply(&mut allowed);
        }
        if !ask.banned.is_empty() {
            // The banned values are kept aside (not the whole row): bans that would leave no
            // token at all (an allow list of stop ids under `min_tokens`, say) are lifted for
            // this step rather than choosing from nothing.
            let choosable = allowed.iter().filter(|&&v| v > f32::NEG_INFINITY).count();
            let mut removed = Vec::with_capacity(ask.banned.len());
            for &id in ask.banned {
                if let Some(v) = allowed.get_mut(id as usize).filter(|v| **v > f32::NEG_INFINITY) {
                    removed.push((id as usize, *v));
                    *v = f32::NEG_INFINITY;
                }
            }
            if removed.len() == choosable {
                for (id, v) in removed {
                    allowed[id] = v;
                }
            }
        }
        sample(&allowed, ask.params, ask.generated, ask.rng)
    };
    // One normaliser for the token and its alternatives.
    let lse = (ask.logprob || ask.top_logprobs > 0).then(|| log_sum_exp(&values));
    let logprob = lse.filter(|_| ask.logprob).map(|lse| values[id as usize] - lse);
    let top = lse.map_or_else(Vec::new, |lse| top_logprobs_under(&values, ask.top_logprobs, lse));
    Choice { id, logprob, top, row: ask.keep_row.then_some(values) }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::constraint::Mask;

    #[test]
    fn greedy_on_the_device_matches_the_host_rule() -> candle_core::Result<()> {
        let rows = vec![vec![0.1f32, 3.0, 3.0, -1.0], vec![-2.0, -1.0, -3.0, -1.5]];
        let t = Tensor::new(rows.clone(), &Device::Cpu)?;
        let mut step = StepLogits::new(t);
        let greedy = SamplingParams::greedy();
        for (i, r) in rows.iter().enumerate() {
            let mut rng = Rng::new(0);
            let ask = Ask {
                params: &greedy,
                generated: &[],
                rng: &mut rng,
                logprob: true,
                top_logprobs: 0,
                keep_row: false,
                mask: None,
                banned: &[],
                allowed: None,
            };
            let c = step.choose(i, ask)?;
            assert_eq!(c.id, crate::sampler::argmax(r), "first index on ties");
            let want = r[c.id as usize] - log_sum_exp(r);
            assert!((c.logprob.unwrap() - want).abs() < 1e-6, "{:?} vs {want}", c.logprob);
            assert!(c.row.is_none());
        }
        Ok(())
    }

    /// Banned tokens are never chosen, greedy (the best allowed one instead) or sampled, and
    /// the reported log-probabilities stay those of the unprocessed distribution.
    #[test]
    fn banned_tokens_are_never_chosen() -> candle_core::Result<()> {
        let row = vec![5.0f32, 4.9, 1.0, 4.8, -2.0];
        let t = Tensor::new(vec![row.clone()], &Device::Cpu)?;
        let mut step = StepLogits::new(t);
        let banned = [0u32, 1];
        let warm = SamplingParams { temperature: 5.0, ..SamplingParams::DEFAULTS };
        for (params, draws) in [(SamplingParams::greedy(), 1), (warm, 500)] {
            let mut rng = Rng::new(3);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..draws {
                let ask = Ask {
                    params: &params,
                    generated: &[],
                    rng: &mut rng,
                    logprob: true,
                    top_logprobs: 2,
                    keep_row: false,
                    mask: None,
                    banned: &banned,
                    allowed: None,
                };
                let c = step.choose(0, ask)?;
                assert!(!banned.contains(&c.id), "{c:?}");
                let want = row[c.id as usize] - log_sum_exp(&row);
                assert!((c.logprob.unwrap() - want).abs() < 1e-6);
                assert_eq!(c.top.iter().map(|a| a.0).collect::<Vec<_>>(), [0, 1]);
                seen.insert(c.id);
            }
            if params.is_greedy() {
                assert_eq!(seen.into_iter().collect::<Vec<_>>(), [3]);
            } else {
                assert_eq!(seen.into_iter().collect::<Vec<_>>(), [2, 3, 4], "every allowed token");
            }
        }
        Ok(())
    }

    /// With an allow list only its tokens are chosen, greedy (the best of them) or sampled.
    #[test]
    fn only_allowed_tokens_are_chosen() -> candle_core::Result<()> {
        let row = vec![5.0f32, 4.9, 1.0, 4.8, -2.0];
        let mut step = StepLogits::new(Tensor::new(vec![row], &Device::Cpu)?);
        let allowed = [2u32, 4];
        let warm = SamplingParams { temperature: 5.0, ..SamplingParams::DEFAULTS };
        for (params, want) in [(SamplingParams::greedy(), vec![2]), (warm, vec![2, 4])] {
            let mut rng = Rng::new(5);
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..300 {
                seen.insert(step.choose(0, limited(&params, &mut rng, &[], &allowed))?.id);
            }
            assert_eq!(seen.into_iter().collect::<Vec<_>>(), want);
        }
        // Banning every allowed token lifts the ban for the step (nothing else is choosable).
        let (greedy, mut rng) = (SamplingParams::greedy(), Rng::new(5));
        assert_eq!(step.choose(0, limited(&greedy, &mut rng, &allowed, &allowed))?.id, 2);
        Ok(())
    }

    /// An ask with an allow list and bans, nothing else reported.
    fn limited<'a>(
        params: &'a SamplingParams,
        rng: &'a mut Rng,
        banned: &'a [u32],
        allowed: &'a [u32],
    ) -> Ask<'a> {
        Ask {
            params,
            generated: &[],
            rng,
            logprob: false,
            top_logprobs: 0,
            keep_row: false,
            mask: None,
            banned,
            allowed: Some(allowed),
        }
    }

    /// `choose_rows` gives what `choose` gives row by row, with the same generators: greedy
    /// rows (on the device argmax and, with a penalty, on the host), sampled rows of every
    /// kind, a grammar mask, log-probabilities, alternatives and a kept row, in one mixed step.
    #[test]
    fn choosing_rows_together_equals_choosing_them_one_by_one() -> candle_core::Result<()> {
        let (rows, vocab) = (9, 3000);
        let mut gen = Rng::new(7);
        let values: Vec<f32> =
            (0..rows * vocab).map(|_| ((gen.uniform() * 40.0).round() / 8.0) as f32).collect();
        let logits = Tensor::from_vec(values, (rows, vocab), &Device::Cpu)?;
        let sampled = |temperature: f32, top_k: u32, top_p: f32| SamplingParams {
            temperature,
            top_k,
            top_p,
            ..SamplingParams::DEFAULTS
        };
        let params = [
            SamplingParams::greedy(),
            sampled(1.0, 0, 1.0),
            sampled(0.7, 40, 0.9),
            SamplingParams { repetition_penalty: 1.3, ..SamplingParams::greedy() },
            sampled(1.3, 0, 0.5),
            SamplingParams { min_p: 0.05, ..sampled(1.0, 0, 1.0) },
            SamplingParams { presence_penalty: 0.5, ..sampled(0.8, 5, 1.0) },
            sampled(1.0, 1, 1.0),
            SamplingParams::greedy(),
        ];
        let generated: Vec<u32> = (0..30).map(|i| i * 53 % vocab as u32).collect();
        let mask = Mask::from_bits(&(0..vocab).map(|i| i % 3 != 0).collect::<Vec<_>>());
        const BANNED: [u32; 3] = [1, 2, 2999];
        const ALLOWED: [u32; 4] = [5, 17, 40, 2998];
        fn ask<'a>(
            i: usize,
            (params, generated, mask): (&'a [SamplingParams], &'a [u32], &'a Mask),
            rng: &'a mut Rng,
        ) -> Ask<'a> {
            Ask {
                params: &params[i],
                generated,
                rng,
                logprob: i.is_multiple_of(2),
                top_logprobs: if i == 4 { 3 } else { 0 },
                keep_row: i == 7,
                mask: (i == 2 || i == 8).then_some(mask),
                banned: if i == 0 || i == 5 { &BANNED } else { &[] },
                allowed: (i == 3 || i == 6).then_some(&ALLOWED[..]),
            }
        }
        let with = (&params[..], &generated[..], &mask);
        for round in 0..20u64 {
            let mut one = StepLogits::new(logits.clone());
            let mut by_row: Vec<Rng> =
                (0..rows as u64).map(|i| Rng::new(round * 100 + i)).collect();
            let want: Vec<Choice> = (0..rows)
                .map(|i| one.choose(i, ask(i, with, &mut by_row[i])))
                .collect::<candle_core::Result<_>>()?;
            let mut all = StepLogits::new(logits.clone());
            let mut together: Vec<Rng> =
                (0..rows as u64).map(|i| Rng::new(round * 100 + i)).collect();
            // Asked out of row order, as the scheduler's sequences may be.
            let mut asks: Vec<(usize, Ask<'_>)> = together
                .iter_mut()
                .enumerate()
                .rev()
                .map(|(i, rng)| (i, ask(i, with, rng)))
                .collect();
            asks.swap(0, 4);
            let order: Vec<usize> = asks.iter().map(|&(i, _)| i).collect();
            let got = all.choose_rows(asks)?;
            for (i, choice) in order.into_iter().zip(got) {
                assert_eq!(choice, want[i], "round {round}, row {i}");
            }
        }
        Ok(())
    }
}
