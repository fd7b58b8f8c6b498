//! The decoder tier's errors and their one mapping to a gRPC status. The re-encode signal is
//! typed: [`ServiceError::EmbeddingUnavailable`] is FAILED_PRECONDITION with a
//! `DecoderErrorDetail { reason: EMBEDDING_UNAVAILABLE }` in the status details.

use dsvl_engine::scheduler::Failure;
use dsvl_proto::convert::embedding_unavailable;
use tonic::Status;

/// Why a `Generate` call failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The group has not finished starting.
    #[error("the decoder group is still starting")]
    Starting,
    /// The service is shutting down.
    #[error("the decoder is draining")]
    Draining,
    /// A rank or the engine thread died: the group cannot serve anymore (safe to retry
    /// elsewhere before the first token).
    #[error("the decoder group has failed")]
    GroupFailed,
    /// The request does not fit the model or the protocol.
    #[error("{0}")]
    InvalidArgument(String),
    /// An image embedding cannot be used: gone from the cache, corrupt, or another model's.
    /// The caller re-encodes the image and sends the embedding inline.
    #[error("{0}")]
    EmbeddingUnavailable(String),
    /// The waiting queue is full.
    #[error("too many requests waiting; retry later or elsewhere")]
    Overloaded,
    /// The caller's deadline passed first.
    #[error("the deadline passed before generation finished")]
    DeadlineExceeded,
    /// A bug or an unexpected tensor failure.
    #[error("{0}")]
    Internal(String),
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Starting | ServiceError::Draining | ServiceError::GroupFailed => {
                Status::unavailable(msg)
            }
            ServiceError::InvalidArgument(_) => Status::invalid_argument(msg),
            ServiceError::EmbeddingUnavailable(_) => embedding_unavailable(msg),
            ServiceError::Overloaded => Status::resource_exhausted(msg),
            ServiceError::DeadlineExceeded => Status::deadline_exceeded(msg),
            ServiceError::Internal(_) => Status::internal(msg),
        }
    }
}

impl From<Failure> for ServiceError {
    fn from(f: Failure) -> Self {
        match f {
            Failure::DeadlineExceeded => Self::DeadlineExceeded,
            Failure::Invalid(m) => Self::InvalidArgument(m),
            Failure::Unavailable(_) => Self::GroupFailed,
        }
    }
}

impl From<dsvl_telemetry::DeadlineError> for ServiceError {
    fn from(e: dsvl_telemetry::DeadlineError) -> Self {
        Self::InvalidArgument(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use dsvl_proto::convert::asks_to_reencode;

    #[test]
    fn one_mapping_per_variant() {
        use tonic::Code;
        let cases = [
            (ServiceError::Starting, Code::Unavailable),
            (ServiceError::Draining, Code::Unavailable),
            (ServiceError::GroupFailed, Code::Unavailable),
            (ServiceError::InvalidArgument("x".into()), Code::InvalidArgument),
            (ServiceError::EmbeddingUnavailable("gone".into()), Code::FailedPrecondition),
            (ServiceError::Overloaded, Code::ResourceExhausted),
            (ServiceError::DeadlineExceeded, Code::DeadlineExceeded),
            (ServiceError::Internal("bug".into()), Code::Internal),
        ];
        for (e, code) in cases {
            let reencode = matches!(e, ServiceError::EmbeddingUnavailable(_));
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg.as_str()));
            assert_eq!(asks_to_reencode(&s), reencode, "{s:?}");
        }
        // A bare FAILED_PRECONDITION (no typed detail) is not a re-encode request.
        assert!(!asks_to_reencode(&Status::failed_precondition("embedding gone")));
    }
}
