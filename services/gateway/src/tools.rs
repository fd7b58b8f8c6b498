//! OpenAI tool calling on a template without tool syntax.
//!
//! DeepSeek-VL's chat template knows only system, user and assistant turns, so tools are
//! rendered as text, in one documented way (`services/README.md`, "Tool calls"):
//!
//! * the system prompt (the request's, or the default) gets a block that lists each tool as
//!   one JSON line (`{"name", "description", "parameters"}`) and says how to call them: reply
//!   with only `{"tool_calls": [{"name": ..., "arguments": {...}}]}`;
//! * an assistant turn that called tools is rendered as that same JSON (after its text, if any);
//! * `tool` messages become one user turn per run of them: `Tool result (<name>, <id>):` then
//!   the content, for each.
//!
//! `tool_choice` `required` and a named function are enforced with a JSON schema (the decoder's
//! grammar-constrained decoding), so the reply always parses into calls of the listed tools
//! with arguments that match their `parameters`. Under `auto`, a reply that parses as a call is
//! returned as `tool_calls`, anything else as content; when a tool sets `function.strict`, the
//! reply is decoded under a Lark grammar of two branches: text whose first non-blank character
//! is not `{`, or (after any blanks) calls of the listed tools whose arguments match the strict
//! tools' `parameters` (any object for the others), as OpenAI's strict function calling
//! promises. `none` renders no tools.

use dsvl_proto::internal::constraint::Kind;
use serde_json::{json, Value};

use crate::error::GatewayError;

/// One function the model may call.
#[derive(Debug, Clone, PartialEq)]
pub struct Tool {
    /// Name.
    pub name: String,
    /// What it does.
    pub description: String,
    /// JSON schema of its arguments (an object schema).
    pub parameters: Value,
    /// OpenAI's `function.strict`: under `auto` too, a call's arguments match `parameters`.
    pub strict: bool,
}

/// OpenAI's `tool_choice`.
#[derive(Debug, Clone, PartialEq)]
pub enum Choice {
    /// The model may answer or call tools.
    Auto,
    /// The model must call at least one tool.
    Required,
    /// The model must call this tool.
    Named(String),
}

/// The tools of a request and how they may be called (`None` at the request level: no tools,
/// or `tool_choice: none`).
#[derive(Debug, Clone, PartialEq)]
pub struct Tools {
    /// The functions.
    pub tools: Vec<Tool>,
    /// How.
    pub choice: Choice,
    /// Whether one reply may hold several calls (`parallel_tool_calls`, default true).
    pub parallel: bool,
}

/// A parsed call.
#[derive(Debug, Clone, PartialEq)]
pub struct ToolCall {
    /// `call_…`, unique.
    pub id: String,
    /// The function.
    pub name: String,
    /// Its arguments, as a JSON text (OpenAI's `function.arguments`).
    pub arguments: String,
}

fn invalid(m: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(m.into())
}

