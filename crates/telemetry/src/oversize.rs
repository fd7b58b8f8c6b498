//! RESOURCE_EXHAUSTED for a request message over the size limit, as the gRPC status code
//! guide says ("some resource has been exhausted ... the entire file system is out of space"
//! is its example, and gRPC's own implementations use it for messages over the limit).
//!
//! tonic's decoder answers such a message with OUT_OF_RANGE ("decoded message length too
//! large"). A request message is decoded before the handler runs, so the status travels in
//! the response's headers (a trailers-only response); [`OversizeLayer`] rewrites that one
//! status there and leaves every other response untouched.

use std::task::{Context, Poll};

use futures::future::{MapOk, TryFutureExt};
use http::HeaderValue;

/// The tower layer every dsvl gRPC server is built with.
#[derive(Debug, Clone, Copy, Default)]
pub struct OversizeLayer;

impl<S> tower::Layer<S> for OversizeLayer {
    type Service = Oversize<S>;

    fn layer(&self, inner: S) -> Oversize<S> {
        Oversize(inner)
    }
}

/// The service of [`OversizeLayer`].
#[derive(Debug, Clone)]
pub struct Oversize<S>(S);

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for Oversize<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = MapOk<S::Future, fn(http::Response<ResBody>) -> http::Response<ResBody>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<ReqBody>) -> Self::Future {
        self.0.call(request).map_ok(oversize_is_resource_exhausted::<ResBody>)
    }
}

/// The OUT_OF_RANGE status code.
const OUT_OF_RANGE: &str = "11";
/// The RESOURCE_EXHAUSTED status code.
const RESOURCE_EXHAUSTED: &str = "8";

/// Rewrites tonic's "message too large" OUT_OF_RANGE to RESOURCE_EXHAUSTED.
pub fn oversize_is_resource_exhausted<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let oversized = headers.get("grpc-status").is_some_and(|s| s == OUT_OF_RANGE)
        && headers.get("grpc-message").and_then(|m| m.to_str().ok()).is_some_and(|m| {
            // grpc-message is percent-encoded.
            m.replace("%20", " ").contains("message length too large")
        });
    if oversized {
        headers.insert("grpc-status", HeaderValue::from_static(RESOURCE_EXHAUSTED));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn response(status: &str, message: &str) -> http::Response<()> {
        let mut r = http::Response::new(());
        r.headers_mut().insert("grpc-status", HeaderValue::from_str(status).unwrap());
        r.headers_mut().insert("grpc-message", HeaderValue::from_str(message).unwrap());
        r
    }

    #[test]
    fn only_the_oversized_message_status_changes() {
        let status = tonic::Status::out_of_range(
            "Error, decoded message length too large: found 6291470 bytes, the limit is: 4194304 bytes",
        );
        // The status as tonic puts it on the wire.
        let wire = status.into_http::<()>();
        let out = oversize_is_resource_exhausted(wire);
        assert_eq!(out.headers()["grpc-status"], RESOURCE_EXHAUSTED);
        let other = oversize_is_resource_exhausted(response(OUT_OF_RANGE, "top_p out of range"));
        assert_eq!(other.headers()["grpc-status"], OUT_OF_RANGE);
        let ok = oversize_is_resource_exhausted(http::Response::new(()));
        assert!(ok.headers().get("grpc-status").is_none());
    }
}
