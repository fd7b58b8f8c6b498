//! Constrained decoding: a sequence may carry a grammar (a JSON schema, "any JSON object", a
//! regular expression or a Lark grammar) that every generated token must keep satisfiable.
//! [`llguidance`] (the engine behind vLLM's, SGLang's and mistral.rs' structured outputs)
//! compiles the grammar against the tokenizer's byte trie and, before each sampling, computes
//! the set of tokens that may come next; the scheduler computes these masks on a CPU thread
//! while the model runs the step, and disallowed logits are set to minus infinity before the
//! token is chosen, greedy or sampled. The outputs therefore parse whatever the weights are.
//!
//! JSON schemas are compiled with compact separators and no free whitespace (OpenAI's strict
//! outputs look the same), so a bounded schema bounds the output's length.

use std::sync::Arc;

use llguidance::api::TopLevelGrammar;
use llguidance::toktrie::SimpleVob;
use llguidance::{Matcher, ParserFactory};

/// What a sequence's output must match.
#[derive(Debug, Clone, PartialEq)]
pub enum Grammar {
    /// A JSON schema (draft 2020-12 subset that llguidance supports).
    JsonSchema(serde_json::Value),
    /// Any JSON object.
    JsonObject,
    /// A regular expression the whole output matches.
    Regex(String),
    /// A Lark grammar (llguidance's dialect).
    Lark(String),
}

/// A grammar that cannot be used, or a tokenizer the constraint engine cannot read.
#[derive(Debug, thiserror::Error)]
pub enum ConstraintError {
    /// The grammar does not compile (the message names the problem).
    #[error("invalid {kind}: {message}")]
    Invalid {
        /// Which kind of grammar.
        kind: &'static str,
        /// llguidance's description.
        message: String,
    },
    /// The tokenizer could not be turned into a token trie.
    #[error("cannot prepare constrained decoding for this tokenizer: {0}")]
    Tokenizer(String),
    /// The matcher failed while generating (a bug or an exhausted resource limit).
    #[error("constrained decoding failed: {0}")]
    Matcher(String),
}

impl Grammar {
    fn kind(&self) -> &'static str {
        match self {
            Self::JsonSchema(_) => "JSON schema",
            Self::JsonObject => "JSON object constraint",
            Self::Regex(_) => "regular expression",
            Self::Lark(_) => "Lark grammar",
        }
    }

    fn top_level(&self) -> Result<TopLevelGrammar, ConstraintError> {
        let compact = |mut schema: serde_json::Value| {
            if let Some(obj) = schema.as_object_mut() {
                obj.entry("x-guidance")
                    .or_insert_with(|| serde_json::json!({"whitespace_flexible": false}));
            }
            schema
        };
        Ok(match self {
            Self::JsonSchema(schema) => {
                if !schema.is_object() && !schema.is_boolean() {
                    return Err(ConstraintError::Invalid {
                        kind: self.kind(),
                        message: "a schema is a JSON object".into(),
                    });
                }
                TopLevelGrammar::from_json_schema(compact(schema.clone()))
            }
            Self::JsonObject => {
                TopLevelGrammar::from_json_schema(compact(serde_json::json!({"type": "object"})))
            }
            Self::Regex(rx) => TopLevelGrammar::from_regex(rx),
            Self::Lark(lark) => TopLevelGrammar::from_lark(lark.clone()),
        })
    }
}

/// Compiles grammars for one tokenizer and vocabulary (built once per process).
#[derive(Clone)]
pub struct ConstraintCompiler {
    factory: Arc<ParserFactory>,
}

impl std::fmt::Debug for ConstraintCompiler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConstraintCompiler").finish_non_exhaustive()
    }
}

impl ConstraintCompiler {
    /// From a Hugging Face `tokenizer.json`, the model's vocabulary size (its logits' width,
    /// which may exceed the tokenizer's) and its end-of-sequence id.
    pub fn from_tokenizer_json(
        tokenizer_json: &[u8],
        vocab_size: usize,
        eos: u32,
    ) -> Result<Self, ConstraintError> {
        let bad = |e: anyhow::Error| ConstraintError::Tokenizer(e.to_string());
        let mut tok =
            toktrie_hf_tokenizers::ByteTokenizer::from_json_bytes(tokenizer_json).map_err(bad)?;
        tok.set_eos_token(eos);
        let env = tok.into_tok_env(Some(vocab_size)).map_err(bad)?;
        let mut factory = ParserFactory::new_simple(&env).map_err(bad)?;
        factory.quiet();
        Ok(Self { factory: Arc::new(factory) })
    }

