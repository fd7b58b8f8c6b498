//! Log output for people and for machines.
//!
//! * [`LogFormat::Text`]: tracing's human format, with colours only when stderr is a terminal
//!   (and `NO_COLOR` is unset): a file or a pipe never receives ANSI escape codes.
//! * [`LogFormat::Json`]: one JSON object per line, for log collectors. Besides `timestamp`,
//!   `level`, `target`, `message` and the event's own fields, each line carries the
//!   innermost enclosing span's name (`span`) and, hoisted from the enclosing spans, the
//!   `request_id` and the OpenTelemetry `trace_id` and `span_id` of the request it belongs
//!   to. Request spans declare those fields; [`crate::extract_trace_context`] fills the ids in
//!   when tracing is on.
//!
//! The format comes from `--log-format` or `DSVL_LOG_FORMAT` ([`LogArgs`]); any other value is
//! refused at start with the accepted ones named (clap's `ValueEnum`).

use std::io::{IsTerminal, Write};

use serde_json::{Map, Value};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::time::FormatTime;
use tracing_subscriber::fmt::MakeWriter;
use tracing_subscriber::layer::Context;
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal only).
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

/// The `--log-format` flag every dsvl binary shares.
#[derive(Debug, Clone, Copy, Default, clap::Args)]
pub struct LogArgs {
    /// Log line format: `text` for people, `json` for log collectors (one object per line
    /// with the request id and, when tracing is on, the trace and span ids).
    #[arg(long, env = "DSVL_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

impl LogFormat {
    /// The flag value (`text` or `json`), for passing the format on to child processes.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Text => "text",
            Self::Json => "json",
        }
    }
}

/// Whether text logs on stderr may use colour: only on a terminal, and never with `NO_COLOR`.
pub fn ansi_on_stderr() -> bool {
    std::io::stderr().is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// Span fields copied onto every JSON line of an event inside the span, under these names
/// (the first name is the output key; the others are spellings that some spans use).
const HOISTED: &[(&str, &[&str])] = &[
    ("request_id", &["request_id", "gen_ai.response.id"]),
    ("trace_id", &["trace_id"]),
    ("span_id", &["span_id"]),
];

/// The recorded fields of a span, kept in its extensions.
struct SpanFields(Map<String, Value>);

/// Collects fields as JSON values.
struct JsonVisitor<'a>(&'a mut Map<String, Value>);

