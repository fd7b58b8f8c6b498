//! Token selection parameters: one type, one set of defaults, one validator, shared by the
//! OpenAI HTTP API, the public gRPC API, the CLI and the decoder.
//!
//! Each front end fills a [`SamplingRequest`] (every field optional: absent means "the
//! default") and calls [`SamplingRequest::resolve`], which applies [`SamplingParams::DEFAULTS`]
//! and [`SamplingParams::validate`]. The resolved [`SamplingParams`] has no "unset" values; it
//! travels to the decoder as is, and the decoder validates it again with the same function
//! (the internal API is a trust boundary too). Out-of-range values are refused naming the
//! field, never silently replaced.
//!
//! | field | default | valid |
//! |---|---|---|
//! | `temperature` | 1.0 (OpenAI's); 0 is greedy, and so is anything below [`GREEDY_BELOW`] | finite, in `[0, 100]` |
//! | `top_k` | 0 (no limit) | any |
//! | `top_p` | 1.0 (no nucleus cut) | in `(0, 1]` |
//! | `repetition_penalty` | 1.0 (none) | finite, in `(0, 100]` |
//! | `seed` | a fresh random seed per request (OpenAI's: random unless given) | any 64-bit value |
//! | `presence_penalty` | 0 | finite, in `[-2, 2]` (OpenAI's range) |
//! | `frequency_penalty` | 0 | finite, in `[-2, 2]` |
//! | `min_p` | 0 (no cut) | in `[0, 1]` |
//! | `logit_bias` | none | at most [`MAX_LOGIT_BIAS`] entries, each in `[-100, 100]`; ids below the vocabulary size (checked where the vocabulary is known) |
//!
//! The logit processors (`logit_bias`, then the repetition, presence and frequency penalties)
//! apply to greedy decoding too, as in `transformers` and vLLM; temperature, `min_p`, `top_k`
//! and `top_p` only shape the distribution that sampling draws from.

use serde::{Deserialize, Serialize};

/// Largest accepted temperature (larger values only flatten the distribution further).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Temperatures below this decode greedily, as vLLM's `_SAMPLING_EPS` (1e-5) makes them: the
/// distribution is the argmax to within rounding there, and dividing the logits by a smaller
/// one overflows them to infinities (a temperature of 1e-40 sent every negative logit to -inf).
pub const GREEDY_BELOW: f32 = 1e-5;
/// Largest accepted repetition penalty.
pub const MAX_REPETITION_PENALTY: f32 = 100.0;
/// Largest magnitude of the presence and frequency penalties (OpenAI's range).
pub const MAX_OCCURRENCE_PENALTY: f32 = 2.0;
/// Most `logit_bias` entries (OpenAI's limit).
pub const MAX_LOGIT_BIAS: usize = 300;
/// Largest magnitude of one `logit_bias` value (OpenAI's range).
pub const MAX_LOGIT_BIAS_VALUE: f32 = 100.0;
/// Most alternatives reported per token (`top_logprobs`, OpenAI's limit).
pub const MAX_TOP_LOGPROBS: u32 = 20;

/// Resolved token selection: every field has its value.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamplingParams {
    /// 0 means greedy (argmax); otherwise logits are divided by it before sampling.
    pub temperature: f32,
    /// Keep the `top_k` most likely tokens (0: no limit).
    pub top_k: u32,
    /// Keep the smallest set whose probability reaches `top_p` (1.0: no cut).
    pub top_p: f32,
    /// `> 1` discourages tokens already generated (1.0: none).
    pub repetition_penalty: f32,
    /// Seed of the sampling generator (same seed, same request, same tokens).
    pub seed: u64,
    /// OpenAI's: subtracted once from the logit of every token generated at least once.
    pub presence_penalty: f32,
    /// OpenAI's: subtracted from a token's logit once per time it was generated.
    pub frequency_penalty: f32,
    /// Drop tokens whose probability is below `min_p` times the most likely one's (0: none).
    pub min_p: f32,
    /// Added to the logits of these token ids before anything else, sorted by id.
    pub logit_bias: Vec<(u32, f32)>,
}

/// Token selection as a caller asked for it: `None` takes the default.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SamplingRequest {
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<u32>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// See [`SamplingParams::seed`]; `None` draws a fresh random seed for every request.
    pub seed: Option<u64>,
    /// See [`SamplingParams::presence_penalty`].
    pub presence_penalty: Option<f32>,
    /// See [`SamplingParams::frequency_penalty`].
    pub frequency_penalty: Option<f32>,
    /// See [`SamplingParams::min_p`].
    pub min_p: Option<f32>,
    /// See [`SamplingParams::logit_bias`] (any order; a repeated id is refused).
    pub logit_bias: Vec<(u32, f32)>,
}

