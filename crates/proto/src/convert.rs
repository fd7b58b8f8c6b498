//! The one mapping between the wire messages and the workspace's own types. Every service
//! converts through these functions, so a field is interpreted in one place.

use dsvl_core::sampling::{SamplingParams, SamplingRequest};

use crate::{internal, v1};

/// The public API's optional fields, as asked (defaults and validation: [`SamplingRequest::resolve`]).
impl From<&v1::SamplingParams> for SamplingRequest {
    fn from(p: &v1::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        }
    }
}

/// Resolved parameters onto the internal wire (every field set).
impl From<&SamplingParams> for internal::SamplingParams {
    fn from(p: &SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        }
    }
}

/// Resolved parameters off the internal wire; the receiver still validates them
/// ([`SamplingParams::validate`]).
impl From<&internal::SamplingParams> for SamplingParams {
    fn from(p: &internal::SamplingParams) -> Self {
        Self {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolved_parameters_round_trip_the_internal_wire() {
        let p = SamplingParams {
            temperature: 0.7,
            top_k: 5,
            top_p: 0.9,
            repetition_penalty: 1.1,
            seed: 42,
        };
        assert_eq!(SamplingParams::from(&internal::SamplingParams::from(&p)), p);
    }

    #[test]
    fn public_fields_keep_their_presence() {
        let public = v1::SamplingParams { top_p: Some(0.0), ..Default::default() };
        let req = SamplingRequest::from(&public);
        assert_eq!(req.top_p, Some(0.0));
        assert_eq!(req.temperature, None);
        assert_eq!(req.resolve().unwrap_err().field, "top_p");
    }
}
