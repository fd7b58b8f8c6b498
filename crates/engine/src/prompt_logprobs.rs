//! Prompt log-probabilities (OpenAI's `echo` with `logprobs`, vLLM's `prompt_logprobs`): for
//! every prompt token after the first, its log-probability given the tokens before it and the
//! most likely tokens at that position, all under the model's unprocessed distribution (the
//! same figures a generated token's `logprobs` report).
//!
//! They come from the prefill's logits rows: the row at position `p` is the distribution of
//! the token at `p + 1`. A request that asks for them has every prefill chunk return all its
//! rows ([`dsvl_models::llm::LogitRows::All`]) and is prefilled whole, not from the prefix
//! cache (a cached position has no row); the rows are read on the host a chunk at a time and
//! reduced there, so no more than a chunk's `[tokens, vocab]` is held at once.

use candle_core::Tensor;
use rayon::prelude::*;

use crate::sampler::{log_sum_exp, top_logprobs_under};

/// One prompt token's log-probability given the tokens before it.
#[derive(Debug, Clone, PartialEq)]
pub struct PromptLogprob {
    /// The prompt token.
    pub id: u32,
    /// Its log-probability at its position.
    pub logprob: f32,
    /// Its rank there: 1 plus the number of tokens more likely (vLLM's `rank`).
    pub rank: u32,
    /// The most likely tokens at its position with their log-probabilities, most likely first.
    pub top: Vec<(u32, f32)>,
}

/// Appends to `known` (the entries of positions `1..=known.len()`) what the logits `rows` of
/// a chunk starting at prompt position `start` add: the entries of the next positions, in
/// order. Rows of positions already known (a chunk computed again after a preemption) and the
/// last prompt position's row (it predicts the first new token) add nothing.
///
/// # Errors
/// `rows` is not a `[tokens, vocab]` f32 tensor, or leaves a gap after `known` (a prefix of
/// the prompt was not computed).
pub fn extend(
    known: &mut Vec<PromptLogprob>,
    prompt: &[u32],
    rows: &Tensor,
    start: usize,
    top: usize,
) -> candle_core::Result<()> {
    if start > known.len() {
        candle_core::bail!(
            "prompt logprobs: a chunk at position {start} after {} known positions",
            known.len()
        );
    }
    // A few rows on the host at a time: a long chunk's `[tokens, vocab]` is not copied whole.
    const ROWS: usize = 64;
    let count = rows.dim(0)?;
    for first in (0..count).step_by(ROWS) {
        let block: Vec<Vec<f32>> = rows.narrow(0, first, ROWS.min(count - first))?.to_vec2()?;
        let new = entries(&block, start + first, known.len(), prompt, top);
        known.extend(new);
    }
    Ok(())
}

/// The entries of the rows `block`, the first at position `start`, from position `from` on.
fn entries(
    block: &[Vec<f32>],
    start: usize,
    from: usize,
    prompt: &[u32],
    top: usize,
) -> Vec<PromptLogprob> {
    block
        .par_iter()
        .enumerate()
        .map(|(r, row)| (start + r, row))
        .filter(|&(p, _)| p >= from && p + 1 < prompt.len())
        .map(|(p, row)| {
            let id = prompt[p + 1];
            if id as usize >= row.len() {
                // Not a token of this vocabulary (the scheduler refuses such prompts first).
                return PromptLogprob {
                    id,
                    logprob: f32::NEG_INFINITY,
                    rank: row.len() as u32 + 1,
                    top: Vec::new(),
                };
            }
            // One normaliser for the token and its alternatives, as for a generated token.
            let lse = log_sum_exp(row);
            let score = row[id as usize];
            PromptLogprob {
                id,
                logprob: score - lse,
                rank: 1 + row.iter().filter(|&&v| v > score).count() as u32,
                top: top_logprobs_under(row, top, lse),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;

    fn rows(values: &[[f32; 3]]) -> Tensor {
        let flat: Vec<f32> = values.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (values.len(), 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn each_row_scores_the_next_prompt_token() {
        let prompt = [0, 2, 1, 2];
        let mut known = Vec::new();
        // Positions 0-1, then 2-3 (3 is the last: it predicts a new token, not a prompt one).
        extend(&mut known, &prompt, &rows(&[[0.0, 0.0, 0.0], [1.0, 2.0, 3.0]]), 0, 2).unwrap();
        extend(&mut known, &prompt, &rows(&[[5.0, 0.0, 0.0], [9.0, 9.0, 9.0]]), 2, 0).unwrap();
        assert_eq!(known.iter().map(|e| e.id).collect::<Vec<_>>(), [2, 1, 2]);
        let third = (3f32).ln();
        assert!((known[0].logprob + third).abs() < 1e-6, "uniform row: ln(1/3)");
        let lse = (1f32.exp() + 2f32.exp() + 3f32.exp()).ln();
        assert!((known[1].logprob - (2.0 - lse)).abs() < 1e-6);
        assert_eq!(known[1].top.len(), 2);
        assert_eq!(known[1].top[0].0, 2, "most likely first");
        assert!((known[1].top[0].1 - (3.0 - lse)).abs() < 1e-6);
        let lse = (5f32.exp() + 2.0).ln();
        assert!((known[2].logprob - (0.0 - lse)).abs() < 1e-6);
        assert!(known[2].top.is_empty(), "no alternatives asked for");
        // Ranks: 1 plus the tokens strictly more likely (ties share the better rank).
        assert_eq!(known.iter().map(|e| e.rank).collect::<Vec<_>>(), [1, 2, 2]);
    }

    #[test]
    fn a_chunk_computed_again_adds_only_new_positions_and_a_gap_is_an_error() {
        let prompt = [0, 1, 2, 0, 1];
        let mut known = Vec::new();
        let r = rows(&[[0.0, 1.0, 2.0], [2.0, 1.0, 0.0], [0.0, 0.0, 9.0]]);
        extend(&mut known, &prompt, &r, 0, 0).unwrap();
        let before = known.clone();
        extend(&mut known, &prompt, &r, 0, 0).unwrap();
        assert_eq!(known, before, "positions 0-2 again: nothing new");
        assert!(extend(&mut known, &prompt, &r, 4, 0).is_err(), "position 3 was skipped");
        extend(&mut known, &prompt, &r.narrow(0, 0, 2).unwrap(), 2, 0).unwrap();
        assert_eq!(known.iter().map(|e| e.id).collect::<Vec<_>>(), [1, 2, 0, 1]);
    }
}
