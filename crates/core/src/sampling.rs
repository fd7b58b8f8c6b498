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
//! | `temperature` | 1.0 (OpenAI's); 0 is greedy | finite, in `[0, 100]` |
//! | `top_k` | 0 (no limit) | any |
//! | `top_p` | 1.0 (no nucleus cut) | in `(0, 1]` |
//! | `repetition_penalty` | 1.0 (none) | finite, in `(0, 100]` |
//! | `seed` | 0 | any 64-bit value |

use serde::{Deserialize, Serialize};

/// Largest accepted temperature (larger values only flatten the distribution further).
pub const MAX_TEMPERATURE: f32 = 100.0;
/// Largest accepted repetition penalty.
pub const MAX_REPETITION_PENALTY: f32 = 100.0;

/// Resolved token selection: every field has its value.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
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
}

/// Token selection as a caller asked for it: `None` takes the default.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct SamplingRequest {
    /// See [`SamplingParams::temperature`].
    pub temperature: Option<f32>,
    /// See [`SamplingParams::top_k`].
    pub top_k: Option<u32>,
    /// See [`SamplingParams::top_p`].
    pub top_p: Option<f32>,
    /// See [`SamplingParams::repetition_penalty`].
    pub repetition_penalty: Option<f32>,
    /// See [`SamplingParams::seed`].
    pub seed: Option<u64>,
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
    pub const DEFAULTS: Self =
        Self { temperature: 1.0, top_k: 0, top_p: 1.0, repetition_penalty: 1.0, seed: 0 };

    /// Greedy decoding (the reference's `do_sample=False`; no penalty applies).
    pub const fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::DEFAULTS }
    }

    /// Whether this is greedy decoding.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
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
        Ok(())
    }
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self::DEFAULTS
    }
}

impl SamplingRequest {
    /// Applies the defaults and validates.
    ///
    /// # Errors
    /// The first field out of range.
    pub fn resolve(self) -> Result<SamplingParams, InvalidSampling> {
        let d = SamplingParams::DEFAULTS;
        let p = SamplingParams {
            temperature: self.temperature.unwrap_or(d.temperature),
            top_k: self.top_k.unwrap_or(d.top_k),
            top_p: self.top_p.unwrap_or(d.top_p),
            repetition_penalty: self.repetition_penalty.unwrap_or(d.repetition_penalty),
            seed: self.seed.unwrap_or(d.seed),
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
        assert_eq!(SamplingRequest::default().resolve(), Ok(SamplingParams::DEFAULTS));
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
        ];
        for (req, field) in cases {
            let e = req.resolve().unwrap_err();
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
        ] {
            assert!(req.resolve().is_ok(), "{req:?}");
        }
    }
}
