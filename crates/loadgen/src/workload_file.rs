//! One line of a JSONL workload file: an OpenAI chat request (see `workload`'s docs).

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Map, Value};

use crate::workload::{Image, Message, Part, WorkItem};

/// Fields the load generator reads; the rest go to the server as they are.
const OWN: [&str; 5] = ["messages", "max_tokens", "timeout_s", "kind", "stream"];

pub(crate) fn parse_line(line: &str, base: &Path) -> Result<WorkItem, String> {
    let v: Value = serde_json::from_str(line).map_err(|e| format!("not JSON: {e}"))?;
    let obj = v.as_object().ok_or("a request is a JSON object")?;
    let messages = obj
        .get("messages")
        .and_then(Value::as_array)
        .ok_or("`messages` (an array) is required")?
        .iter()
        .enumerate()
        .map(|(i, m)| message(m, base).map_err(|e| format!("messages[{i}]: {e}")))
        .collect::<Result<Vec<_>, _>>()?;
    let max_tokens = match obj.get("max_tokens") {
        None => 64,
        Some(v) => v
            .as_u64()
            .filter(|n| (1..=u32::MAX as u64).contains(n))
            .ok_or("`max_tokens` is a positive integer")? as u32,
    };
    let timeout = match obj.get("timeout_s") {
        None => None,
        Some(v) => Some(
            v.as_f64()
                .filter(|s| s.is_finite() && *s > 0.0 && *s < 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or("`timeout_s` is a positive number of seconds under a day")?,
        ),
    };
    let kind: Arc<str> = obj.get("kind").and_then(Value::as_str).unwrap_or("file").into();
    let extra: Map<String, Value> = obj
        .iter()
        .filter(|(k, _)| !OWN.contains(&k.as_str()))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    Ok(WorkItem { kind, messages, max_tokens, timeout, extra })
}

fn message(m: &Value, base: &Path) -> Result<Message, String> {
    let role = m.get("role").and_then(Value::as_str).ok_or("`role` is required")?.to_string();
    let parts = match m.get("content") {
        Some(Value::String(s)) => vec![Part::Text(s.clone())],
        Some(Value::Array(parts)) => parts
            .iter()
            .enumerate()
            .map(|(i, p)| part(p, base).map_err(|e| format!("content[{i}]: {e}")))
            .collect::<Result<Vec<_>, _>>()?,
        _ => return Err("`content` is a string or an array of parts".into()),
    };
    Ok(Message { role, parts })
}

fn part(p: &Value, base: &Path) -> Result<Part, String> {
    match p.get("type").and_then(Value::as_str) {
        Some("text") => Ok(Part::Text(
            p.get("text").and_then(Value::as_str).ok_or("`text` is required")?.into(),
        )),
        Some("image_url") => {
            let url = p
                .pointer("/image_url/url")
                .or_else(|| p.get("image_url"))
                .and_then(Value::as_str)
                .ok_or("`image_url.url` is required")?;
            image(url, base)
        }
        other => Err(format!("unknown part type {other:?} (text, image_url)")),
    }
}

fn image(url: &str, base: &Path) -> Result<Part, String> {
    if url.starts_with("http://") || url.starts_with("https://") {
        return Ok(Part::ImageUrl(url.into()));
    }
    if let Some(rest) = url.strip_prefix("data:") {
        let (_, b64) = rest.split_once(";base64,").ok_or("a data URL must be base64")?;
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(b64.trim())
            .map_err(|e| format!("bad base64 in a data URL: {e}"))?;
        return Ok(Part::Image(Arc::new(Image::new(bytes))));
    }
    let path = base.join(url.strip_prefix("file://").unwrap_or(url));
    let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(Part::Image(Arc::new(Image::new(bytes))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_keeps_its_messages_limits_and_other_fields() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("a.png"), b"\x89PNG\r\n\x1a\n").unwrap();
        let line = r#"{"kind":"doc","max_tokens":5,"timeout_s":2.5,"temperature":0.7,
            "messages":[{"role":"system","content":"be brief"},
              {"role":"user","content":[{"type":"image_url","image_url":{"url":"a.png"}},
                {"type":"image_url","image_url":{"url":"https://x/y.jpg"}},
                {"type":"text","text":"hi"}]}]}"#
            .replace('\n', " ");
        let item = parse_line(&line, dir.path()).unwrap();
        assert_eq!(&*item.kind, "doc");
        assert_eq!(item.max_tokens, 5);
        assert_eq!(item.timeout, Some(Duration::from_millis(2500)));
        assert_eq!(item.extra.get("temperature"), Some(&serde_json::json!(0.7)));
        assert!(!item.extra.contains_key("messages"));
        let parts = &item.messages[1].parts;
        assert!(matches!(&parts[0], Part::Image(i) if i.bytes.starts_with(b"\x89PNG")));
        assert!(matches!(&parts[1], Part::ImageUrl(u) if u == "https://x/y.jpg"));
        assert!(matches!(&parts[2], Part::Text(t) if t == "hi"));
    }

    #[test]
    fn bad_lines_say_what_is_wrong() {
        let base = Path::new(".");
        for (line, want) in [
            ("[1]", "JSON object"),
            ("{}", "`messages`"),
            (r#"{"messages":[{"role":"user","content":5}]}"#, "messages[0]: `content`"),
            (r#"{"messages":[{"role":"user","content":[{"type":"audio"}]}]}"#, "unknown part"),
            (r#"{"messages":[],"max_tokens":0}"#, "positive integer"),
            (r#"{"messages":[],"timeout_s":-1}"#, "timeout_s"),
            (
                r#"{"messages":[{"role":"user","content":[{"type":"image_url","image_url":{"url":"nope.png"}}]}]}"#,
                "nope.png",
            ),
        ] {
            let e = parse_line(line, base).unwrap_err();
            assert!(e.contains(want), "{line}: {e}");
        }
    }
}
