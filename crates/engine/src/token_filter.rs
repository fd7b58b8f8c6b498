//! Which tokens a sequence may choose next, besides its grammar: vLLM's `allowed_token_ids`
//! (only these, ever), `bad_words` (token sequences the output never completes) and
//! `min_tokens` (the stop ids held back until the minimum). The scheduler asks for the banned
//! set each step; the chosen row's banned and disallowed logits are set to minus infinity
//! before the token is chosen, greedy or sampled ([`crate::select`]), and the log-probabilities
//! reported stay those of the unprocessed distribution.

/// A request's limits on the tokens it may choose.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TokenFilter {
    /// Only these may be chosen (`None`: any).
    pub allowed: Option<Vec<u32>>,
    /// Token sequences the output never completes: when it ends with all but the last token
    /// of one, that last token is banned (a one-token sequence always is). Over the generated
    /// tokens only, as vLLM's.
    pub bad_words: Vec<Vec<u32>>,
}

impl TokenFilter {
    /// Whether the filter can change a choice at all.
    pub fn is_empty(&self) -> bool {
        self.allowed.is_none() && self.bad_words.is_empty()
    }

    /// The tokens banned after `generated`: each bad word's last token where the output ends
    /// with the rest of it, and `stop_ids` while the output is shorter than `min_new_tokens`.
    /// Sorted, without repeats.
    pub fn banned(&self, generated: &[u32], stop_ids: &[u32], min_new_tokens: usize) -> Vec<u32> {
        let mut banned: Vec<u32> = self
            .bad_words
            .iter()
            .filter_map(|word| {
                let (&last, before) = word.split_last()?;
                generated.ends_with(before).then_some(last)
            })
            .collect();
        if generated.len() < min_new_tokens {
            banned.extend_from_slice(stop_ids);
        }
        banned.sort_unstable();
        banned.dedup();
        banned
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bad_words_ban_their_last_token_after_the_rest() {
        let f = TokenFilter { allowed: None, bad_words: vec![vec![7], vec![1, 2, 3], vec![2, 9]] };
        assert_eq!(f.banned(&[], &[], 0), [7], "a one-token word is always banned");
        assert_eq!(f.banned(&[5, 1, 2], &[], 0), [3, 7, 9], "[1, 2] then 3; [2] then 9");
        assert_eq!(f.banned(&[1, 2, 4], &[], 0), [7]);
        assert_eq!(f.banned(&[2], &[], 0), [7, 9]);
    }

    #[test]
    fn stop_ids_are_banned_below_the_minimum_only() {
        let f = TokenFilter::default();
        assert!(f.is_empty());
        assert_eq!(f.banned(&[4, 4], &[8, 1], 3), [1, 8]);
        assert!(f.banned(&[4, 4, 4], &[8, 1], 3).is_empty());
    }
}
