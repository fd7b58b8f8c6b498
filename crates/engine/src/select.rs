//! Choosing each sequence's next token from a step's logits where the logits are: greedy
//! rows take one argmax over the whole step on the model's device, and their log-probabilities
//! one log-sum-exp, so only the chosen ids (and the log-probabilities asked for) cross to the
//! host. Rows that sample (temperature, top-k, top-p, penalties) or whose logits the caller
//! keeps are read one row at a time and drawn by [`sample`] with its seeded generator, which
//! orders only the head of the distribution it reaches.

use candle_core::{DType, Tensor, D};

use crate::constraint::Mask;
use crate::sampler::{sample, top_logprobs, Rng, SamplingParams};

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

fn log_softmax_at(row: &[f32], i: usize) -> f32 {
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let lse = row.iter().map(|v| f64::from(v - max).exp()).sum::<f64>().ln() as f32 + max;
    row[i] - lse
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

    /// Chooses the token of logits row `row`.
    ///
    /// # Errors
    /// A device error reading the logits.
    pub fn choose(&mut self, row: usize, ask: Ask<'_>) -> candle_core::Result<Choice> {
        if ask.params.is_greedy()
            && !ask.params.processes_logits()
            && ask.top_logprobs == 0
            && !ask.keep_row
            && ask.mask.is_none()
        {
            if self.argmax.is_none() {
                self.argmax = Some(self.logits.argmax(D::Minus1)?.to_vec1::<u32>()?);
            }
            let id = self.argmax.as_ref().expect("computed above")[row];
            let logprob = if ask.logprob {
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
            return Ok(Choice { id, logprob, top: Vec::new(), row: None });
        }
        let values = self.logits.get(row)?.to_vec1::<f32>()?;
        let id = match ask.mask {
            None => sample(&values, ask.params, ask.generated, ask.rng),
            Some(mask) => {
                let mut allowed = values.clone();
                mask.apply(&mut allowed);
                sample(&allowed, ask.params, ask.generated, ask.rng)
            }
        };
        let logprob = ask.logprob.then(|| log_softmax_at(&values, id as usize));
        let top = top_logprobs(&values, ask.top_logprobs);
        Ok(Choice { id, logprob, top, row: ask.keep_row.then_some(values) })
    }
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

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
            };
            let c = step.choose(i, ask)?;
            assert_eq!(c.id, crate::sampler::argmax(r), "first index on ties");
            let want = log_softmax_at(r, c.id as usize);
            assert!((c.logprob.unwrap() - want).abs() < 1e-6, "{:?} vs {want}", c.logprob);
            assert!(c.row.is_none());
        }
        Ok(())
    }
}
