//! The gateway's one error type and its two mappings: to `tonic::Status` (gRPC) and to
//! OpenAI's error JSON with the matching HTTP status.

use std::time::Duration;

use tonic::{Code, Status};

/// Why a chat request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum GatewayError {
    /// Malformed request, limits exceeded, images for a text-only model, a bad image.
    #[error("{0}")]
    InvalidArgument(String),
    /// One request field is wrong (OpenAI's `param` names it).
    #[error("{message}")]
    InvalidField {
        /// The field's path in the request, as OpenAI's `param` (`seed`, `messages[0].content`).
        param: String,
        /// What is wrong, in the request's terms.
        message: String,
    },
    /// The body is not declared as JSON (HTTP 415).
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// No API key, or an unknown one, while keys are configured.
    #[error("missing or unknown API key (send `Authorization: Bearer <key>`)")]
    Unauthenticated,
    /// Tenant quota or upstream overload; retry after the hint.
    #[error("{message}")]
    Exhausted {
        /// What ran out.
        message: String,
        /// When to retry.
        retry_after: Duration,
    },
    /// No healthy upstream could take the request.
    #[error("{0}")]
    Unavailable(String),
    /// The request's deadline passed.
    #[error("{0}")]
    DeadlineExceeded(String),
    /// The client went away.
    #[error("cancelled by the client")]
    Cancelled,
    /// A bug or an upstream answer that makes no sense.
    #[error("{0}")]
    Internal(String),
}

impl GatewayError {
    /// Maps an upstream status: the tier's message is kept, the code carried over where the
    /// caller can act on it.
    pub fn from_upstream(tier: &str, s: &Status) -> Self {
        let msg = format!("{tier}: {}", s.message());
        match s.code() {
            Code::InvalidArgument | Code::OutOfRange => Self::InvalidArgument(msg),
            // A message over the tier's size limit (too many or too large images inline): the
            // request's doing, not a busy tier; retrying would not help.
            Code::ResourceExhausted if s.message().contains("message length too large") => {
                Self::InvalidArgument(msg)
            }
            Code::ResourceExhausted => {
                Self::Exhausted { message: msg, retry_after: Duration::from_secs(1) }
            }
            Code::DeadlineExceeded => Self::DeadlineExceeded(msg),
            Code::Cancelled => Self::Cancelled,
            Code::Unavailable | Code::Unknown | Code::Aborted => Self::Unavailable(msg),
            _ => Self::Internal(msg),
        }
    }

    /// Label for the `outcome` of request metrics.
    pub fn outcome(&self) -> &'static str {
        match self {
            Self::InvalidArgument(_)
            | Self::InvalidField { .. }
            | Self::UnsupportedMediaType(_) => "invalid_argument",
            Self::Unauthenticated => "unauthenticated",
            Self::Exhausted { .. } => "resource_exhausted",
            Self::Unavailable(_) => "unavailable",
            Self::DeadlineExceeded(_) => "deadline_exceeded",
            Self::Cancelled => "cancelled",
            Self::Internal(_) => "internal",
        }
    }

    /// The gRPC status (with `retry-after` metadata, seconds, for RESOURCE_EXHAUSTED).
    pub fn to_status(&self) -> Status {
        let msg = self.to_string();
        match self {
            Self::InvalidArgument(_)
            | Self::InvalidField { .. }
            | Self::UnsupportedMediaType(_) => Status::invalid_argument(msg),
            Self::Unauthenticated => Status::unauthenticated(msg),
            Self::Exhausted { retry_after, .. } => {
                let mut s = Status::resource_exhausted(msg);
                if let Ok(v) = retry_after_secs(*retry_after).to_string().parse() {
                    s.metadata_mut().insert("retry-after", v);
                }
                s
            }
            Self::Unavailable(_) => Status::unavailable(msg),
            Self::DeadlineExceeded(_) => Status::deadline_exceeded(msg),
            Self::Cancelled => Status::cancelled(msg),
            Self::Internal(_) => Status::internal(msg),
        }
    }

    /// HTTP status, OpenAI error `type` and `code`.
    pub fn http_parts(&self) -> (u16, &'static str, Option<&'static str>) {
        match self {
            Self::InvalidArgument(_) | Self::InvalidField { .. } => {
                (400, "invalid_request_error", None)
            }
            Self::UnsupportedMediaType(_) => {
                (415, "invalid_request_error", Some("unsupported_media_type"))
            }
            Self::Unauthenticated => (401, "invalid_request_error", Some("invalid_api_key")),
            Self::Exhausted { .. } => (429, "rate_limit_error", Some("rate_limit_exceeded")),
            Self::Unavailable(_) => (503, "service_unavailable", None),
            Self::DeadlineExceeded(_) => (504, "timeout", Some("deadline_exceeded")),
            Self::Cancelled => (499, "cancelled", None),
            Self::Internal(_) => (500, "server_error", None),
        }
    }

    /// OpenAI's error body: `{"error": {"message", "type", "param", "code"}}`.
    pub fn openai_body(&self) -> serde_json::Value {
        let (_, kind, code) = self.http_parts();
        let param = match self {
            Self::InvalidField { param, .. } => Some(param.as_str()),
            _ => None,
        };
        serde_json::json!({"error": {"message": self.to_string(), "type": kind, "param": param, "code": code}})
    }
}

/// Whole seconds to wait, at least 1.
pub fn retry_after_secs(d: Duration) -> u64 {
    d.as_secs_f64().ceil().max(1.0) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_line_up_across_protocols() {
        let cases = [
            (GatewayError::InvalidArgument("x".into()), Code::InvalidArgument, 400),
            (GatewayError::Unauthenticated, Code::Unauthenticated, 401),
            (
                GatewayError::Exhausted {
                    message: "q".into(),
                    retry_after: Duration::from_millis(1500),
                },
                Code::ResourceExhausted,
                429,
            ),
            (GatewayError::Unavailable("u".into()), Code::Unavailable, 503),
            (GatewayError::DeadlineExceeded("d".into()), Code::DeadlineExceeded, 504),
        ];
        for (e, code, http) in cases {
            assert_eq!(e.to_status().code(), code);
            assert_eq!(e.http_parts().0, http);
            assert_eq!(e.openai_body()["error"]["message"], e.to_string());
        }
        let s = GatewayError::Exhausted {
            message: "q".into(),
            retry_after: Duration::from_millis(1500),
        }
        .to_status();
        assert_eq!(s.metadata().get("retry-after").unwrap(), "2");
        assert!(matches!(
            GatewayError::from_upstream("decoder", &Status::unavailable("x")),
            GatewayError::Unavailable(_)
        ));
    }
}
