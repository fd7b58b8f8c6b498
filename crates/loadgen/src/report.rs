//! What happened to each request ([`Outcome`]) and the summary of a run ([`Report`]): counts by
//! error class, latency percentiles, throughput and goodput under an SLO, as `vllm bench serve`
//! and SGLang's `bench_serving` report them.
//!
//! Percentiles are nearest-rank (the sorted sample at `round((n - 1) p)`), not interpolated.
//!
//! Latencies: TTFT is from sending the request to the first output token; inter-token latency
//! (ITL) is every gap between output chunks after the first; end-to-end (E2E) is until the
//! stream's end. Goodput counts completed requests that met every SLO given.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// How long past its deadline a request may end and still count as ending in time.
pub const DEADLINE_SLACK: Duration = Duration::from_secs(1);

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub kind: Arc<str>,
    /// When it was sent, from the start of the run.
    pub sent_at: Duration,
    /// `Ok` with a complete answer, or the error class (`http_503`, `UNAVAILABLE`, `connect`,
    /// `stream_cut`, `hung`, ...).
    pub result: Result<(), String>,
    pub ttft: Option<Duration>,
    /// Gaps between output chunks after the first.
    pub itl: Vec<Duration>,
    pub e2e: Duration,
    pub output_tokens: u32,
    /// The deadline it was sent with.
    pub deadline: Duration,
}

impl Outcome {
    /// Whether it ended after its deadline plus [`DEADLINE_SLACK`] (or the client gave up on it).
    pub fn late(&self) -> bool {
        self.e2e > self.deadline + DEADLINE_SLACK
            || self.result.as_ref().is_err_and(|c| c == "hung")
    }
}

/// Whether an error class is one a client should retry: overload, no healthy upstream, the
/// deadline, a connection that was never accepted, or one closed before any byte of the answer
/// (HTTP/1.1 keep-alive's race with a server closing idle connections, which the OpenAI clients
/// retry). A stream cut after its first byte (`stream_cut`) is not.
pub fn retryable(class: &str) -> bool {
    matches!(
        class,
        "http_429"
            | "http_503"
            | "http_504"
            | "RESOURCE_EXHAUSTED"
            | "UNAVAILABLE"
            | "DEADLINE_EXCEEDED"
            | "connect"
            | "connection_closed"
    )
}

/// Service-level objectives for goodput; those not given are not checked.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Slo {
    pub ttft_ms: Option<f64>,
    /// On the request's mean inter-token latency (time per output token).
    pub itl_ms: Option<f64>,
    pub e2e_ms: Option<f64>,
}

impl Slo {
    fn met(&self, o: &Outcome) -> bool {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let ttft_ok = self.ttft_ms.is_none_or(|s| o.ttft.is_some_and(|t| ms(t) <= s));
        let mean_itl = (!o.itl.is_empty())
            .then(|| o.itl.iter().map(|d| ms(*d)).sum::<f64>() / o.itl.len() as f64);
        let itl_ok = self.itl_ms.is_none_or(|s| mean_itl.is_none_or(|m| m <= s));
        let e2e_ok = self.e2e_ms.is_none_or(|s| ms(o.e2e) <= s);
        o.result.is_ok() && ttft_ok && itl_ok && e2e_ok
    }
}

/// Percentiles of a latency, in milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize, PartialEq)]
pub struct Percentiles {
    pub mean: f64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub max: f64,
}

impl Percentiles {
    fn of(mut ms: Vec<f64>) -> Self {
        if ms.is_empty() {
            return Self::default();
        }
        ms.sort_by(f64::total_cmp);
        let at = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        let mean = ms.iter().sum::<f64>() / ms.len() as f64;
        Self { mean, p50: at(0.5), p90: at(0.9), p99: at(0.99), max: ms[ms.len() - 1] }
    }
}

/// The fields of a [`Report`]'s JSON that the issue and the docs promise (`--json`).
pub const REPORT_FIELDS: &[&str] = &[
    "completed",
    "failed",
    "errors",
    "ttft_ms",
    "itl_ms",
    "e2e_ms",
    "output_tokens_per_s",
    "goodput",
];

/// The summary of a run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub completed: u64,
    pub failed: u64,
    /// Failures by class.
    pub errors: BTreeMap<String, u64>,
    /// Failures of a class that is not retryable ([`retryable`]).
    pub failed_not_retryable: u64,
    /// Requests that ended after their deadline plus 1 s (`hung` ones included).
    pub late: u64,
    /// The furthest past its deadline any request ended (0 when none did).
    pub worst_past_deadline_ms: f64,
    pub ttft_ms: Percentiles,
    pub itl_ms: Percentiles,
    pub e2e_ms: Percentiles,
    pub output_tokens: u64,
    pub output_tokens_per_s: f64,
    pub requests_per_s: f64,
    /// Completed requests per second that met every SLO.
    pub goodput: f64,
    /// The share of all requests that completed within the SLO.
    pub goodput_fraction: f64,
    pub slo: Slo,
    pub duration_s: f64,
    /// The same by request kind (`text`, `image`, ..., `urgent`, a file's kinds).
    pub by_kind: BTreeMap<String, KindReport>,
}