impl Visit for JsonVisitor<'_> {
    fn record_f64(&mut self, field: &Field, value: f64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_i64(&mut self, field: &Field, value: i64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_u64(&mut self, field: &Field, value: u64) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_bool(&mut self, field: &Field, value: bool) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        self.0.insert(field.name().into(), Value::from(value));
    }
    fn record_error(&mut self, field: &Field, value: &(dyn std::error::Error + 'static)) {
        self.0.insert(field.name().into(), Value::from(value.to_string()));
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        self.0.insert(field.name().into(), Value::from(format!("{value:?}")));
    }
}

/// The JSON-lines layer; see the module docs.
pub struct JsonLayer<W> {
    make_writer: W,
}

impl<W> JsonLayer<W> {
    /// Writes one line per event to writers from `make_writer` (stderr in services).
    pub fn new(make_writer: W) -> Self {
        Self { make_writer }
    }
}

impl<S, W> Layer<S> for JsonLayer<W>
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    W: for<'a> MakeWriter<'a> + 'static,
{
    fn on_new_span(&self, attrs: &Attributes<'_>, id: &Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut fields = Map::new();
        attrs.record(&mut JsonVisitor(&mut fields));
        span.extensions_mut().insert(SpanFields(fields));
    }

    fn on_record(&self, id: &Id, values: &Record<'_>, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(id) else { return };
        let mut ext = span.extensions_mut();
        if let Some(SpanFields(fields)) = ext.get_mut::<SpanFields>() {
            values.record(&mut JsonVisitor(fields));
        }
    }

    fn on_event(&self, event: &Event<'_>, ctx: Context<'_, S>) {
        let meta = event.metadata();
        let mut timestamp = String::new();
        let _ =
            tracing_subscriber::fmt::time::SystemTime.format_time(&mut Writer::new(&mut timestamp));
        let mut line = Map::new();
        line.insert("timestamp".into(), Value::from(timestamp));
        line.insert("level".into(), Value::from(meta.level().as_str()));
        line.insert("target".into(), Value::from(meta.target()));
        let mut fields = Map::new();
        event.record(&mut JsonVisitor(&mut fields));
        if let Some(message) = fields.remove("message") {
            line.insert("message".into(), message);
        }
        if let Some(scope) = ctx.event_scope(event) {
            for (depth, span) in scope.enumerate() {
                if depth == 0 {
                    line.insert("span".into(), Value::from(span.name()));
                }
                let ext = span.extensions();
                let Some(SpanFields(span_fields)) = ext.get::<SpanFields>() else { continue };
                for (key, spellings) in HOISTED {
                    if line.contains_key(*key) {
                        continue;
                    }
                    if let Some(v) = spellings.iter().find_map(|s| span_fields.get(*s)) {
                        line.insert((*key).into(), v.clone());
                    }
                }
            }
        }
        // The event's own fields last, never over the line's envelope.
        for (k, v) in fields {
            line.entry(k).or_insert(v);
        }
        let Ok(mut bytes) = serde_json::to_vec(&Value::Object(line)) else { return };
        bytes.push(b'\n');
        let _ = self.make_writer.make_writer_for(meta).write_all(&bytes);
    }
}

#[cfg(test)]
mod tests {
    use dsvl_testkit::CapturedLog;
    use tracing_subscriber::layer::SubscriberExt;

    use super::*;

    fn lines(c: &CapturedLog) -> Vec<Value> {
        c.text().lines().map(|l| serde_json::from_str(l).expect("every line is JSON")).collect()
    }

    #[test]
    fn json_lines_hoist_the_request_and_trace_ids_of_enclosing_spans() {
        let out = CapturedLog::default();
        let sink = out.clone();
        let subscriber = tracing_subscriber::registry().with(JsonLayer::new(move || sink.clone()));
        tracing::subscriber::with_default(subscriber, || {
            tracing::info!(answer = 42, "outside any span");
            let request = tracing::info_span!(
                "chat",
                gen_ai.response.id = tracing::field::Empty,
                trace_id = tracing::field::Empty,
                span_id = tracing::field::Empty
            );
            request.record("gen_ai.response.id", "gw-1-7");
            request.record("trace_id", "4bf92f3577b34da6a3ce929d0e0e4736");
            request.record("span_id", "00f067aa0ba902b7");
            let _r = request.enter();
            let inner = tracing::debug_span!("prefill", request_id = "inner-wins");
            let _i = inner.enter();
            tracing::warn!(error = %"boom", level = "not the envelope", "inside");
        });
        let lines = lines(&out);
        assert_eq!(lines.len(), 2);
        let outside = &lines[0];
        assert_eq!(outside["message"], "outside any span");
        assert_eq!(outside["answer"], 42);
        assert_eq!(outside["level"], "INFO");
        assert!(outside.get("request_id").is_none() && outside.get("span").is_none());
        let ts = outside["timestamp"].as_str().unwrap();
        assert!(ts.len() >= 20 && ts.ends_with('Z') && ts.contains('T'), "RFC 3339: {ts}");
        let inside = &lines[1];
        assert_eq!(inside["message"], "inside");
        assert_eq!(inside["level"], "WARN", "an event field never overwrites the envelope");
        assert_eq!(inside["span"], "prefill");
        assert_eq!(inside["request_id"], "inner-wins", "the innermost span's id wins");
        assert_eq!(inside["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(inside["span_id"], "00f067aa0ba902b7");
        assert_eq!(inside["error"], "boom");
    }

    #[test]
    fn an_unknown_log_format_names_the_accepted_values() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            logs: LogArgs,
        }
        assert_eq!(Cli::parse_from(["x"]).logs.log_format, LogFormat::Text);
        assert_eq!(Cli::parse_from(["x", "--log-format", "json"]).logs.log_format, LogFormat::Json);
        let err = Cli::try_parse_from(["x", "--log-format", "yaml"]).err().unwrap().to_string();
        assert!(err.contains("yaml") && err.contains("text") && err.contains("json"), "{err}");
    }
}
