//! Hostile request metadata that every service must survive: deadline headers of absurd size or
//! no meaning at all. Each service's tests send every entry and then a normal request on the
//! same connection.

/// `grpc-timeout` values and whether the service must accept them (capped) rather than refuse
/// them with INVALID_ARGUMENT.
pub const HOSTILE_GRPC_TIMEOUTS: &[(&str, bool)] = &[
    ("9223372036854775807S", true),
    ("99999999999999999H", true),
    ("99999999H", true),
    ("garbage", false),
    ("12", false),
    ("-5S", false),
    ("1.5S", false),
];

/// OpenAI clients' timeout headers (seconds) and whether the gateway must accept them.
pub const HOSTILE_HTTP_TIMEOUTS: &[(&str, &str, bool)] = &[
    ("X-Request-Timeout", "1e300", true),
    ("x-stainless-timeout", "1e20", true),
    ("X-Request-Timeout", "inf", true),
    ("X-Request-Timeout", "garbage", false),
    ("x-stainless-timeout", "-1", false),
    ("X-Request-Timeout", "NaN", false),
];