/// One kind's share of a run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct KindReport {
    pub completed: u64,
    pub failed: u64,
    pub ttft_ms: Percentiles,
    pub e2e_ms: Percentiles,
}

impl KindReport {
    fn of<'a>(outcomes: impl Iterator<Item = &'a Outcome>) -> Self {
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let (ok, failed): (Vec<&Outcome>, Vec<&Outcome>) = outcomes.partition(|o| o.result.is_ok());
        Self {
            completed: ok.len() as u64,
            failed: failed.len() as u64,
            ttft_ms: Percentiles::of(ok.iter().filter_map(|o| o.ttft.as_ref().map(ms)).collect()),
            e2e_ms: Percentiles::of(ok.iter().map(|o| ms(&o.e2e)).collect()),
        }
    }
}

impl Report {
    /// Summarises `outcomes` of a run that lasted `duration` (warm-up excluded by the caller).
    pub fn new(outcomes: &[Outcome], duration: Duration, slo: Slo) -> Self {
        let secs = duration.as_secs_f64().max(1e-9);
        let ms = |d: &Duration| d.as_secs_f64() * 1e3;
        let ok: Vec<&Outcome> = outcomes.iter().filter(|o| o.result.is_ok()).collect();
        let mut errors = BTreeMap::new();
        for o in outcomes {
            if let Err(class) = &o.result {
                *errors.entry(class.clone()).or_insert(0) += 1;
            }
        }
        let failed_not_retryable =
            errors.iter().filter(|(c, _)| !retryable(c)).map(|(_, n)| n).sum();
        let worst_past_deadline_ms =
            outcomes.iter().map(|o| ms(&o.e2e.saturating_sub(o.deadline))).fold(0.0, f64::max);
        let output_tokens: u64 = ok.iter().map(|o| o.output_tokens as u64).sum();
        let good = ok.iter().filter(|o| slo.met(o)).count();
        let kinds: std::collections::BTreeSet<&str> = outcomes.iter().map(|o| &*o.kind).collect();
        let by_kind = kinds
            .into_iter()
            .map(|k| (k.to_string(), KindReport::of(outcomes.iter().filter(|o| &*o.kind == k))))
            .collect();
        Self {
            completed: ok.len() as u64,
            failed: (outcomes.len() - ok.len()) as u64,
            errors,
            failed_not_retryable,
            late: outcomes.iter().filter(|o| o.late()).count() as u64,
            worst_past_deadline_ms,
            ttft_ms: Percentiles::of(ok.iter().filter_map(|o| o.ttft.as_ref().map(ms)).collect()),
            itl_ms: Percentiles::of(ok.iter().flat_map(|o| o.itl.iter().map(ms)).collect()),
            e2e_ms: Percentiles::of(ok.iter().map(|o| ms(&o.e2e)).collect()),
            output_tokens,
            output_tokens_per_s: output_tokens as f64 / secs,
            requests_per_s: ok.len() as f64 / secs,
            goodput: good as f64 / secs,
            goodput_fraction: good as f64 / outcomes.len().max(1) as f64,
            slo,
            duration_s: secs,
            by_kind,
        }
    }