/// A sampling value out of range, naming the field.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field} {reason}")]
pub struct InvalidSampling {
    /// The field, as the public APIs spell it.
    pub field: &'static str,
    /// What is wrong with it.
    pub reason: String,
}

impl SamplingParams {
    /// The defaults of every API (see the module table).
    pub const DEFAULTS: Self = Self {
        temperature: 1.0,
        top_k: 0,
        top_p: 1.0,
        repetition_penalty: 1.0,
        seed: 0,
        presence_penalty: 0.0,
        frequency_penalty: 0.0,
        min_p: 0.0,
        logit_bias: Vec::new(),
    };

    /// Greedy decoding (the reference's `do_sample=False`).
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::DEFAULTS }
    }

    /// Whether this is greedy decoding: a temperature of 0, or below [`GREEDY_BELOW`].
    pub fn is_greedy(&self) -> bool {
        self.temperature < GREEDY_BELOW
    }

    /// Whether a logit processor (bias or penalty) changes the row before the choice; when
    /// none does, greedy decoding is a plain argmax of the model's logits.
    pub fn processes_logits(&self) -> bool {
        self.repetition_penalty != 1.0
            || self.presence_penalty != 0.0
            || self.frequency_penalty != 0.0
            || !self.logit_bias.is_empty()
    }

    /// Checks that every `logit_bias` id is a token of a `vocab`-token vocabulary.
    ///
    /// # Errors
    /// The first id out of range.
    pub fn validate_vocab(&self, vocab: usize) -> Result<(), InvalidSampling> {
        match self.logit_bias.iter().find(|(id, _)| *id as usize >= vocab) {
            Some((id, _)) => Err(InvalidSampling {
                field: "logit_bias",
                reason: format!("token id {id} is not below the vocabulary size {vocab}"),
            }),
            None => Ok(()),
        }
    }

    /// Checks every field against its range.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn validate(&self) -> Result<(), InvalidSampling> {
        let bad = |field, reason: String| Err(InvalidSampling { field, reason });
        let t = self.temperature;
        if !(t.is_finite() && (0.0..=MAX_TEMPERATURE).contains(&t)) {
            return bad("temperature", format!("must be in [0, {MAX_TEMPERATURE}], got {t}"));
        }
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return bad("top_p", format!("must be in (0, 1], got {}", self.top_p));
        }
        let r = self.repetition_penalty;
        if !(r.is_finite() && r > 0.0 && r <= MAX_REPETITION_PENALTY) {
            return bad(
                "repetition_penalty",
                format!("must be in (0, {MAX_REPETITION_PENALTY}], got {r}"),
            );
        }
        for (field, v) in [
            ("presence_penalty", self.presence_penalty),
            ("frequency_penalty", self.frequency_penalty),
        ] {
            if !(v.is_finite() && v.abs() <= MAX_OCCURRENCE_PENALTY) {
                let m = MAX_OCCURRENCE_PENALTY;
                return bad(field, format!("must be in [-{m}, {m}], got {v}"));
            }
        }
        if !(0.0..=1.0).contains(&self.min_p) {
            return bad("min_p", format!("must be in [0, 1], got {}", self.min_p));
        }
        if self.logit_bias.len() > MAX_LOGIT_BIAS {
            let n = self.logit_bias.len();
            return bad("logit_bias", format!("has {n} entries; at most {MAX_LOGIT_BIAS}"));
        }
        for (i, &(id, v)) in self.logit_bias.iter().enumerate() {
            if !(v.is_finite() && v.abs() <= MAX_LOGIT_BIAS_VALUE) {
                let m = MAX_LOGIT_BIAS_VALUE;
                return bad(
                    "logit_bias",
                    format!("value for token {id} must be in [-{m}, {m}], got {v}"),
                );
            }
            if i > 0 && self.logit_bias[i - 1].0 >= id {
                return bad(
                    "logit_bias",
                    format!("token ids must be distinct and sorted (at {id})"),
                );
            }
        }
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::DEFAULTS
    }
}

/// A seed from the operating system's random source, for a request that gave none.
pub fn fresh_seed() -> u64 {
    let mut b = [0u8; 8];
    getrandom::fill(&mut b).expect("the operating system's random source failed");
    u64::from_le_bytes(b)
}

