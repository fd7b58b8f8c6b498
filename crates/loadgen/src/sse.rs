//! Server-sent events split into `data:` payloads as bytes arrive, and the error classes the
//! report counts: `http_<status>` for HTTP (an error event mid-stream gets the status the same
//! error would have had before the first byte), the gRPC code's name for gRPC.

/// Splits a byte stream into the payloads of its `data:` lines.
#[derive(Default)]
pub(crate) struct Lines {
    buf: Vec<u8>,
}

impl Lines {
    /// Adds `bytes`; returns the payloads of the lines they complete.
    pub(crate) fn push(&mut self, bytes: &[u8]) -> Vec<String> {
        self.buf.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.buf[start..].iter().position(|b| *b == b'\n') {
            let line = &self.buf[start..start + nl];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if let Some(data) = line.strip_prefix(b"data:") {
                let data = data.strip_prefix(b" ").unwrap_or(data);
                out.push(String::from_utf8_lossy(data).into_owned());
            }
            start += nl + 1;
        }
        self.buf.drain(..start);
        out
    }
}

/// The class of an OpenAI error event, by its `type`.
pub(crate) fn error_class(kind: &str) -> String {
    let status = match kind {
        "rate_limit_error" => 429,
        "service_unavailable" => 503,
        "timeout" => 504,
        "invalid_request_error" => 400,
        "cancelled" => 499,
        _ => 500,
    };
    format!("http_{status}")
}

/// The class of a gRPC status: its code as the gRPC spec spells it (`UNAVAILABLE`).
pub(crate) fn grpc_class(s: &tonic::Status) -> String {
    let camel = format!("{:?}", s.code());
    let mut out = String::new();
    for (i, c) in camel.chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            out.push('_');
        }
        out.push(c.to_ascii_uppercase());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_come_out_whatever_the_chunking() {
        let stream =
            b"data: {\"a\":1}\n\ndata:{\"b\":2}\r\n\r\n: comment\nevent: x\ndata: [DONE]\n\n";
        for split in 1..stream.len() {
            let mut l = Lines::default();
            let mut got = l.push(&stream[..split]);
            got.extend(l.push(&stream[split..]));
            assert_eq!(got, ["{\"a\":1}", "{\"b\":2}", "[DONE]"], "split at {split}");
        }
    }

    #[test]
    fn classes_are_named_as_users_see_them() {
        assert_eq!(error_class("service_unavailable"), "http_503");
        assert_eq!(error_class("timeout"), "http_504");
        assert_eq!(error_class("whatever"), "http_500");
        assert_eq!(grpc_class(&tonic::Status::unavailable("x")), "UNAVAILABLE");
        assert_eq!(grpc_class(&tonic::Status::deadline_exceeded("x")), "DEADLINE_EXCEEDED");
        assert_eq!(grpc_class(&tonic::Status::resource_exhausted("x")), "RESOURCE_EXHAUSTED");
    }
}