    /// A fresh matcher for `grammar`, or why the grammar cannot be used.
    pub fn compile(&self, grammar: &Grammar) -> Result<Constraint, ConstraintError> {
        let invalid = |message: String| ConstraintError::Invalid { kind: grammar.kind(), message };
        let parser =
            self.factory.create_parser(grammar.top_level()?).map_err(|e| invalid(e.to_string()))?;
        let matcher = Matcher::new(Ok(parser));
        if let Some(e) = matcher.get_error() {
            return Err(invalid(e));
        }
        Ok(Constraint { matcher })
    }
}

/// One sequence's grammar state.
pub struct Constraint {
    matcher: Matcher,
}

impl std::fmt::Debug for Constraint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Constraint").field("stopped", &self.matcher.is_stopped()).finish()
    }
}

/// The tokens allowed next.
pub struct Mask(SimpleVob);

impl Mask {
    /// A mask allowing the tokens whose entry is `true` (tests).
    #[cfg(test)]
    pub(crate) fn from_bits(bits: &[bool]) -> Self {
        Self(SimpleVob::from_slice(bits))
    }

    /// Sets every disallowed entry of `row` (one logits row) to minus infinity.
    pub fn apply(&self, row: &mut [f32]) {
        for (i, v) in row.iter_mut().enumerate() {
            if !self.0.is_allowed(i as u32) {
                *v = f32::NEG_INFINITY;
            }
        }
    }

    /// Whether `token` is allowed.
    pub fn allows(&self, token: u32) -> bool {
        self.0.is_allowed(token)
    }
}

impl Constraint {
    /// The tokens that may come next (only the end-of-sequence token once the grammar is
    /// complete).
    pub fn mask(&mut self) -> Result<Mask, ConstraintError> {
        let m = self
            .matcher
            .compute_mask_or_eos()
            .map_err(|e| ConstraintError::Matcher(e.to_string()))?;
        if m.is_zero() {
            return Err(ConstraintError::Matcher("no token can continue the output".into()));
        }
        Ok(Mask(m))
    }

    /// Advances past `token` (one the mask allowed).
    pub fn consume(&mut self, token: u32) -> Result<(), ConstraintError> {
        self.matcher.consume_token(token).map_err(|e| ConstraintError::Matcher(e.to_string()))
    }

    /// Whether the output is complete (nothing more may follow).
    pub fn is_complete(&self) -> bool {
        self.matcher.is_stopped()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compiler() -> ConstraintCompiler {
        let json = std::fs::read(dsvl_testkit::tiny_model_dir().join("tokenizer.json")).unwrap();
        ConstraintCompiler::from_tokenizer_json(&json, 1024, 1001).unwrap()
    }

    #[test]
    fn invalid_grammars_name_the_problem() {
        let c = compiler();
        let bad_schema = Grammar::JsonSchema(serde_json::json!({"type": "nonsense"}));
        let e = c.compile(&bad_schema).unwrap_err().to_string();
        assert!(e.starts_with("invalid JSON schema"), "{e}");
        let e = c.compile(&Grammar::Regex("(unclosed".into())).unwrap_err().to_string();
        assert!(e.starts_with("invalid regular expression"), "{e}");
        let e = c.compile(&Grammar::Lark("start: undefined_rule".into())).unwrap_err().to_string();
        assert!(e.starts_with("invalid Lark grammar"), "{e}");
        let e = c.compile(&Grammar::JsonSchema(serde_json::json!([1]))).unwrap_err().to_string();
        assert!(e.contains("a schema is a JSON object"), "{e}");
    }

    #[test]
    fn a_regex_is_followed_token_by_token_and_completes() {
        let c = compiler();
        let mut k = c.compile(&Grammar::Regex("ab|cd".into())).unwrap();
        let tok = tokenizers::Tokenizer::from_bytes(
            std::fs::read(dsvl_testkit::tiny_model_dir().join("tokenizer.json")).unwrap(),
        )
        .unwrap();
        let id = |s: &str| tok.token_to_id(s).unwrap();
        let m = k.mask().unwrap();
        assert!(m.allows(id("a")) && m.allows(id("c")));
        assert!(!m.allows(id("b")) && !m.allows(1001), "b, and EOS, cannot start it");
        let mut row = vec![1.0f32; 1024];
        m.apply(&mut row);
        assert!(row[id("a") as usize] == 1.0 && row[id("b") as usize] == f32::NEG_INFINITY);
        k.consume(id("a")).unwrap();
        let m = k.mask().unwrap();
        assert!(m.allows(id("b")) && !m.allows(id("d")));
        k.consume(id("b")).unwrap();
        let m = k.mask().unwrap();
        assert!(m.allows(1001), "complete: only EOS");
        assert!(!m.allows(id("a")));
    }
}
