//! Every field of OpenAI's chat-completions request, and what the gateway does with it:
//! honoured, accepted as a no-op (it cannot change the output of these models), or refused
//! with a 400 naming it. A field not in this table is refused too, so nothing a client sends is
//! silently dropped. `services/OPENAI_FIELDS.md` is generated from this table (a test keeps the
//! two equal).

use serde_json::Value;

use crate::prepare::MAX_MESSAGES;

/// What the gateway does with a field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Treatment {
    /// Used as OpenAI defines it (possibly only some values; the others are refused).
    Honoured,
    /// Accepted and ignored: it cannot change the output here.
    NoOp,
    /// A 400 naming the field whenever it is present and not null.
    Refused,
}

/// One request field: where it sits, its treatment, why.
pub struct Field {
    /// Dotted path (`messages[].name`).
    pub path: &'static str,
    /// Treatment.
    pub treatment: Treatment,
    /// Why, for the reference page.
    pub why: &'static str,
}

use Treatment::{Honoured, NoOp, Refused};

macro_rules! fields {
    ($(#[$doc:meta])* $name:ident: $(($path:literal, $t:ident, $why:literal)),* $(,)?) => {
        $(#[$doc])*
        pub const $name: &[Field] = &[$(Field { path: $path, treatment: $t, why: $why }),*];
    };
}

fields![
    /// `POST /v1/chat/completions`.
    FIELDS:
    ("messages", Honoured, "the conversation; roles system, user, assistant"),
    ("model", Honoured, "must be the served model's name, or empty"),
    ("max_tokens", Honoured, "new-token budget"),
    ("max_completion_tokens", Honoured, "new-token budget (wins over max_tokens)"),
    ("temperature", Honoured, "0 is greedy, as is anything below 1e-5"),
    ("top_p", Honoured, "nucleus sampling"),
    ("seed", Honoured, "same seed, request and model: same tokens (see services/README.md for what is guaranteed); absent: random per request"),
    ("stop", Honoured, "up to 16 strings; the text is cut before them"),
    ("stream", Honoured, "server-sent events"),
    ("stream_options", Honoured, "include_usage, continuous_usage_stats"),
    (
        "response_format",
        Honoured,
        "text, json_object, json_schema (enforced with or without strict)"
    ),
    (
        "n",
        Honoured,
        "up to the gateway's --max-n (default 8); the choices share the prompt's prefill; choice i samples with seed + i"
    ),
    (
        "logprobs",
        Honoured,
        "each token's log-probability under the model's unprocessed distribution"
    ),
    ("top_logprobs", Honoured, "up to 20 alternatives per token; needs logprobs"),
    (
        "presence_penalty",
        Honoured,
        "OpenAI's definition, over the generated tokens; in [-2, 2]; greedy too"
    ),
    (
        "frequency_penalty",
        Honoured,
        "OpenAI's definition, over the generated tokens; in [-2, 2]; greedy too"
    ),
    (
        "logit_bias",
        Honoured,
        "up to 300 token ids, values in [-100, 100], added before anything else (greedy too)"
    ),
    (
        "tools",
        Honoured,
        "functions (type function; name, description, parameters, strict); rendered into the system prompt as services/README.md says"
    ),
    (
        "tool_choice",
        Honoured,
        "none, auto (the reply is parsed; grammar-constrained when a tool is strict), required or a named function (both grammar-constrained, so they always parse)"
    ),
    ("user", NoOp, "an end-user id for the caller's own abuse tracking; never changes the output"),
    ("safety_identifier", NoOp, "like user"),
    ("metadata", NoOp, "caller's tags for stored completions; nothing is stored here"),
    ("store", NoOp, "nothing is ever stored here"),
    (
        "prompt_cache_key",
        NoOp,
        "a routing hint for OpenAI's cache; dsvl's prefix cache is automatic"
    ),
    ("service_tier", NoOp, "one tier here"),
    ("parallel_tool_calls", Honoured, "false: at most one call per reply"),
    ("audio", Refused, "text output only"),
    ("modalities", Refused, "text output only"),
    ("prediction", Refused, "predicted outputs are not implemented"),
    ("reasoning_effort", Refused, "these are not reasoning models"),
    ("verbosity", Refused, "not a parameter of these models"),
    ("web_search_options", Refused, "no web search"),
    ("functions", Refused, "deprecated function calling is not supported"),
    ("function_call", Refused, "deprecated function calling is not supported"),
    ("top_k", Honoured, "dsvl/vLLM extension: keep the k most likely tokens"),
    ("repetition_penalty", Honoured, "dsvl/vLLM extension: Hugging Face's repetition penalty"),
    ("min_p", Honoured, "vLLM extension: drop tokens below min_p times the most likely one's probability"),
    ("stop_token_ids", Honoured, "vLLM extension: up to 64 ids that also end generation (the id is kept in token ids and logprobs, its text only under include_stop_str_in_output)"),
    ("ignore_eos", Honoured, "vLLM extension: do not stop at the end-of-sequence token"),
    (
        "min_tokens",
        Honoured,
        "vLLM extension: EOS, stop_token_ids and stop strings cannot end the reply before this many tokens (stop strings are looked for in the text after them); at most the token budget; not with a structured output"
    ),
    (
        "include_stop_str_in_output",
        Honoured,
        "vLLM extension: the matched stop string, or the text of the stop_token_ids id that ended the reply, stays at the end of the text"
    ),
    (
        "prompt_logprobs",
        Honoured,
        "vLLM extension: each prompt token's log-probability given the tokens before it, its rank and this many alternatives (0 to 20), in the reply's top-level prompt_logprobs (the first null); computed whole, not from the prefix cache; not with stream"
    ),
    (
        "allowed_token_ids",
        Honoured,
        "vLLM extension: only these token ids may be chosen; not with a structured output"
    ),
    (
        "bad_words",
        Honoured,
        "vLLM extension: up to 128 words the reply never contains as tokenized (as is and with a leading space, vLLM's rule); not with a structured output"
    ),
    (
        "truncate_prompt_tokens",
        Honoured,
        "vLLM extension: keep the prompt's last k tokens (k at least 1), after the chat template; refused where the cut would fall into or before an image"
    ),
    (
        "cache_salt",
        Honoured,
        "vLLM extension: the prompt's cached KV blocks are shared only with requests of the same tenant and salt (1 to 256 bytes)"
    ),
    ("request_id", Honoured, "vLLM extension: the reply's id is chatcmpl-<request_id> (1 to 128 printable ASCII characters)"),
    ("priority", Honoured, "vLLM extension: lower values are admitted first by the decoder (ties in arrival order), take each step's prefill budget before higher values, are preempted last, and preempt running requests of a higher value when short of KV blocks or a batch seat; default 0 (the vision tier encodes in arrival order)"),
    ("skip_special_tokens", Honoured, "vLLM extension: true only (special tokens are always left out of the text)"),
    ("spaces_between_special_tokens", NoOp, "vLLM extension: special tokens are never in the text, so there is nothing to space"),
    ("use_beam_search", Honoured, "vLLM extension: false only (no beam search)"),
    ("length_penalty", NoOp, "vLLM extension: only beam search reads it"),
    (
        "echo",
        Honoured,
        "vLLM extension: when the last message is the assistant's (see continue_final_message), the reply's content starts with it"
    ),
    (
        "continue_final_message",
        Honoured,
        "vLLM extension: the last message is left open and the model continues it (a reply begun by the caller); the reply is the continuation"
    ),
    (
        "add_generation_prompt",
        Honoured,
        "vLLM extension: false ends the prompt with a final user message (no empty assistant turn); true with continue_final_message is a 400"
    ),
    (
        "structured_outputs",
        Honoured,
        "vLLM extension: one of json, regex, choice, grammar or json_object (see below); excludes response_format and guided_*"
    ),
    ("guided_json", Honoured, "vLLM extension (before structured_outputs): the reply matches this JSON schema (an object, or JSON text)"),
    ("guided_regex", Honoured, "vLLM extension (before structured_outputs): the reply matches this regular expression"),
    ("guided_choice", Honoured, "vLLM extension (before structured_outputs): the reply is exactly one of these strings"),
    ("guided_grammar", Honoured, "vLLM extension (before structured_outputs): the reply matches this Lark grammar"),
    ("return_prompt_token_ids", Honoured, "dsvl extension: echo the prompt's token ids"),
    ("messages[].role", Honoured, "system, user, assistant or tool"),
    ("messages[].content", Honoured, "a string, or text and image_url parts"),
    ("messages[].name", Refused, "the DeepSeek-VL template has no speaker names"),
    ("messages[].tool_calls", Honoured, "an assistant turn's calls, rendered as the reply format"),
    ("messages[].tool_call_id", Honoured, "a tool message's call (it must answer an earlier call)"),
    ("messages[].refusal", NoOp, "an assistant turn's refusal text is not part of the prompt"),
    ("messages[].audio", Refused, "text output only"),
    ("messages[].content[].type", Honoured, "text or image_url"),
    ("messages[].content[].text", Honoured, "text"),
    ("messages[].content[].image_url", Honoured, "data: URLs, or http(s) URLs from allowed hosts"),
    ("messages[].content[].image_url.url", Honoured, "the image"),
    ("messages[].content[].image_url.detail", NoOp, "every image is resized to the model's 1024x1024 input"),
    ("messages[].tool_calls[].id", Honoured, "the call's id, which a later tool message answers"),
    ("messages[].tool_calls[].type", Honoured, "function"),
    ("messages[].tool_calls[].function", Honoured, "the call"),
    ("messages[].tool_calls[].function.name", Honoured, "the tool called"),
    ("messages[].tool_calls[].function.arguments", Honoured, "its arguments, as JSON text"),
    ("tools[].type", Honoured, "function only"),
    ("tools[].function", Honoured, "the function"),
    ("tools[].function.name", Honoured, "1 to 64 characters"),
    ("tools[].function.description", Honoured, "rendered with the tool"),
    ("tools[].function.parameters", Honoured, "a JSON schema of the arguments (an object); enforced under required and a named function, and under auto when strict"),
    ("tools[].function.strict", Honoured, "true: under auto too, a reply whose first non-blank character is { is decoded as calls of the listed tools whose arguments match the strict tools' parameters (a Lark grammar: text, or such calls); not with another structured output"),
    ("tool_choice.type", Honoured, "function"),
    ("tool_choice.function", Honoured, "the function to call"),
    ("tool_choice.function.name", Honoured, "one of tools"),
];

fields![
    /// `POST /v1/completions`.
    COMPLETION_FIELDS:
    ("prompt", Honoured, "a string (no chat template; BOS added) or a list of token ids, or a list of up to --max-prompts (default 64) of either; choice j of prompt i has index i * n + j"),
    ("model", Honoured, "must be the served model's name, or empty"),
    ("max_tokens", Honoured, "new-token budget (default 16, as OpenAI's); 0 only with echo (the prompt alone)"),
    ("temperature", Honoured, "0 is greedy, as is anything below 1e-5"),
    ("top_p", Honoured, "nucleus sampling"),
    ("seed", Honoured, "same seed, request and model: same tokens (see services/README.md for what is guaranteed); absent: random per request"),
    ("stop", Honoured, "up to 16 strings"),
    ("stream", Honoured, "server-sent events"),
    ("stream_options", Honoured, "include_usage, continuous_usage_stats"),
    ("n", Honoured, "up to the gateway's --max-n; the choices share the prompt's prefill"),
    ("best_of", Honoured, "absent or equal to n (no server-side ranking)"),
    (
        "logprobs",
        Honoured,
        "0 to 20: the chosen token's log-probability and that many alternatives"
    ),
    (
        "echo",
        Honoured,
        "true: each choice's text starts with the prompt (token ids decoded); with logprobs, so do its log-probabilities, one per prompt token given the tokens before it (the first null), computed whole, not from the prefix cache"
    ),
    ("suffix", Honoured, "null or empty only (no fill-in-the-middle)"),
    ("presence_penalty", Honoured, "OpenAI's definition; in [-2, 2]"),
    ("frequency_penalty", Honoured, "OpenAI's definition; in [-2, 2]"),
    ("logit_bias", Honoured, "as in chat"),
    ("user", NoOp, "an end-user id for the caller's own abuse tracking"),
    ("top_k", Honoured, "dsvl/vLLM extension"),
    ("repetition_penalty", Honoured, "dsvl/vLLM extension"),
    ("min_p", Honoured, "vLLM extension"),
    ("stop_token_ids", Honoured, "vLLM extension"),
    ("ignore_eos", Honoured, "vLLM extension"),
    ("min_tokens", Honoured, "vLLM extension, as in chat"),
    ("prompt_logprobs", Honoured, "vLLM extension, as in chat, in each choice's prompt_logprobs"),
    ("allowed_token_ids", Honoured, "vLLM extension, as in chat"),
    ("bad_words", Honoured, "vLLM extension, as in chat"),
    ("truncate_prompt_tokens", Honoured, "vLLM extension: keep the prompt's last k tokens (BOS included in the count)"),
    ("cache_salt", Honoured, "vLLM extension, as in chat"),
    ("request_id", Honoured, "vLLM extension: the reply's id is cmpl-<request_id>"),
    ("priority", Honoured, "vLLM extension, as in chat"),
    ("skip_special_tokens", Honoured, "vLLM extension: true only"),
    ("spaces_between_special_tokens", NoOp, "vLLM extension, as in chat"),
    ("use_beam_search", Honoured, "vLLM extension: false only"),
    ("length_penalty", NoOp, "vLLM extension: only beam search reads it"),
    ("include_stop_str_in_output", Honoured, "vLLM extension, as in chat"),
    ("response_format", Honoured, "vLLM extension: json_object or json_schema"),
    ("structured_outputs", Honoured, "vLLM extension, as in chat"),
    ("guided_json", Honoured, "vLLM extension"),
    ("guided_regex", Honoured, "vLLM extension"),
    ("guided_choice", Honoured, "vLLM extension"),
    ("guided_grammar", Honoured, "vLLM extension (Lark)"),
    ("return_prompt_token_ids", Honoured, "dsvl extension"),
];

fields![
    /// OpenAI's `response_format` object and its `json_schema`, in either endpoint's body.
    RESPONSE_FORMAT_FIELDS:
    ("response_format.type", Honoured, "text, json_object or json_schema"),
    ("response_format.json_schema", Honoured, "with type json_schema"),
    ("response_format.json_schema.name", NoOp, "the schema's name labels nothing here"),
    ("response_format.json_schema.description", NoOp, "a description for the model; the schema is enforced by grammar instead"),
    ("response_format.json_schema.schema", Honoured, "the JSON schema the reply matches"),
    ("response_format.json_schema.strict", NoOp, "the schema is enforced whether strict is set or not"),
];

fields![
    /// OpenAI's `stream_options` object, in either endpoint's body.
    STREAM_OPTION_FIELDS:
    ("stream_options.include_usage", Honoured, "a last chunk with the usage (no choices)"),
    ("stream_options.continuous_usage_stats", Honoured, "vLLM extension, with include_usage (vLLM ignores it without): every chunk of a choice carries usage, its prompt and its tokens so far (a chat stream's opening role chunks the prompt and 0); the last chunk the whole reply's"),
    ("stream_options.include_obfuscation", NoOp, "OpenAI's padding against length side channels; chunks here carry none"),
];

fields![
    /// vLLM's `structured_outputs` object, in either endpoint's body.
    STRUCTURED_OUTPUT_FIELDS:
    ("structured_outputs.json", Honoured, "a JSON schema (an object, or JSON text), compiled without free whitespace"),
    ("structured_outputs.regex", Honoured, "a regular expression the whole reply matches"),
    ("structured_outputs.choice", Honoured, "the reply is exactly one of these strings"),
    ("structured_outputs.grammar", Honoured, "a Lark grammar (llguidance's dialect)"),
    ("structured_outputs.json_object", Honoured, "true: any JSON object"),
    ("structured_outputs.disable_fallback", NoOp, "one grammar engine here (llguidance): nothing to fall back from"),
    ("structured_outputs.disable_any_whitespace", NoOp, "JSON is always generated without free whitespace"),
    ("structured_outputs.disable_additional_properties", Refused, "schemas are enforced as written"),
    ("structured_outputs.whitespace_pattern", Refused, "JSON is generated without free whitespace"),
    ("structured_outputs.structural_tag", Refused, "structural tags are not implemented"),
];

fn check_object(
    table: &[Field],
    obj: &serde_json::Map<String, Value>,
    prefix: &str,
) -> Result<(), String> {
    for (k, v) in obj {
        let path = if prefix.is_empty() { k.clone() } else { format!("{prefix}.{k}") };
        match table.iter().find(|f| f.path == path) {
            Some(f) if f.treatment != Refused || v.is_null() => {}
            Some(f) => return Err(format!("`{path}` is not supported: {}", f.why)),
            None => return Err(format!("unknown field `{path}`")),
        }
    }
    Ok(())
}

/// [`check`] for a `/v1/completions` body.
pub fn check_completions(body: &Value) -> Result<(), String> {
    let Some(top) = body.as_object() else { return Ok(()) };
    check_object(COMPLETION_FIELDS, top, "")?;
    check_shared_objects(top)
}

/// The keys of the objects both endpoints take, `stream_options`, `response_format` and vLLM's
/// `structured_outputs`, when they are objects.
fn check_shared_objects(top: &serde_json::Map<String, Value>) -> Result<(), String> {
    for (key, table) in [
        ("stream_options", STREAM_OPTION_FIELDS),
        ("structured_outputs", STRUCTURED_OUTPUT_FIELDS),
        ("response_format", RESPONSE_FORMAT_FIELDS),
    ] {
        if let Some(inner) = top.get(key).and_then(Value::as_object) {
            check_object(table, inner, key)?;
        }
    }
    let schema = top.get("response_format").and_then(|f| f.get("json_schema"));
    if let Some(inner) = schema.and_then(Value::as_object) {
        check_object(RESPONSE_FORMAT_FIELDS, inner, "response_format.json_schema")?;
    }
    Ok(())
}

/// An object checked against `table` under `path`, and its object at `inner` under
/// `path.inner` (anything not an object is left to the field's parser).
fn check_with_inner(table: &[Field], item: &Value, path: &str, inner: &str) -> Result<(), String> {
    let Some(item) = item.as_object() else { return Ok(()) };
    check_object(table, item, path)?;
    match item.get(inner).and_then(Value::as_object) {
        Some(obj) => check_object(table, obj, &format!("{path}.{inner}")),
        None => Ok(()),
    }
}

/// [`check_with_inner`] for each item of `list`, when it is an array.
fn check_list(
    table: &[Field],
    list: Option<&Value>,
    path: &str,
    inner: &str,
) -> Result<(), String> {
    for item in list.and_then(Value::as_array).into_iter().flatten() {
        check_with_inner(table, item, path, inner)?;
    }
    Ok(())
}

/// Refuses a request body that carries a refused or unknown field, naming it, or more
/// messages than a request may have (before walking them: a body of 100,000 messages is
/// refused at once).
pub fn check(body: &Value) -> Result<(), String> {
    let Some(top) = body.as_object() else { return Ok(()) };
    let messages = top.get("messages").and_then(Value::as_array).map_or(0, Vec::len);
    if messages > MAX_MESSAGES {
        return Err(format!("{messages} messages; at most {MAX_MESSAGES}"));
    }
    check_object(FIELDS, top, "")?;
    check_shared_objects(top)?;
    check_list(FIELDS, top.get("tools"), "tools[]", "function")?;
    if let Some(choice) = top.get("tool_choice") {
        check_with_inner(FIELDS, choice, "tool_choice", "function")?;
    }
    for m in top.get("messages").and_then(Value::as_array).into_iter().flatten() {
        let Some(m) = m.as_object() else { continue };
        check_object(FIELDS, m, "messages[]")?;
        check_list(FIELDS, m.get("tool_calls"), "messages[].tool_calls[]", "function")?;
        for p in m.get("content").and_then(Value::as_array).into_iter().flatten() {
            let Some(p) = p.as_object() else { continue };
            check_object(FIELDS, p, "messages[].content[]")?;
            if let Some(img) = p.get("image_url").and_then(Value::as_object) {
                check_object(FIELDS, img, "messages[].content[].image_url")?;
            }
        }
    }
    Ok(())
}

/// The reference page, in Markdown.
pub fn reference_page() -> String {
    let mut out = String::from(
        "# OpenAI request fields\n\nGenerated from `services/gateway/src/openai_fields.rs` (a test \
         keeps this file equal to it). Every field of a request body, and what the gateway does \
         with it. A field not listed here is refused with a 400 naming it, as is a refused field \
         that is present and not null; a no-op is accepted and cannot change the output of these \
         models.\n",
    );
    for (title, table) in [
        ("POST /v1/chat/completions", FIELDS),
        ("POST /v1/completions", COMPLETION_FIELDS),
        ("response_format (either endpoint)", RESPONSE_FORMAT_FIELDS),
        ("stream_options (either endpoint)", STREAM_OPTION_FIELDS),
        ("structured_outputs (either endpoint)", STRUCTURED_OUTPUT_FIELDS),
    ] {
        out.push_str(&format!("\n## `{title}`\n\n| field | treatment | why |\n|---|---|---|\n"));
        for f in table {
            let t = match f.treatment {
                Honoured => "honoured",
                NoOp => "accepted, no-op",
                Refused => "refused (400)",
            };
            out.push_str(&format!("| `{}` | {t} | {} |\n", f.path, f.why));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn unknown_and_refused_fields_are_named() {
        let ok = json!({"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:,", "detail": "high"}}]}],
            "user": "u1", "audio": null});
        assert_eq!(check(&ok), Ok(()));
        let e = check(&json!({"messages": [], "audio": {"voice": "x"}})).unwrap_err();
        assert!(e.starts_with("`audio` is not supported"), "{e}");
        let e = check(&json!({"messages": [], "frobnicate": 1})).unwrap_err();
        assert_eq!(e, "unknown field `frobnicate`");
        let e = check(&json!({"messages": [{"role": "user", "name": "bob", "content": "hi"}]}))
            .unwrap_err();
        assert!(e.starts_with("`messages[].name` is not supported"), "{e}");
        let e = check(&json!({"messages": [{"role": "user", "content": [
            {"type": "text", "text": "x", "cache_control": {}}]}]}))
        .unwrap_err();
        assert_eq!(e, "unknown field `messages[].content[].cache_control`");
        let so = |v: Value| json!({"messages": [], "structured_outputs": v});
        assert_eq!(check(&so(json!({"choice": ["a"], "disable_fallback": true}))), Ok(()));
        let e = check(&so(json!({"regex": "a", "whitespace_pattern": " "}))).unwrap_err();
        assert!(e.starts_with("`structured_outputs.whitespace_pattern` is not supported"), "{e}");
        let e = check_completions(&json!({"prompt": "x", "structured_outputs": {"jsn": {}}}))
            .unwrap_err();
        assert_eq!(e, "unknown field `structured_outputs.jsn`");
        let streamed = |v: Value| json!({"prompt": "x", "stream": true, "stream_options": v});
        assert_eq!(check_completions(&streamed(json!({"include_usage": true}))), Ok(()));
        let e = check_completions(&streamed(json!({"include_obfuscation": true, "x": 1})));
        assert_eq!(e, Err("unknown field `stream_options.x`".to_string()));
        let e = check(&json!({"messages": [], "stream_options": {"include_usge": true}}));
        assert_eq!(e, Err("unknown field `stream_options.include_usge`".to_string()));

        // Nested objects: tools, tool_choice, an assistant turn's calls, response_format.
        let tool = json!({"type": "function", "function": {"name": "f", "description": "d",
            "parameters": {"type": "object", "properties": {"x": {}}}, "strict": true}});
        let call = json!({"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}});
        let fine = json!({"messages": [{"role": "assistant", "tool_calls": [call]}], "tools": [tool],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": {}, "strict": true}}});
        assert_eq!(check(&fine), Ok(()), "a parameters schema's own keys are not checked");
        for (pointer, key, path) in [
            ("/tools/0/function", "strictt", "tools[].function.strictt"),
            ("/tools/0", "cache_control", "tools[].cache_control"),
            ("/tool_choice/function", "args", "tool_choice.function.args"),
            (
                "/messages/0/tool_calls/0/function",
                "argument",
                "messages[].tool_calls[].function.argument",
            ),
            ("/response_format/json_schema", "schemaa", "response_format.json_schema.schemaa"),
            ("/response_format", "schema", "response_format.schema"),
        ] {
            let mut body = fine.clone();
            body.pointer_mut(pointer).unwrap()[key] = json!(1);
            assert_eq!(check(&body), Err(format!("unknown field `{path}`")), "{pointer}");
        }
        let mut body = json!({"prompt": "x", "response_format": {"type": "json_object", "x": 1}});
        assert_eq!(check_completions(&body), Err("unknown field `response_format.x`".to_string()));
        body["response_format"] = json!({"type": "json_object"});
        assert_eq!(check_completions(&body), Ok(()));
    }

    #[test]
    fn the_reference_page_is_current() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../OPENAI_FIELDS.md");
        let page = reference_page();
        if std::env::var_os("DSVL_WRITE_REFERENCE").is_some() {
            std::fs::write(path, &page).unwrap();
        }
        let on_disk = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            on_disk == page,
            "services/OPENAI_FIELDS.md is stale: run `DSVL_WRITE_REFERENCE=1 cargo test -p dsvl-gateway openai_fields`"
        );
    }
}
