//! Stop strings over streamed text.
//!
//! Text arrives in pieces; a stop string may straddle two of them. [`StopText`] emits text as
//! soon as it cannot be the start of a stop string, holds back the longest tail that still
//! could be, and on a match returns the text before it (the stop string itself is not sent,
//! as in OpenAI's API, unless vLLM's `include_stop_str_in_output` asks for it).

/// Streaming stop-string matcher.
#[derive(Debug, Clone, Default)]
pub struct StopText {
    stops: Vec<String>,
    /// Keep the matched stop string at the end of the released text.
    keep: bool,
    pending: String,
    /// The stop string that matched, once one has.
    matched: Option<String>,
    stopped: bool,
}

/// What a pushed piece released.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Released {
    /// Text safe to send now.
    pub text: String,
    /// A stop string matched: `text` ends right before it (or right after it, when kept) and
    /// nothing more will be released.
    pub stopped: bool,
}

impl StopText {
    /// A matcher for non-empty `stops` (empty strings are ignored); `keep`: a matched stop
    /// string is released with the text before it.
    pub fn new(stops: &[String], keep: bool) -> Self {
        let stops = stops.iter().filter(|s| !s.is_empty()).cloned().collect();
        Self { stops, keep, ..Self::default() }
    }

    /// Adds generated text.
    pub fn push(&mut self, piece: &str) -> Released {
        if self.stopped {
            return Released { text: String::new(), stopped: true };
        }
        self.pending.push_str(piece);
        // The earliest match; at one position, the first stop listed.
        let found = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()).map(|at| (at, s.len())))
            .min_by_key(|&(at, _)| at);
        if let Some((at, len)) = found {
            self.stopped = true;
            self.matched = Some(self.pending[at..at + len].to_string());
            let end = if self.keep { at + len } else { at };
            let text = self.pending[..end].to_string();
            self.pending.clear();
            return Released { text, stopped: true };
        }
        let hold = self.held_tail();
        let text = self.pending[..self.pending.len() - hold].to_string();
        self.pending.drain(..self.pending.len() - hold);
        Released { text, stopped: false }
    }

    /// The stop string that ended the text, if one did.
    pub fn matched(&self) -> Option<&str> {
        self.matched.as_deref()
    }

    /// Releases what was held back (generation ended without a match).
    pub fn finish(&mut self) -> String {
        if self.stopped {
            return String::new();
        }
        std::mem::take(&mut self.pending)
    }

    /// Bytes at the end of `pending` that are a proper prefix of some stop string.
    fn held_tail(&self) -> usize {
        let p = &self.pending;
        self.stops
            .iter()
            .flat_map(|s| {
                (1..s.len().min(p.len() + 1))
                    .rev()
                    .filter(|&k| s.is_char_boundary(k) && p.ends_with(&s[..k]))
                    .take(1)
            })
            .max()
            .unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (String, bool) {
        run_keeping(false, stops, pieces)
    }

    fn run_keeping(keep: bool, stops: &[&str], pieces: &[&str]) -> (String, bool) {
        let stops: Vec<String> = stops.iter().map(|s| s.to_string()).collect();
        let mut m = StopText::new(&stops, keep);
        let mut out = String::new();
        for p in pieces {
            let r = m.push(p);
            out.push_str(&r.text);
            if r.stopped {
                return (out, true);
            }
        }
        out.push_str(&m.finish());
        (out, false)
    }

    #[test]
    fn matches_across_pieces_and_cuts_before_the_stop() {
        assert_eq!(run(&["END"], &["hello E", "N", "D tail"]), ("hello ".into(), true));
        assert_eq!(run(&["\n\n"], &["a\n", "\nb"]), ("a".into(), true));
        assert_eq!(run(&["xyz", "b"], &["aab"]), ("aa".into(), true));
    }

    #[test]
    fn releases_held_text_when_no_stop_follows() {
        assert_eq!(run(&["END"], &["hello E", "N", "x"]), ("hello ENx".into(), false));
        assert_eq!(run(&["END"], &["tail E"]), ("tail E".into(), false));
        assert_eq!(run(&[], &["a", "b"]), ("ab".into(), false));
    }

    #[test]
    fn holds_back_only_what_could_start_a_stop() {
        let mut m = StopText::new(&["Über".to_string()], false);
        assert_eq!(m.push("x Ü").text, "x ");
        assert_eq!(m.push("ber").text, "");
        let mut m = StopText::new(&["abc".to_string()], false);
        assert_eq!(m.push("zzab").text, "zz");
        assert_eq!(m.push("d").text, "abd");
    }

    #[test]
    fn a_kept_stop_string_ends_the_text() {
        assert_eq!(
            run_keeping(true, &["END"], &["hello E", "N", "D tail"]),
            ("hello END".into(), true)
        );
        // The earliest match wins, whichever is listed first; at one position, the first listed.
        assert_eq!(run_keeping(true, &["c", "ab"], &["xabc"]), ("xab".into(), true));
        assert_eq!(run_keeping(true, &["ab", "abc"], &["xabcd"]), ("xab".into(), true));
        assert_eq!(run_keeping(true, &["abc", "ab"], &["xabcd"]), ("xabc".into(), true));
        assert_eq!(run_keeping(false, &["abc", "ab"], &["xabcd"]), ("x".into(), true));
        assert_eq!(run_keeping(true, &["END"], &["no stop"]), ("no stop".into(), false));
    }

    #[test]
    fn the_matched_stop_string_is_named() {
        let stops = ["xyz".to_string(), "b".to_string()];
        let mut m = StopText::new(&stops, false);
        assert_eq!(m.push("aa").text, "aa");
        assert_eq!(m.matched(), None);
        assert!(m.push("ab").stopped);
        assert_eq!(m.matched(), Some("b"));
    }
}