impl SamplingRequest {
    /// Applies the defaults (a fresh random seed when none is given) and validates.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn resolve(self) -> Result<SamplingParams, InvalidSampling> {
        let d = SamplingParams::DEFAULTS;
        let mut logit_bias = self.logit_bias;
        logit_bias.sort_by_key(|&(id, _)| id);
        if let Some(w) = logit_bias.windows(2).find(|w| w[0].0 == w[1].0) {
            return Err(InvalidSampling {
                field: "logit_bias",
                reason: format!("token id {} is given twice", w[0].0),
            });
        }
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            // OpenAI's meaning: random unless a seed is given.
            seed: self.seed.unwrap_or_else(fresh_seed),
            presence_penalty: self.presence_penalty.unwrap_or(d.presence_penalty),
            frequency_penalty: self.frequency_penalty.unwrap_or(d.frequency_penalty),
            min_p: self.min_p.unwrap_or(d.min_p),
            logit_bias,
        };
        p.validate()?;
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unset_fields_take_the_defaults() {
        let (a, b) = (SamplingRequest::default().resolve(), SamplingRequest::default().resolve());
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(SamplingParams { seed: 0, ..a.clone() }, SamplingParams::DEFAULTS);
        // No seed: a fresh one per request (two equal draws of 64 random bits: 2^-64).
        assert_ne!(a.seed, b.seed, "an absent seed is random, not a fixed default");
        let p = SamplingRequest { temperature: Some(0.0), seed: Some(9), ..Default::default() }
            .resolve()
            .unwrap();
        assert!(p.is_greedy());
        assert_eq!((p.top_k, p.top_p, p.repetition_penalty, p.seed), (0, 1.0, 1.0, 9));
    }

    #[test]
    fn zero_is_a_value_not_unset() {
        // top_p 0 and repetition_penalty 0 were once read as "unset" by one layer and passed
        // by another; now they are refused, naming the field.
        let cases = [
            (SamplingRequest { top_p: Some(0.0), ..Default::default() }, "top_p"),
            (
                SamplingRequest { repetition_penalty: Some(0.0), ..Default::default() },
                "repetition_penalty",
            ),
            (SamplingRequest { temperature: Some(-0.1), ..Default::default() }, "temperature"),
            (SamplingRequest { temperature: Some(f32::NAN), ..Default::default() }, "temperature"),
            (SamplingRequest { temperature: Some(101.0), ..Default::default() }, "temperature"),
            (SamplingRequest { top_p: Some(1.5), ..Default::default() }, "top_p"),
            (SamplingRequest { top_p: Some(f32::NAN), ..Default::default() }, "top_p"),
            (
                SamplingRequest { repetition_penalty: Some(f32::INFINITY), ..Default::default() },
                "repetition_penalty",
            ),
            (
                SamplingRequest { presence_penalty: Some(2.5), ..Default::default() },
                "presence_penalty",
            ),
            (
                SamplingRequest { frequency_penalty: Some(f32::NAN), ..Default::default() },
                "frequency_penalty",
            ),
            (SamplingRequest { min_p: Some(-0.1), ..Default::default() }, "min_p"),
            (SamplingRequest { logit_bias: vec![(3, 101.0)], ..Default::default() }, "logit_bias"),
            (
                SamplingRequest { logit_bias: vec![(3, 1.0), (3, 2.0)], ..Default::default() },
                "logit_bias",
            ),
            (
                SamplingRequest {
                    logit_bias: (0..=MAX_LOGIT_BIAS as u32).map(|i| (i, 1.0)).collect(),
                    ..Default::default()
                },
                "logit_bias",
            ),
        ];
        for (req, field) in cases {
            let e = req.clone().resolve().unwrap_err();
            assert_eq!(e.field, field, "{req:?}");
            assert!(e.to_string().starts_with(field), "{e}");
        }
    }

    #[test]
    fn edges_are_accepted() {
        for req in [
            SamplingRequest { top_p: Some(1.0), ..Default::default() },
            SamplingRequest { top_p: Some(1e-6), ..Default::default() },
            SamplingRequest { temperature: Some(MAX_TEMPERATURE), ..Default::default() },
            SamplingRequest { top_k: Some(u32::MAX), seed: Some(u64::MAX), ..Default::default() },
            SamplingRequest {
                presence_penalty: Some(-2.0),
                frequency_penalty: Some(2.0),
                min_p: Some(1.0),
                logit_bias: vec![(9, -100.0), (2, 100.0)],
                ..Default::default()
            },
        ] {
            assert!(req.clone().resolve().is_ok(), "{req:?}");
        }
    }

    #[test]
    fn logit_bias_is_sorted_and_checked_against_the_vocabulary() {
        let p = SamplingRequest { logit_bias: vec![(9, 1.0), (2, -1.0)], ..Default::default() }
            .resolve()
            .unwrap();
        assert_eq!(p.logit_bias, vec![(2, -1.0), (9, 1.0)]);
        assert!(p.processes_logits());
        assert!(p.validate_vocab(10).is_ok());
        assert_eq!(p.validate_vocab(9).unwrap_err().field, "logit_bias");
        assert!(!SamplingParams::greedy().processes_logits());
    }
}