impl Tools {
    /// Reads `tools`, `tool_choice` and `parallel_tool_calls`; `None` when no tool can be
    /// called (no tools, or `tool_choice: "none"`).
    ///
    /// # Errors
    /// A malformed tool or choice, naming the field.
    pub fn parse(
        tools: Option<&Value>,
        tool_choice: Option<&Value>,
        parallel: Option<bool>,
    ) -> Result<Option<Self>, GatewayError> {
        let list = match tools {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(a)) => {
                a.iter().enumerate().map(parse_tool).collect::<Result<_, _>>()?
            }
            Some(_) => return Err(invalid("tools must be an array")),
        };
        let choice = match tool_choice {
            None | Some(Value::Null) => (!list.is_empty()).then_some(Choice::Auto),
            Some(Value::String(s)) => match s.as_str() {
                "none" => None,
                "auto" => Some(Choice::Auto),
                "required" => Some(Choice::Required),
                other => {
                    return Err(invalid(format!(
                        "tool_choice `{other}` is not none, auto or required"
                    )))
                }
            },
            Some(v) => {
                let name = v
                    .get("function")
                    .and_then(|f| f.get("name"))
                    .and_then(Value::as_str)
                    .filter(|_| v.get("type").and_then(Value::as_str) == Some("function"))
                    .ok_or_else(|| invalid("tool_choice must be none, auto, required or {\"type\": \"function\", \"function\": {\"name\": ...}}"))?;
                Some(Choice::Named(name.to_string()))
            }
        };
        let Some(choice) = choice else { return Ok(None) };
        if list.is_empty() {
            return Err(invalid("tool_choice asks for a tool call but no tools are given"));
        }
        if let Choice::Named(n) = &choice {
            if !list.iter().any(|t| &t.name == n) {
                return Err(invalid(format!("tool_choice names `{n}`, which is not in tools")));
            }
        }
        Ok(Some(Self { tools: list, choice, parallel: parallel.unwrap_or(true) }))
    }

    /// The block appended to the system prompt.
    pub fn system_block(&self) -> String {
        let mut out = String::from(
            "You can call the following tools. To call tools, reply with only a JSON object of the form {\"tool_calls\": [{\"name\": <tool name>, \"arguments\": <arguments object>}]} and nothing else.",
        );
        match &self.choice {
            Choice::Auto => out.push_str(" If no tool is needed, answer normally."),
            Choice::Required => out.push_str(" You must call at least one tool."),
            Choice::Named(n) => out.push_str(&format!(" You must call the tool `{n}`.")),
        }
        out.push_str("\nTools:");
        for t in &self.tools {
            let line =
                json!({"name": t.name, "description": t.description, "parameters": t.parameters});
            out.push('\n');
            out.push_str(&line.to_string());
        }
        out
    }

    /// What the reply is decoded under: `required` and named calls a JSON schema of the calls,
    /// `auto` with a strict tool a Lark grammar of text or such calls (`None`: free text).
    pub fn constraint(&self) -> Option<Kind> {
        match &self.choice {
            Choice::Auto if self.tools.iter().any(|t| t.strict) => {
                let mut calls = self.calls_schema();
                // Compact JSON, as the decoder compiles a schema given alone.
                calls["x-guidance"] = json!({"whitespace_flexible": false});
                Some(Kind::Lark(format!(
                    "start: text | calls\n\
                     text: /{BLANKS}([^{{{BLANK}][\\s\\S]*)?/\n\
                     calls: /{BLANKS}/ %json {calls}\n"
                )))
            }
            Choice::Auto => None,
            Choice::Required | Choice::Named(_) => {
                Some(Kind::JsonSchema(self.calls_schema().to_string()))
            }
        }
    }

    /// The JSON schema of a reply that calls tools: `required` any listed tools, a named
    /// function that one, `auto` any (the arguments of non-strict tools any object).
    fn calls_schema(&self) -> Value {
        let allowed: Vec<&Tool> = match &self.choice {
            Choice::Auto | Choice::Required => self.tools.iter().collect(),
            Choice::Named(n) => self.tools.iter().filter(|t| &t.name == n).collect(),
        };
        let auto = self.choice == Choice::Auto;
        let calls: Vec<Value> = allowed
            .iter()
            .map(|t| {
                let arguments = if auto && !t.strict { json!({"type": "object"}) } else { t.parameters.clone() };
                json!({"type": "object", "properties": {"name": {"const": t.name}, "arguments": arguments},
                       "required": ["name", "arguments"], "additionalProperties": false})
            })
            .collect();
        let items = if calls.len() == 1 { calls[0].clone() } else { json!({"anyOf": calls}) };
        let max = if self.parallel && !matches!(self.choice, Choice::Named(_)) { 8 } else { 1 };
        json!({"type": "object",
            "properties": {"tool_calls": {"type": "array", "items": items, "minItems": 1, "maxItems": max}},
            "required": ["tool_calls"], "additionalProperties": false})
    }

    /// The calls in a reply, when it is one (a JSON object whose `tool_calls` are calls of
    /// listed tools with object arguments); `None` otherwise.
    pub fn parse_reply(&self, text: &str) -> Option<Vec<ToolCall>> {
        let v: Value = serde_json::from_str(text.trim()).ok()?;
        let calls = v.get("tool_calls")?.as_array()?;
        if calls.is_empty() || (!self.parallel && calls.len() > 1) {
            return None;
        }
        calls
            .iter()
            .map(|c| {
                let name = c.get("name")?.as_str()?;
                let args = c.get("arguments").filter(|a| a.is_object())?;
                self.tools.iter().any(|t| t.name == name).then(|| ToolCall {
                    id: crate::http::unique_id("call_"),
                    name: name.to_string(),
                    arguments: args.to_string(),
                })
            })
            .collect()
    }
}

/// What may come before a call's `{` (the reply's start is trimmed before parsing).
const BLANKS: &str = "[ \\t\\r\\n]*";
/// One such character, inside a class.
const BLANK: &str = " \\t\\r\\n";

fn parse_tool((i, v): (usize, &Value)) -> Result<Tool, GatewayError> {
    if v.get("type").and_then(Value::as_str) != Some("function") {
        return Err(invalid(format!("tools[{i}].type must be \"function\"")));
    }
    let f = v.get("function").ok_or_else(|| invalid(format!("tools[{i}].function is required")))?;
    let name = f
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty() && n.len() <= 64)
        .ok_or_else(|| invalid(format!("tools[{i}].function.name must be 1 to 64 characters")))?;
    let parameters = match f.get("parameters") {
        None | Some(Value::Null) => json!({"type": "object", "properties": {}}),
        Some(p) if p.is_object() => p.clone(),
        Some(_) => {
            return Err(invalid(format!("tools[{i}].function.parameters must be an object")))
        }
    };
    let strict = match f.get("strict") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(_) => return Err(invalid(format!("tools[{i}].function.strict must be a boolean"))),
    };
    Ok(Tool {
        name: name.to_string(),
        description: f.get("description").and_then(Value::as_str).unwrap_or_default().to_string(),
        parameters,
        strict,
    })
}

