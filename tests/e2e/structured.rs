//! Structured outputs through the gateway, real binaries: OpenAI's `response_format`
//! (`json_schema`, `json_object`), vLLM's `structured_outputs` (`choice`, `json`) and its
//! earlier `guided_regex` / `guided_choice` over HTTP, `output_format` over gRPC; the replies parse and match on the bundled random-weight model and finish with `stop`;
//! an invalid schema, and any field the gateway does not honour, is a 400 naming the problem.

use std::time::Duration;

use anyhow::{Context, Result};
use dsvl_e2e::{http_post, Cluster, Options};
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::output_format::Kind;
use dsvl_proto::v1::{ChatMessage, ChatRequest, Choices, ContentPart, OutputFormat};
use serde_json::{json, Value};

fn ask(cluster: &Cluster, extra: Value) -> Result<(u16, Value)> {
    let mut body = json!({"messages": [{"role": "user", "content": "Describe a pet."}],
                          "temperature": 1, "seed": 7, "max_tokens": 300});
    for (k, v) in extra.as_object().context("object")? {
        body[k] = v.clone();
    }
    let r = http_post(&cluster.http, "/v1/chat/completions", &[], &body)?;
    Ok((r.status, r.json()?))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn structured_outputs_over_http_and_grpc() -> Result<()> {
    let cluster =
        Cluster::start(Options { vision_replicas: 0, tp: 1, redis: false, ..Options::default() })
            .await?;
    let schema = json!({"type": "object", "properties": {
        "kind": {"enum": ["cat", "dog"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "name": {"type": "string", "maxLength": 6}},
        "required": ["kind", "age", "name"], "additionalProperties": false});
    let (status, v) = ask(
        &cluster,
        json!({"response_format": {"type": "json_schema",
               "json_schema": {"name": "pet", "schema": schema, "strict": true}}}),
    )?;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().context("content")?;
    let pet: Value = serde_json::from_str(content).with_context(|| content.to_string())?;
    assert!(["cat", "dog"].contains(&pet["kind"].as_str().unwrap_or("")), "{pet}");
    assert!((0..=30).contains(&pet["age"].as_i64().context("age")?), "{pet}");
    assert!(pet["name"].as_str().context("name")?.chars().count() <= 6, "{pet}");
    assert_eq!(pet.as_object().unwrap().len(), 3, "{pet}");

    // Any object: unbounded (a random model writes long keys), so the reply is an object or,
    // cut by max_tokens, the beginning of one.
    let (status, v) = ask(&cluster, json!({"response_format": {"type": "json_object"}}))?;
    assert_eq!(status, 200, "{v}");
    let content = v["choices"][0]["message"]["content"].as_str().context("content")?;
    assert!(content.starts_with('{'), "{content}");
    if v["choices"][0]["finish_reason"] == "stop" {
        let any: Value = serde_json::from_str(content).with_context(|| content.to_string())?;
        assert!(any.is_object(), "{any}");
    }

    let (status, v) = ask(&cluster, json!({"guided_regex": "[A-Z]{2}-[0-9]{3}"}))?;
    assert_eq!(status, 200, "{v}");
    let code = v["choices"][0]["message"]["content"].as_str().context("content")?;
    let b = code.as_bytes();
    assert!(b.len() == 6 && b[2] == b'-' && b[..2].iter().all(u8::is_ascii_uppercase), "{code}");

    // vLLM's choices, in its current and its earlier field: exactly one of the strings.
    let options = ["cat (small)", "dog.", "a+b"];
    for extra in [
        json!({"guided_choice": options}),
        json!({"structured_outputs": {"choice": options, "disable_fallback": true}}),
    ] {
        let (status, v) = ask(&cluster, extra.clone())?;
        assert_eq!(status, 200, "{v}");
        let reply = v["choices"][0]["message"]["content"].as_str().context("content")?;
        assert!(options.contains(&reply), "{extra}: {reply:?}");
        assert_eq!(v["choices"][0]["finish_reason"], "stop", "{v}");
    }
    // A schema as JSON text, in the completions endpoint.
    let schema = json!({"type": "object", "properties": {"ok": {"type": "boolean"}},
                        "required": ["ok"], "additionalProperties": false});
    let body = json!({"prompt": "Answer:", "max_tokens": 20,
                      "structured_outputs": {"json": schema.to_string()}});
    let r = http_post(&cluster.http, "/v1/completions", &[], &body)?;
    let v: Value = r.json()?;
    assert_eq!(r.status, 200, "{v}");
    let text = v["choices"][0]["text"].as_str().context("text")?;
    let parsed: Value = serde_json::from_str(text).with_context(|| text.to_string())?;
    assert!(parsed["ok"].is_boolean() && parsed.as_object().unwrap().len() == 1, "{parsed}");
    let (status, v) =
        ask(&cluster, json!({"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("both constrain"), "{v}");
    let (status, v) =
        ask(&cluster, json!({"structured_outputs": {"choice": ["b"], "structural_tag": "{}"}}))?;
    assert_eq!(status, 400, "{v}");
    let message = v["error"]["message"].as_str().unwrap_or("");
    assert!(message.contains("`structured_outputs.structural_tag`"), "{v}");

    // Refusals name the problem.
    let (status, v) = ask(
        &cluster,
        json!({"response_format": {"type": "json_schema",
        "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}}),
    )?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("invalid JSON schema"), "{v}");
    let (status, v) = ask(&cluster, json!({"response_format": {"type": "yaml"}}))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("response_format.type"), "{v}");

    // No silent drops: a field the gateway does not honour is a 400 naming it.
    let (status, v) = ask(&cluster, json!({"audio": {"voice": "x"}}))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("`audio`"), "{v}");
    let (status, v) = ask(&cluster, json!({"temprature": 0.5}))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("unknown field `temprature`"));
    let (status, v) = ask(&cluster, json!({"user": "u-1", "store": false}))?;
    assert_eq!(status, 200, "documented no-ops are accepted: {v}");

    // gRPC: a Lark grammar.
    let mut client = cluster.chat().await?;
    let mut req = tonic::Request::new(ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Text("Yes or no?".into())) }],
        }],
        max_tokens: 20,
        output_format: Some(OutputFormat {
            kind: Some(Kind::Lark(r#"start: ("yes" | "no") "!""#.into())),
        }),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(60));
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    let mut reason = String::new();
    while let Some(m) = stream.message().await? {
        match m.event {
            Some(Event::Delta(d)) => text.push_str(&d.text),
            Some(Event::Finish(f)) => reason = f.finish_reason,
            None => {}
        }
    }
    assert!(text == "yes!" || text == "no!", "{text:?}");
    assert_eq!(reason, "stop");

    // gRPC: a choice.
    let mut req = tonic::Request::new(ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![ContentPart { part: Some(Part::Text("Pick one.".into())) }],
        }],
        max_tokens: 20,
        output_format: Some(OutputFormat {
            kind: Some(Kind::Choice(Choices { options: vec!["left|right".into(), "up?".into()] })),
        }),
        ..Default::default()
    });
    req.set_timeout(Duration::from_secs(60));
    let mut stream = client.generate(req).await?.into_inner();
    let mut text = String::new();
    while let Some(m) = stream.message().await? {
        if let Some(Event::Delta(d)) = m.event {
            text.push_str(&d.text);
        }
    }
    assert!(text == "left|right" || text == "up?", "{text:?}");
    Ok(())
}
