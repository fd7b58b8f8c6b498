//! What a reply must match, from whichever request field asked for it: OpenAI's
//! `response_format`; vLLM's `structured_outputs` object (`json`, `regex`, `choice`, `grammar`,
//! `json_object`); and the `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`
//! fields it replaced (vLLM 0.12 removed them, but clients written against earlier vLLM still
//! send them). At most one may be set; it becomes the decoder's one [`Constraint`]. A choice
//! list becomes a regular expression of its entries escaped and joined, so the reply is exactly
//! one of them.

use dsvl_proto::internal::constraint::Kind;
use dsvl_proto::internal::Constraint;
use serde::Deserialize;
use serde_json::Value;

use crate::error::GatewayError;
use crate::prepare::invalid;

/// The structured-output fields of a chat or completions body (flattened into both).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StructuredFields {
    /// OpenAI's `text`, `json_object` or `json_schema`.
    pub response_format: Option<Value>,
    /// vLLM's current object.
    pub structured_outputs: Option<StructuredOutputs>,
    /// vLLM's earlier fields.
    pub guided_json: Option<Value>,
    pub guided_regex: Option<String>,
    pub guided_choice: Option<Vec<String>>,
    pub guided_grammar: Option<String>,
}

/// vLLM's `structured_outputs`: one of its constraints. Its other keys are checked against
/// [`crate::openai_fields`] before this is read (no-ops accepted, the rest refused by name).
#[derive(Debug, Default, Deserialize)]
pub(crate) struct StructuredOutputs {
    json: Option<Value>,
    regex: Option<String>,
    choice: Option<Vec<String>>,
    grammar: Option<String>,
    json_object: Option<bool>,
}

impl StructuredFields {
    /// The one constraint asked for (`None`: free text), or a 400 naming the field at fault,
    /// or both fields when two ask.
    pub(crate) fn constraint(&self) -> Result<Option<Constraint>, GatewayError> {
        let mut asked: Vec<(&'static str, Kind)> = Vec::new();
        if let Some(kind) = response_format(self.response_format.as_ref())? {
            asked.push(("response_format", kind));
        }
        if let Some(so) = &self.structured_outputs {
            if let Some(schema) = &so.json {
                asked.push((
                    "structured_outputs.json",
                    json_schema("structured_outputs.json", schema)?,
                ));
            }
            if let Some(rx) = &so.regex {
                asked.push(("structured_outputs.regex", Kind::Regex(rx.clone())));
            }
            if let Some(options) = &so.choice {
                asked.push((
                    "structured_outputs.choice",
                    choice("structured_outputs.choice", options)?,
                ));
            }
            if let Some(lark) = &so.grammar {
                asked.push(("structured_outputs.grammar", Kind::Lark(lark.clone())));
            }
            if so.json_object == Some(true) {
                asked.push(("structured_outputs.json_object", Kind::JsonObject(true)));
            }
        }
        if let Some(schema) = &self.guided_json {
            asked.push(("guided_json", json_schema("guided_json", schema)?));
        }
        if let Some(rx) = &self.guided_regex {
            asked.push(("guided_regex", Kind::Regex(rx.clone())));
        }
        if let Some(options) = &self.guided_choice {
            asked.push(("guided_choice", choice("guided_choice", options)?));
        }
        if let Some(lark) = &self.guided_grammar {
            asked.push(("guided_grammar", Kind::Lark(lark.clone())));
        }
        match asked.as_slice() {
            [] => Ok(None),
            [_] => Ok(asked.pop().map(|(_, kind)| Constraint { kind: Some(kind) })),
            [(a, _), (b, _), ..] => Err(invalid(format!(
                "{a} and {b} both constrain the reply: ask for one structured output"
            ))),
        }
    }
}

/// OpenAI's `response_format`: `text` (none), `json_object` or `json_schema` (enforced whether
/// `strict` is set or not).
fn response_format(format: Option<&Value>) -> Result<Option<Kind>, GatewayError> {
    let Some(f) = format.filter(|f| !f.is_null()) else { return Ok(None) };
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(None),
        Some("json_object") => Ok(Some(Kind::JsonObject(true))),
        Some("json_schema") => {
            let schema = f
                .get("json_schema")
                .and_then(|j| j.get("schema"))
                .ok_or_else(|| invalid("response_format.json_schema.schema is required"))?;
            if !schema.is_object() {
                return Err(invalid("response_format.json_schema.schema must be an object"));
            }
            Ok(Some(Kind::JsonSchema(schema.to_string())))
        }
        other => Err(invalid(format!(
            "response_format.type must be text, json_object or json_schema, not {other:?}"
        ))),
    }
}

