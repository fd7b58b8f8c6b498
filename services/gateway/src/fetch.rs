//! `image_url` values of the OpenAI API: base64 `data:` URLs always; remote `http://` URLs
//! only for allow-listed hosts (fetching arbitrary URLs would let any caller make the cluster
//! reach into its own network). `https://` fetching needs a TLS stack this build leaves out;
//! such URLs get a clear error telling the caller to send a `data:` URL.

use std::time::{Duration, Instant};

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};

use crate::error::GatewayError;

fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// Whether `host` matches an allow-list entry (`example.com` or `*.example.com`).
pub fn host_allowed(host: &str, allow: &[String]) -> bool {
    let host = host.to_ascii_lowercase();
    allow.iter().any(|a| {
        let a = a.to_ascii_lowercase();
        match a.strip_prefix("*.") {
            Some(suffix) => host.ends_with(&format!(".{suffix}")),
            None => host == a,
        }
    })
}

/// Decodes a `data:[<mediatype>];base64,<data>` URL.
///
/// # Errors
/// Not base64, malformed, or over `max_bytes`.
pub fn decode_data_url(url: &str, max_bytes: usize) -> Result<Bytes, GatewayError> {
    let rest = url.strip_prefix("data:").ok_or_else(|| invalid("not a data: URL"))?;
    let (meta, data) =
        rest.split_once(',').ok_or_else(|| invalid("malformed data: URL (no comma)"))?;
    if !meta.split(';').any(|p| p.eq_ignore_ascii_case("base64")) {
        return Err(invalid("data: URLs must be base64-encoded (data:image/png;base64,...)"));
    }
    if data.len() / 4 * 3 > max_bytes + 3 {
        return Err(invalid(format!(
            "image is about {} bytes; the limit is {max_bytes}",
            data.len() / 4 * 3
        )));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(data.trim())
        .map_err(|e| invalid(format!("image data URL is not valid base64: {e}")))?;
    if bytes.len() > max_bytes {
        return Err(invalid(format!("image is {} bytes; the limit is {max_bytes}", bytes.len())));
    }
    Ok(Bytes::from(bytes))
}

/// Resolves an `image_url` to image bytes.
///
/// # Errors
/// INVALID_ARGUMENT for refused or unusable URLs; DEADLINE_EXCEEDED when the fetch outlives
/// the request.
pub async fn load_image_url(
    url: &str,
    allow: &[String],
    max_bytes: usize,
    deadline: Instant,
) -> Result<Bytes, GatewayError> {
    if url.starts_with("data:") {
        return decode_data_url(url, max_bytes);
    }
    let uri: http::Uri =
        url.parse().map_err(|_| invalid("image_url is neither a data: URL nor a valid URL"))?;
    let host = uri.host().unwrap_or_default();
    match uri.scheme_str() {
        Some("http" | "https") if allow.is_empty() || !host_allowed(host, allow) => Err(invalid(format!(
            "remote image URLs are not fetched (host `{host}` is not allow-listed); send the image as a base64 data: URL"
        ))),
        Some("https") => Err(invalid("fetching https image URLs is not supported by this build; send a base64 data: URL")),
        Some("http") => fetch_http(uri, max_bytes, deadline).await,
        _ => Err(invalid("image_url must be a data: URL (or an allow-listed http URL)")),
    }
}

async fn fetch_http(
    uri: http::Uri,
    max_bytes: usize,
    deadline: Instant,
) -> Result<Bytes, GatewayError> {
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http::<Empty<Bytes>>();
    let budget = deadline.saturating_duration_since(Instant::now()).min(Duration::from_secs(30));
    let fetch = async {
        let resp = client
            .get(uri.clone())
            .await
            .map_err(|e| invalid(format!("cannot fetch {uri}: {e}")))?;
        if !resp.status().is_success() {
            return Err(invalid(format!(
                "fetching {uri} gave HTTP {} (redirects are not followed)",
                resp.status()
            )));
        }
        let body = Limited::new(resp.into_body(), max_bytes)
            .collect()
            .await
            .map_err(|e| invalid(format!("cannot read {uri}: {e} (limit {max_bytes} bytes)")))?;
        Ok(body.to_bytes())
    };
    tokio::time::timeout(budget, fetch)
        .await
        .map_err(|_| GatewayError::DeadlineExceeded(format!("fetching {uri} timed out")))?
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_urls_decode_within_limits() {
        assert_eq!(&decode_data_url("data:image/png;base64,aGVsbG8=", 100).unwrap()[..], b"hello");
        assert!(decode_data_url("data:image/png,hello", 100).is_err());
        assert!(decode_data_url("data:image/png;base64,!!!", 100).is_err());
        assert!(decode_data_url("data:image/png;base64,aGVsbG8=", 3).is_err());
    }

    #[test]
    fn allow_list_matches_exact_hosts_and_suffixes() {
        let allow = vec!["images.example.com".to_string(), "*.cdn.example".to_string()];
        assert!(host_allowed("images.example.com", &allow));
        assert!(host_allowed("a.cdn.example", &allow));
        assert!(!host_allowed("cdn.example", &allow));
        assert!(!host_allowed("evil.com", &allow));
    }

    #[tokio::test]
    async fn remote_urls_are_refused_unless_allowed() {
        let later = Instant::now() + Duration::from_secs(5);
        let e = load_image_url("https://example.com/a.png", &[], 100, later).await.unwrap_err();
        assert!(e.to_string().contains("data: URL"), "{e}");
        let e = load_image_url("ftp://example.com/a.png", &["example.com".into()], 100, later)
            .await
            .unwrap_err();
        assert!(matches!(e, GatewayError::InvalidArgument(_)));
    }

    #[tokio::test]
    async fn allow_listed_http_urls_are_fetched_with_a_size_cap() {
        let app = axum::Router::new()
            .route("/img", axum::routing::get(|| async { vec![7u8; 1000] }))
            .route(
                "/missing",
                axum::routing::get(|| async { (axum::http::StatusCode::NOT_FOUND, "no") }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        let later = Instant::now() + Duration::from_secs(5);
        let allow = vec!["127.0.0.1".to_string()];
        let got = load_image_url(&format!("http://{addr}/img"), &allow, 4096, later).await.unwrap();
        assert_eq!(got.len(), 1000);
        assert!(load_image_url(&format!("http://{addr}/img"), &allow, 100, later).await.is_err());
        assert!(load_image_url(&format!("http://{addr}/missing"), &allow, 4096, later)
            .await
            .is_err());
        assert!(load_image_url(&format!("http://{addr}/img"), &["other".into()], 4096, later)
            .await
            .is_err());
    }
}