    /// A table for people.
    pub fn table(&self) -> String {
        let mut s = String::new();
        let total = self.completed + self.failed;
        let _ = writeln!(
            s,
            "requests          {total} ({} completed, {} failed)",
            self.completed, self.failed
        );
        for (class, n) in &self.errors {
            let r = if retryable(class) { "retryable" } else { "NOT retryable" };
            let _ = writeln!(s, "  {class:<16}{n} ({r})");
        }
        let _ = writeln!(s, "duration          {:.2} s", self.duration_s);
        let _ = writeln!(s, "requests/s        {:.2}", self.requests_per_s);
        let _ = writeln!(
            s,
            "output tokens/s   {:.1} ({} tokens)",
            self.output_tokens_per_s, self.output_tokens
        );
        let _ = writeln!(
            s,
            "goodput           {:.2} req/s ({:.1} % of requests within the SLO)",
            self.goodput,
            self.goodput_fraction * 100.0
        );
        let _ = writeln!(
            s,
            "late (>deadline+1s) {}, worst past deadline {:.0} ms",
            self.late, self.worst_past_deadline_ms
        );
        let _ = writeln!(
            s,
            "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}",
            "ms", "mean", "p50", "p90", "p99", "max"
        );
        for (name, p) in [("TTFT", self.ttft_ms), ("ITL", self.itl_ms), ("E2E", self.e2e_ms)] {
            let _ = writeln!(
                s,
                "{name:<12}{:>10.1}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                p.mean, p.p50, p.p90, p.p99, p.max
            );
        }
        if self.by_kind.len() > 1 {
            let _ = writeln!(
                s,
                "{:<12}{:>10}{:>10}{:>10}{:>10}{:>10}{:>10}",
                "by kind", "done", "failed", "TTFT p50", "TTFT p99", "E2E p50", "E2E p99"
            );
            for (kind, k) in &self.by_kind {
                let _ = writeln!(
                    s,
                    "{kind:<12}{:>10}{:>10}{:>10.1}{:>10.1}{:>10.1}{:>10.1}",
                    k.completed, k.failed, k.ttft_ms.p50, k.ttft_ms.p99, k.e2e_ms.p50, k.e2e_ms.p99
                );
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(ttft_ms: u64, itl_ms: &[u64], e2e_ms: u64, tokens: u32) -> Outcome {
        Outcome {
            kind: "text".into(),
            sent_at: Duration::ZERO,
            result: Ok(()),
            ttft: Some(Duration::from_millis(ttft_ms)),
            itl: itl_ms.iter().map(|m| Duration::from_millis(*m)).collect(),
            e2e: Duration::from_millis(e2e_ms),
            output_tokens: tokens,
            deadline: Duration::from_secs(10),
        }
    }

    fn failed(class: &str, e2e_ms: u64) -> Outcome {
        Outcome { result: Err(class.into()), ttft: None, itl: vec![], ..ok(0, &[], e2e_ms, 0) }
    }

    #[test]
    fn counts_percentiles_and_goodput_follow_the_outcomes() {
        let outcomes = vec![
            ok(100, &[10, 20], 130, 3),
            ok(300, &[50, 50], 400, 3),
            failed("http_503", 5),
            failed("stream_cut", 12_500),
        ];
        let slo = Slo { ttft_ms: Some(200.0), itl_ms: None, e2e_ms: None };
        let r = Report::new(&outcomes, Duration::from_secs(2), slo);
        assert_eq!((r.completed, r.failed), (2, 2));
        assert_eq!(r.errors.get("http_503"), Some(&1));
        assert_eq!(r.failed_not_retryable, 1);
        assert_eq!(r.late, 1);
        assert_eq!(r.worst_past_deadline_ms, 2500.0);
        assert_eq!(r.output_tokens_per_s, 3.0);
        assert_eq!(r.requests_per_s, 1.0);
        assert_eq!(r.goodput, 0.5);
        assert_eq!(r.goodput_fraction, 0.25);
        assert_eq!(r.ttft_ms.p50, 300.0);
        assert_eq!(r.ttft_ms.mean, 200.0);
        assert_eq!(r.itl_ms.max, 50.0);
        assert_eq!(r.e2e_ms.p99, 400.0);
        let slo = Slo { ttft_ms: None, itl_ms: Some(20.0), e2e_ms: None };
        assert_eq!(Report::new(&outcomes, Duration::from_secs(2), slo).goodput, 0.5);
        let t = r.table();
        assert!(t.contains("stream_cut      1 (NOT retryable)"), "{t}");
        assert_eq!(r.by_kind.len(), 1, "one kind: no breakdown in the table");
        assert!(!t.contains("by kind"), "{t}");
    }

    #[test]
    fn each_kind_has_its_own_counts_and_percentiles() {
        let urgent = |ttft| Outcome { kind: "urgent".into(), ..ok(ttft, &[], ttft + 10, 1) };
        let outcomes = vec![ok(500, &[], 600, 1), urgent(20), urgent(40), failed("http_503", 5)];
        let r = Report::new(&outcomes, Duration::from_secs(1), Slo::default());
        let u = &r.by_kind["urgent"];
        assert_eq!((u.completed, u.failed, u.ttft_ms.p50, u.e2e_ms.max), (2, 0, 40.0, 50.0));
        let t = &r.by_kind["text"];
        assert_eq!((t.completed, t.failed, t.ttft_ms.p99), (1, 1, 500.0));
        assert!(r.table().contains("by kind"), "{}", r.table());
    }

    #[test]
    fn the_json_has_the_documented_fields() {
        let r = Report::new(&[ok(1, &[], 2, 1)], Duration::from_secs(1), Slo::default());
        let v = serde_json::to_value(&r).unwrap();
        for k in REPORT_FIELDS {
            assert!(v.get(k).is_some(), "{k} missing from {v}");
        }
        assert_eq!(v["ttft_ms"]["p99"], 1.0);
    }
}