/// How an assistant turn's earlier calls appear in the prompt: the JSON the model is asked to
/// produce.
pub fn render_calls(calls: &[(String, String)]) -> String {
    let list: Vec<Value> = calls
        .iter()
        .map(|(name, args)| {
            let args: Value =
                serde_json::from_str(args).unwrap_or_else(|_| Value::String(args.clone()));
            json!({"name": name, "arguments": args})
        })
        .collect();
    json!({"tool_calls": list}).to_string()
}

/// How a tool's result appears in the prompt (inside a user turn).
pub fn render_result(name: &str, id: &str, content: &str) -> String {
    format!("Tool result ({name}, {id}):\n{content}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn weather() -> Value {
        json!([{"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
            {"type": "function", "function": {"name": "now"}}])
    }

    #[test]
    fn choices_parse_and_refuse_with_names() {
        let t = weather();
        assert_eq!(Tools::parse(None, None, None).unwrap(), None);
        assert_eq!(Tools::parse(Some(&t), Some(&json!("none")), None).unwrap(), None);
        let auto = Tools::parse(Some(&t), None, None).unwrap().unwrap();
        assert_eq!((auto.choice.clone(), auto.tools.len(), auto.parallel), (Choice::Auto, 2, true));
        let named = json!({"type": "function", "function": {"name": "now"}});
        assert_eq!(
            Tools::parse(Some(&t), Some(&named), Some(false)).unwrap().unwrap().choice,
            Choice::Named("now".into())
        );
        for (tools, choice, field) in [
            (json!([]), json!("required"), "no tools"),
            (t.clone(), json!({"type": "function", "function": {"name": "x"}}), "`x`"),
            (t.clone(), json!("sometimes"), "sometimes"),
            (json!([{"type": "retrieval"}]), json!("auto"), "tools[0].type"),
            (
                json!([{"type": "function", "function": {"name": ""}}]),
                json!("auto"),
                "tools[0].function.name",
            ),
        ] {
            let e = Tools::parse(Some(&tools), Some(&choice), None).unwrap_err().to_string();
            assert!(e.contains(field), "{e}");
        }
    }

    #[test]
    fn replies_parse_into_calls_of_listed_tools_only() {
        let t = Tools::parse(Some(&weather()), Some(&json!("auto")), None).unwrap().unwrap();
        let calls = t
            .parse_reply(
                r#" {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]} "#,
            )
            .unwrap();
        assert_eq!(
            (calls[0].name.as_str(), calls[0].arguments.as_str()),
            ("get_weather", r#"{"city":"Paris"}"#)
        );
        assert!(calls[0].id.starts_with("call_"));
        for text in [
            "It is sunny.",
            r#"{"tool_calls": []}"#,
            r#"{"tool_calls": [{"name": "other", "arguments": {}}]}"#,
            r#"{"tool_calls": [{"name": "now", "arguments": "x"}]}"#,
        ] {
            assert_eq!(t.parse_reply(text), None, "{text}");
        }
        assert_eq!(t.constraint(), None, "auto without a strict tool is not constrained");
    }

    #[test]
    fn the_schema_allows_exactly_the_named_or_listed_tools() {
        let named = json!({"type": "function", "function": {"name": "get_weather"}});
        let schema = |t: &Tools| match t.constraint() {
            Some(Kind::JsonSchema(s)) => serde_json::from_str::<Value>(&s).unwrap(),
            other => panic!("{other:?}"),
        };
        let t = Tools::parse(Some(&weather()), Some(&named), None).unwrap().unwrap();
        let s = schema(&t);
        let items = &s["properties"]["tool_calls"]["items"];
        assert_eq!(items["properties"]["name"]["const"], "get_weather");
        assert_eq!(items["properties"]["arguments"]["required"], json!(["city"]));
        assert_eq!(s["properties"]["tool_calls"]["maxItems"], 1);
        let t = Tools::parse(Some(&weather()), Some(&json!("required")), None).unwrap().unwrap();
        let s = schema(&t);
        assert_eq!(
            s["properties"]["tool_calls"]["items"]["anyOf"].as_array().map(Vec::len),
            Some(2)
        );
        let block = t.system_block();
        let lines: Vec<Value> =
            block.lines().skip(2).map(|l| serde_json::from_str(l).unwrap()).collect();
        let params = &weather()[0]["function"]["parameters"];
        let want = json!({"name": "get_weather", "description": "Weather in a city", "parameters": params});
        assert_eq!(lines[0], want);
        assert_eq!(lines[1]["name"], "now");
    }

    #[test]
    fn history_renders_as_the_reply_format() {
        let r = render_calls(&[("get_weather".into(), r#"{"city":"Paris"}"#.into())]);
        let v: Value = serde_json::from_str(&r).unwrap();
        assert_eq!(
            v,
            json!({"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris"}}]})
        );
        assert_eq!(render_result("now", "call_1", "12:00"), "Tool result (now, call_1):\n12:00");
    }
}