/// vLLM's `json`: a schema as an object, or as JSON text holding one.
fn json_schema(field: &str, schema: &Value) -> Result<Kind, GatewayError> {
    let parsed;
    let schema = match schema {
        Value::String(text) => {
            parsed = serde_json::from_str::<Value>(text)
                .map_err(|e| invalid(format!("{field}: the schema is not JSON: {e}")))?;
            &parsed
        }
        other => other,
    };
    if !schema.is_object() {
        return Err(invalid(format!("{field} must be a JSON schema object")));
    }
    Ok(Kind::JsonSchema(schema.to_string()))
}

/// vLLM's `choice`: the reply is exactly one of the strings.
pub(crate) fn choice(field: &str, options: &[String]) -> Result<Kind, GatewayError> {
    if options.is_empty() {
        return Err(invalid(format!("{field} needs at least one choice")));
    }
    let escaped: Vec<String> = options.iter().map(|o| regex_syntax::escape(o)).collect();
    Ok(Kind::Regex(format!("(?:{})", escaped.join("|"))))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn kind(body: Value) -> Result<Option<Kind>, String> {
        let fields: StructuredFields = serde_json::from_value(body).map_err(|e| e.to_string())?;
        fields.constraint().map(|c| c.and_then(|c| c.kind)).map_err(|e| e.to_string())
    }

    #[test]
    fn each_field_becomes_its_constraint() {
        let schema = json!({"type": "object"});
        let want_schema = Some(Kind::JsonSchema(schema.to_string()));
        assert_eq!(kind(json!({})), Ok(None));
        assert_eq!(kind(json!({"response_format": {"type": "text"}})), Ok(None));
        assert_eq!(kind(json!({"guided_json": schema})), Ok(want_schema.clone()));
        assert_eq!(kind(json!({"guided_json": schema.to_string()})), Ok(want_schema.clone()));
        assert_eq!(kind(json!({"structured_outputs": {"json": schema}})), Ok(want_schema));
        assert_eq!(
            kind(json!({"structured_outputs": {"regex": "[a-z]+"}})),
            Ok(Some(Kind::Regex("[a-z]+".into())))
        );
        assert_eq!(
            kind(json!({"structured_outputs": {"grammar": "start: \"x\""}})),
            Ok(Some(Kind::Lark("start: \"x\"".into())))
        );
        assert_eq!(
            kind(json!({"structured_outputs": {"json_object": true}})),
            Ok(Some(Kind::JsonObject(true)))
        );
        assert_eq!(kind(json!({"structured_outputs": {"json_object": false}})), Ok(None));
        assert_eq!(
            kind(json!({"guided_choice": ["yes", "no"]})),
            Ok(Some(Kind::Regex("(?:yes|no)".into())))
        );
    }

    #[test]
    fn choices_are_matched_literally() {
        let Ok(Some(Kind::Regex(rx))) =
            kind(json!({"structured_outputs": {"choice": ["a.b", "(c)|d", "e*", "ü"]}}))
        else {
            panic!("a regular expression")
        };
        assert_eq!(rx, r"(?:a\.b|\(c\)\|d|e\*|ü)");
        // The expression parses as the decoder's grammar engine will parse it.
        regex_syntax::Parser::new().parse(&rx).expect("a valid regular expression");
    }

    #[test]
    fn refusals_name_the_field() {
        let e = kind(json!({"guided_regex": "a", "structured_outputs": {"choice": ["b"]}}));
        assert_eq!(
            e,
            Err("structured_outputs.choice and guided_regex both constrain the reply: ask for one structured output".into())
        );
        let e = kind(json!({"structured_outputs": {"regex": "a", "grammar": "start: \"a\""}}));
        assert!(e
            .unwrap_err()
            .starts_with("structured_outputs.regex and structured_outputs.grammar"));
        let e = kind(json!({"response_format": {"type": "json_object"}, "guided_json": {}}));
        assert!(e.unwrap_err().starts_with("response_format and guided_json"));
        let e = kind(json!({"guided_choice": []})).unwrap_err();
        assert_eq!(e, "guided_choice needs at least one choice");
        let e = kind(json!({"guided_json": "[1, 2]"})).unwrap_err();
        assert_eq!(e, "guided_json must be a JSON schema object");
        let e = kind(json!({"structured_outputs": {"json": "{not json"}})).unwrap_err();
        assert!(e.starts_with("structured_outputs.json: the schema is not JSON"), "{e}");
        let e = kind(json!({"response_format": {"type": "yaml"}})).unwrap_err();
        assert!(e.starts_with("response_format.type must be"), "{e}");
    }
}
