//! The vision tier's request errors and their one mapping to a gRPC status; per-image failures
//! and their typed codes ([`image_error`]).

use dsvl_proto::internal::encode_result::Result as ResultKind;
use dsvl_proto::internal::{EncodeResult, ImageError, ImageErrorCode};
use tonic::Status;

use crate::encode::Failure;

/// Why an `Encode` or `Info` call failed as a whole (a bad image fails alone instead: see
/// [`image_error`]).
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// The server is shutting down.
    #[error("the server is draining")]
    Draining,
    /// The model is not loaded yet.
    #[error("the model is still loading")]
    Loading,
    /// A malformed deadline header.
    #[error(transparent)]
    Deadline(#[from] dsvl_telemetry::DeadlineError),
    /// The request has no images.
    #[error("no images")]
    NoImages,
    /// More images than one request may carry.
    #[error("{count} images; at most {max} per request")]
    TooManyImages {
        /// Images in the request.
        count: usize,
        /// The limit (`--max-images`).
        max: usize,
    },
    /// The batch queue is full.
    #[error("the encode queue is full; retry with backoff")]
    QueueFull,
    /// The caller's deadline passed first.
    #[error("the deadline passed before the images were encoded")]
    DeadlineExceeded,
    /// The model failed.
    #[error("{0}")]
    Internal(String),
    /// The model thread died; liveness is NOT_SERVING until the process is restarted.
    #[error("this replica's model thread stopped; retry on another replica")]
    ModelDown,
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        let msg = e.to_string();
        match e {
            ServiceError::Draining | ServiceError::Loading | ServiceError::ModelDown => {
                Status::unavailable(msg)
            }
            ServiceError::Deadline(_)
            | ServiceError::NoImages
            | ServiceError::TooManyImages { .. } => Status::invalid_argument(msg),
            ServiceError::QueueFull => Status::resource_exhausted(msg),
            ServiceError::DeadlineExceeded => Status::deadline_exceeded(msg),
            ServiceError::Internal(_) => Status::internal(msg),
        }
    }
}

/// What one image's failure means for the request: a bad image fails alone (its result carries
/// the error), every other failure fails the request.
pub fn request_failure(f: Failure) -> Result<EncodeResult, ServiceError> {
    match f {
        Failure::Image(m) => Ok(image_error(ImageErrorCode::InvalidImage, m)),
        Failure::QueueFull => Err(ServiceError::QueueFull),
        Failure::Deadline => Err(ServiceError::DeadlineExceeded),
        Failure::Internal(m) => Err(ServiceError::Internal(m)),
        Failure::ModelDown => Err(ServiceError::ModelDown),
    }
}

/// The result of an image that failed alone.
pub fn image_error(code: ImageErrorCode, message: String) -> EncodeResult {
    EncodeResult {
        result: Some(ResultKind::Error(ImageError { code: code as i32, message })),
        cache_hit: false,
        key: String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_mapping_per_variant() {
        let cases = [
            (ServiceError::Draining, tonic::Code::Unavailable),
            (ServiceError::Loading, tonic::Code::Unavailable),
            (ServiceError::NoImages, tonic::Code::InvalidArgument),
            (ServiceError::TooManyImages { count: 9, max: 8 }, tonic::Code::InvalidArgument),
            (ServiceError::QueueFull, tonic::Code::ResourceExhausted),
            (ServiceError::DeadlineExceeded, tonic::Code::DeadlineExceeded),
            (ServiceError::Internal("x".into()), tonic::Code::Internal),
        ];
        for (e, code) in cases {
            let msg = e.to_string();
            let s = Status::from(e);
            assert_eq!((s.code(), s.message()), (code, msg.as_str()));
        }
    }

    #[test]
    fn a_bad_image_fails_alone() {
        let r = request_failure(Failure::Image("undecodable".into())).unwrap();
        match r.result {
            Some(ResultKind::Error(e)) => assert_eq!(e.code(), ImageErrorCode::InvalidImage),
            other => panic!("{other:?}"),
        }
        assert!(matches!(request_failure(Failure::QueueFull), Err(ServiceError::QueueFull)));
    }
}
