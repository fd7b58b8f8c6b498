//! Structured outputs through the gateway, real binaries: OpenAI's `response_format`
//! (`json_schema`, `json_object`), vLLM's `structured_outputs` (`choice`, `json`) and its
//! earlier `guided_regex` / `guided_choice` over HTTP, `output_format` over gRPC; the replies parse and match on the bundled random-weight model and finish with `stop`;
//! an invalid schema, and any field the gateway does not honour, is a 400 naming the problem.
//! Strict tools under `tool_choice: auto`: the grammar the gateway sends allows text or valid
//! calls only (checked against the decoder's compiler token by token), and a reply pushed to
//! start with `{` comes back as a call whose arguments match.

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

    strict_tools_under_auto(&cluster)?;

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

/// Two tools with bounded arguments, `strict` as given.
fn weather_tools(strict: bool) -> Value {
    json!([
        {"type": "function", "function": {"name": "get_weather", "strict": strict, "parameters": {
            "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
            "required": ["city"], "additionalProperties": false}}},
        {"type": "function", "function": {"name": "get_time", "strict": strict, "parameters": {
            "type": "object", "properties": {"zone": {"enum": ["utc", "local"]}},
            "required": ["zone"], "additionalProperties": false}}},
    ])
}

/// Under `auto`, strict tools: a reply pushed to start with `{` (logit_bias on its token, the
/// rest greedy) is a call of a listed tool whose arguments match; the same push without
/// `strict` gives the random model's text; `strict` must be a boolean; and it excludes another
/// structured output.
fn strict_tools_under_auto(cluster: &Cluster) -> Result<()> {
    let tok = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer;
    let brace = match tok.encode_with("{", false)?.as_slice() {
        [id] => *id,
        other => anyhow::bail!("`{{` is {other:?}"),
    };
    let pushed = |strict: bool| {
        json!({"tools": weather_tools(strict), "temperature": 0, "max_tokens": 60,
               "logit_bias": {brace.to_string(): 100}})
    };
    let (status, v) = ask(cluster, pushed(true))?;
    assert_eq!(status, 200, "{v}");
    let choice = &v["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{v}");
    let calls = choice["message"]["tool_calls"].as_array().context("tool_calls")?;
    assert!(!calls.is_empty(), "{v}");
    for c in calls {
        let args: Value =
            serde_json::from_str(c["function"]["arguments"].as_str().context("args")?)?;
        match c["function"]["name"].as_str() {
            Some("get_weather") => {
                let city = args["city"].as_str().context("city")?;
                assert!(
                    city.chars().count() <= 12 && args.as_object().unwrap().len() == 1,
                    "{args}"
                );
            }
            Some("get_time") => {
                assert!(["utc", "local"].contains(&args["zone"].as_str().unwrap_or("")), "{args}");
            }
            other => panic!("not a listed tool: {other:?}"),
        }
    }
    let (status, v) = ask(cluster, pushed(false))?;
    assert_eq!(status, 200, "{v}");
    let message = &v["choices"][0]["message"];
    assert_eq!(message["tool_calls"], Value::Null, "not strict: not constrained: {v}");
    assert!(message["content"].as_str().is_some_and(|c| c.starts_with('{')), "{v}");

    let mut bad = weather_tools(true);
    bad[0]["function"]["strict"] = json!("yes");
    let (status, v) = ask(cluster, json!({"tools": bad}))?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("tools[0].function.strict"));
    let (status, v) = ask(
        cluster,
        json!({"tools": weather_tools(true), "response_format": {"type": "json_object"}}),
    )?;
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap_or("").contains("strict tool"), "{v}");
    Ok(())
}

/// The grammar of strict tools under `auto`, compiled by the decoder's compiler for the bundled
/// model and followed token by token: text whose first non-blank character is not `{` and calls
/// whose arguments match are accepted whole; a call of another tool, arguments of the wrong type
/// or a `{` that opens no call are refused at the token that breaks them.
#[test]
fn the_strict_auto_grammar_allows_text_or_matching_calls() -> Result<()> {
    use dsvl_engine::constraint::{ConstraintCompiler, Grammar};
    use dsvl_proto::internal::constraint::Kind as Internal;
    let tools = dsvl_gateway::tools::Tools::parse(Some(&weather_tools(true)), None, None)?
        .context("tools")?;
    let Some(Internal::Lark(lark)) = tools.constraint() else { anyhow::bail!("not a grammar") };
    let dir = dsvl_testkit::tiny_model_dir();
    let json = std::fs::read(dir.join("tokenizer.json"))?;
    let tok = dsvl_gateway::served::ServedModel::load(None, "tiny".into())?.tokenizer;
    let eos = tok.special().eos;
    let compiler = ConstraintCompiler::from_tokenizer_json(&json, 1024, eos)?;
    let accepts = |text: &str| -> Result<bool> {
        let mut k = compiler.compile(&Grammar::Lark(lark.clone()))?;
        for id in tok.encode_with(text, false)? {
            if !k.mask()?.allows(id) {
                return Ok(false);
            }
            k.consume(id)?;
        }
        Ok(k.mask()?.allows(eos))
    };
    for (text, want) in [
        ("It is sunny in Paris.", true),
        (" It is sunny.\n{not a call}", true),
        ("", true),
        (r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":"Paris"}}]}"#, true),
        (
            r#" {"tool_calls":[{"name":"get_time","arguments":{"zone":"utc"}},{"name":"get_weather","arguments":{"city":"Rome"}}]}"#,
            true,
        ),
        (r#"{"tool_calls":[{"name":"get_weather","arguments":{"city":3}}]}"#, false),
        (r#"{"tool_calls":[{"name":"get_weather","arguments":{"town":"Paris"}}]}"#, false),
        (r#"{"tool_calls":[{"name":"get_time","arguments":{"zone":"mars"}}]}"#, false),
        (r#"{"tool_calls":[{"name":"now","arguments":{}}]}"#, false),
        (r#"{"answer": 42}"#, false),
    ] {
        assert_eq!(accepts(text)?, want, "{text:?}");
    }
    Ok(())
}
