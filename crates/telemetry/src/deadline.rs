//! Deadlines from untrusted request metadata, parsed without ever panicking.
//!
//! Two sources: gRPC's `grpc-timeout` header (an integer of at most 8 digits and a unit, per the
//! gRPC-over-HTTP/2 spec) and the OpenAI clients' `X-Request-Timeout` / `X-Stainless-Timeout`
//! headers (seconds, possibly fractional). A value too large to mean anything (`99999999999H`,
//! `1e300`) is capped at [`MAX_DEADLINE`]; a value that is not a timeout at all (garbage,
//! negative, NaN, a missing unit) is a [`DeadlineError`] that every service answers with
//! INVALID_ARGUMENT / HTTP 400 naming the header. Neither path does arithmetic that can overflow:
//! durations are built with checked operations and capped before they are added to an
//! `Instant`.

use std::time::{Duration, Instant};

/// The longest deadline any request may carry; larger values are capped to it. A day is far
/// beyond any generation, and small enough that `Instant::now() + MAX_DEADLINE` never overflows.
pub const MAX_DEADLINE: Duration = Duration::from_secs(24 * 3600);

/// A deadline header that is not a timeout.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed `{header}` header {value:?}: {expected}")]
pub struct DeadlineError {
    /// The header.
    pub header: &'static str,
    /// Its value, shortened to 64 characters.
    pub value: String,
    /// What a valid value looks like.
    pub expected: &'static str,
}

impl DeadlineError {
    fn new(header: &'static str, value: &str, expected: &'static str) -> Self {
        Self { header, value: value.chars().take(64).collect(), expected }
    }
}

const GRPC_EXPECTED: &str = "expected digits followed by one of H, M, S, m, u, n";

/// Remaining time from the caller's `grpc-timeout` header (`500m`, `2S`), capped at
/// [`MAX_DEADLINE`]; `Ok(None)` when the header is absent.
///
/// # Errors
/// When the header is present but is not digits followed by a unit.
pub fn grpc_timeout(
    meta: &tonic::metadata::MetadataMap,
) -> Result<Option<Duration>, DeadlineError> {
    const H: &str = "grpc-timeout";
    let Some(raw) = meta.get(H) else { return Ok(None) };
    let v = raw.to_str().map_err(|_| DeadlineError::new(H, "<non-ASCII>", GRPC_EXPECTED))?;
    parse_grpc_timeout(v).map(Some).ok_or_else(|| DeadlineError::new(H, v, GRPC_EXPECTED))
}

fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let unit = v.chars().last()?;
    let digits = &v[..v.len() - unit.len_utf8()];
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let nanos_per_unit: u128 = match unit {
        'H' => 3_600_000_000_000,
        'M' => 60_000_000_000,
        'S' => 1_000_000_000,
        'm' => 1_000_000,
        'u' => 1_000,
        'n' => 1,
        _ => return None,
    };
    // The spec allows 8 digits; longer runs of digits are still "a very long time": cap them.
    let cap = MAX_DEADLINE.as_nanos();
    let n: u128 = if digits.len() > 30 { u128::MAX } else { digits.parse().ok()? };
    let nanos = n.saturating_mul(nanos_per_unit).min(cap);
    Some(Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX)))
}

/// When a server should answer a request that arrived at `started`: a little before the
/// caller's deadline (5%, 2-20 ms), because the network and the caller's own timer started
/// earlier; so the caller gets DEADLINE_EXCEEDED from us rather than a bare cancel.
///
/// # Errors
/// As [`grpc_timeout`].
pub fn answer_by(
    meta: &tonic::metadata::MetadataMap,
    started: Instant,
) -> Result<Option<Instant>, DeadlineError> {
    Ok(grpc_timeout(meta)?.map(|d| {
        started
            + d.saturating_sub((d / 20).clamp(Duration::from_millis(2), Duration::from_millis(20)))
    }))
}

/// A timeout in seconds from an HTTP header (`X-Request-Timeout: 2.5`), capped at
/// [`MAX_DEADLINE`].
///
/// # Errors
/// When the value is not a positive number of seconds (garbage, zero, negative, NaN).
pub fn http_timeout_secs(header: &'static str, value: &str) -> Result<Duration, DeadlineError> {
    const EXPECTED: &str = "expected a positive number of seconds";
    let secs: f64 =
        value.trim().parse().map_err(|_| DeadlineError::new(header, value, EXPECTED))?;
    if secs.is_nan() || secs <= 0.0 {
        return Err(DeadlineError::new(header, value, EXPECTED));
    }
    // `try_from_secs_f64` fails on overflow and infinity: both mean "longer than the cap".
    Ok(Duration::try_from_secs_f64(secs).unwrap_or(MAX_DEADLINE).min(MAX_DEADLINE))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(v: &str) -> tonic::metadata::MetadataMap {
        let mut m = tonic::metadata::MetadataMap::new();
        m.insert("grpc-timeout", v.parse().unwrap());
        m
    }

    #[test]
    fn parses_grpc_timeouts() {
        assert_eq!(grpc_timeout(&tonic::metadata::MetadataMap::new()), Ok(None));
        assert_eq!(grpc_timeout(&meta("250m")), Ok(Some(Duration::from_millis(250))));
        assert_eq!(grpc_timeout(&meta("3S")), Ok(Some(Duration::from_secs(3))));
        assert_eq!(grpc_timeout(&meta("2M")), Ok(Some(Duration::from_secs(120))));
        assert_eq!(grpc_timeout(&meta("7u")), Ok(Some(Duration::from_micros(7))));
        assert_eq!(grpc_timeout(&meta("0n")), Ok(Some(Duration::ZERO)));
        let now = Instant::now();
        assert_eq!(answer_by(&meta("1S"), now), Ok(Some(now + Duration::from_millis(980))));
    }

    #[test]
    fn huge_grpc_timeouts_are_capped() {
        for v in
            ["9223372036854775807S", "99999999999999999H", "99999999H", "25H", &"9".repeat(200)]
        {
            let v = format!("{v}{}", if v.ends_with(['S', 'H']) { "" } else { "S" });
            assert_eq!(grpc_timeout(&meta(&v)), Ok(Some(MAX_DEADLINE)), "{v}");
            assert!(answer_by(&meta(&v), Instant::now()).unwrap().is_some());
        }
    }

    #[test]
    fn malformed_grpc_timeouts_are_errors() {
        for v in ["3x", "S", "", "-1S", "1.5S", "garbage", "1 S", "+1S", "１S"] {
            let mut m = tonic::metadata::MetadataMap::new();
            if let Ok(val) = v.parse() {
                m.insert("grpc-timeout", val);
                let e = grpc_timeout(&m).unwrap_err();
                assert_eq!(e.header, "grpc-timeout", "{v}");
            }
        }
    }

    #[test]
    fn http_timeouts() {
        let h = "x-request-timeout";
        assert_eq!(http_timeout_secs(h, "2.5"), Ok(Duration::from_millis(2500)));
        assert_eq!(http_timeout_secs(h, " 3 "), Ok(Duration::from_secs(3)));
        for big in ["1e300", "1e20", "inf", "18446744073709551616"] {
            assert_eq!(http_timeout_secs(h, big), Ok(MAX_DEADLINE), "{big}");
        }
        for bad in ["garbage", "", "0", "-1", "NaN", "-inf", "1s"] {
            let e = http_timeout_secs(h, bad).unwrap_err();
            assert!(e.to_string().contains(h), "{e}");
        }
    }
}
