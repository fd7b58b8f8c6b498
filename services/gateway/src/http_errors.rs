//! One error shape for the whole OpenAI HTTP API: every error is `application/json`
//! `{"error": {"message", "type", "param", "code"}}`, including those the web framework
//! produces before a handler runs (body over the limit, a method the route does not take) and
//! those about the body's encoding (content type, JSON syntax). Messages speak of the request,
//! not of the parser.

use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;

use crate::error::GatewayError;

/// Rewrites an error response that is not JSON (the framework's plain-text 405 and 413) into
/// OpenAI's shape, with a message naming what in the request was wrong. `body_limit` is the
/// largest body the API takes, in bytes.
pub(crate) async fn openai_shape(
    State(body_limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let (method, path) = (request.method().clone(), request.uri().path().to_string());
    let response = next.run(request).await;
    let status = response.status();
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return response;
    }
    let (message, code) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => return too_large(body_limit),
        StatusCode::METHOD_NOT_ALLOWED => {
            let allow = response
                .headers()
                .get(header::ALLOW)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
                .unwrap_or_else(|| allowed_method(&path).to_string());
            (format!("{method} is not allowed on {path}; it takes {allow}"), "method_not_allowed")
        }
        _ => (
            format!(
                "the request to {path} was refused ({})",
                status.canonical_reason().unwrap_or("")
            ),
            "invalid_request",
        ),
    };
    let kind = if status.is_server_error() { "server_error" } else { "invalid_request_error" };
    let body = json!({"error": {"message": message, "type": kind, "param": null, "code": code}});
    let mut out = (status, Json(body)).into_response();
    if let Some(allow) = response.headers().get(header::ALLOW) {
        out.headers_mut().insert(header::ALLOW, allow.clone());
    }
    drop(response.into_body());
    out
}

/// OpenAI's 413 for a body over `body_limit` bytes.
fn too_large(body_limit: usize) -> Response {
    let message = format!(
        "the request body is larger than this gateway accepts ({body_limit} bytes, images \
         counted base64-encoded)"
    );
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": "request_too_large"}});
    (StatusCode::PAYLOAD_TOO_LARGE, Json(body)).into_response()
}

/// 408 for a request whose body stopped arriving for `idle` (`--http-body-idle-secs`).
pub(crate) fn body_stalled(idle: std::time::Duration) -> Response {
    let message = format!(
        "the request body stopped arriving: nothing for {:.0} s (this gateway waits at most that \
         long between parts of a body)",
        idle.as_secs_f64()
    );
    let body = json!({"error": {"message": message, "type": "invalid_request_error",
                                "param": null, "code": "request_timeout"}});
    let mut response = (StatusCode::REQUEST_TIMEOUT, Json(body)).into_response();
    response.headers_mut().insert(header::CONNECTION, header::HeaderValue::from_static("close"));
    response
}

/// Refuses a request whose declared `Content-Length` is over `body_limit` before a byte of its
/// body is read (a body without a declared length is cut at the limit as it arrives).
pub(crate) async fn refuse_declared_oversize(
    State(body_limit): State<usize>,
    request: Request,
    next: Next,
) -> Response {
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    if declared.is_some_and(|n| n > body_limit as u64) {
        return too_large(body_limit);
    }
    next.run(request).await
}

/// The method the API's routes take (axum's 405 carries no `Allow` behind a route layer).
fn allowed_method(path: &str) -> &'static str {
    if path.starts_with("/v1/models") || path == "/health" {
        "GET"
    } else {
        "POST"
    }
}

/// The body must be declared JSON (`application/json`, any parameters): anything else is a
/// 415 naming the type sent.
pub(crate) fn require_json(headers: &HeaderMap) -> Result<(), GatewayError> {
    let sent = headers.get(header::CONTENT_TYPE).map(|v| v.to_str().unwrap_or("(not text)"));
    let essence = sent.map(|v| v.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match essence.as_deref() {
        Some("application/json") => Ok(()),
        Some(_) => Err(GatewayError::UnsupportedMediaType(format!(
            "the request body must be JSON with `Content-Type: application/json`, not `{}`",
            sent.unwrap_or_default()
        ))),
        None => Err(GatewayError::UnsupportedMediaType(
            "the request has no Content-Type; send the JSON body with \
             `Content-Type: application/json`"
                .into(),
        )),
    }
}

/// A body that is not JSON at all, described by where it stops being JSON.
pub(crate) fn not_json(e: &serde_json::Error) -> GatewayError {
    let what = match e.classify() {
        serde_json::error::Category::Eof => "the request body ends before its JSON does",
        serde_json::error::Category::Io => "the request body could not be read",
        _ => "the request body is not valid JSON",
    };
    GatewayError::InvalidArgument(format!("{what} (line {}, column {})", e.line(), e.column()))
}
