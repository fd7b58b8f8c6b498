//! W3C trace context end to end: a client's `traceparent` reaches the gateway, the gateway's
//! `chat` span (with the OpenTelemetry GenAI attributes) is its child, and the vision and
//! decoder spans of the same request join the same trace. Spans are received by a small
//! OTLP/gRPC collector run by this test (the services export with their normal
//! `OTEL_EXPORTER_OTLP_ENDPOINT` setting and flush when they stop). The services log JSON
//! lines (`DSVL_LOG_FORMAT=json`), and the gateway's line for the request carries the same
//! trace id, its span id and the request id.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use dsvl_e2e::{golden_image, Cluster, Options};
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;

#[derive(Debug, Clone)]
struct SeenSpan {
    service: String,
    name: String,
    trace_id: Vec<u8>,
    parent_span_id: Vec<u8>,
    attributes: HashMap<String, String>,
}

#[derive(Default, Clone)]
struct Collector(Arc<Mutex<Vec<SeenSpan>>>);

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| &r.attributes)
                .find(|kv| kv.key == "service.name")
                .and_then(|kv| kv.value.as_ref()?.value.as_ref())
                .map(|v| format!("{v:?}"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    let attributes = s
                        .attributes
                        .iter()
                        .map(|kv| {
                            let v = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                                Some(AnyValue::StringValue(s)) => s.clone(),
                                Some(AnyValue::IntValue(i)) => i.to_string(),
                                Some(AnyValue::DoubleValue(d)) => d.to_string(),
                                Some(AnyValue::BoolValue(b)) => b.to_string(),
                                other => format!("{other:?}"),
                            };
                            (kv.key.clone(), v)
                        })
                        .collect();
                    seen.push(SeenSpan {
                        service: service.clone(),
                        name: s.name,
                        trace_id: s.trace_id,
                        parent_span_id: s.parent_span_id,
                        attributes,
                    });
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trace_context_flows_through_every_tier() -> Result<()> {
    let collector = Collector::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = format!("http://{}", listener.local_addr()?);
    let server = TraceServiceServer::new(collector.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(server)
            .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    // SAFETY: this test binary holds this one test; the variable is set before any child
    // process starts and read only by them.
    unsafe {
        std::env::set_var("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint);
        std::env::set_var("DSVL_LOG_FORMAT", "json");
    };

    let cluster = Cluster::start(Options {
        vision_replicas: 1,
        tp: 1,
        capture_logs: true,
        ..Options::default()
    })
    .await?;
    let trace_id = "4bf92f3577b34da6a3ce929d0e0e4736";
    let mut req = tonic::Request::new(ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![
                ContentPart { part: Some(Part::Image(golden_image("chelsea.png")?.into())) },
                ContentPart { part: Some(Part::Text("What is this?".into())) },
            ],
        }],
        // Greedy: the golden ids.
        sampling: Some(dsvl_proto::v1::SamplingParams {
            temperature: Some(0.0),
            ..Default::default()
        }),
        max_tokens: 3,
        ..Default::default()
    });
    req.metadata_mut().insert("traceparent", format!("00-{trace_id}-00f067aa0ba902b7-01").parse()?);
    let mut stream = cluster.chat().await?.generate(req).await?.into_inner();
    while stream.message().await?.is_some() {}
    check_json_logs(&cluster, trace_id);
    drop(cluster); // SIGTERM: each service flushes its spans on the way out.

    let want = hex(trace_id);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let spans: Vec<SeenSpan> =
            collector.0.lock().unwrap().iter().filter(|s| s.trace_id == want).cloned().collect();
        let find = |name: &str| spans.iter().find(|s| s.name == name).cloned();
        if let (Some(chat), Some(vision), Some(decoder)) =
            (find("chat"), find("vision.encode"), find("decoder.generate"))
        {
            assert_eq!(
                chat.parent_span_id,
                hex("00f067aa0ba902b7"),
                "the gateway span continues the client's trace"
            );
            assert!(
                chat.service.contains("dsvl-gateway")
                    && vision.service.contains("dsvl-vision")
                    && decoder.service.contains("dsvl-decoder")
            );
            for (k, v) in [
                ("gen_ai.operation.name", "chat"),
                ("gen_ai.request.model", "tiny-dsvl"),
                ("gen_ai.usage.output_tokens", "3"),
                ("gen_ai.response.finish_reasons", "length"),
            ] {
                assert_eq!(
                    chat.attributes.get(k).map(String::as_str),
                    Some(v),
                    "{k} in {:?}",
                    chat.attributes
                );
            }
            assert!(
                chat.attributes.contains_key("gen_ai.usage.input_tokens")
                    && chat.attributes.contains_key("gen_ai.response.id")
            );
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "spans of the trace: {:?}",
            spans.iter().map(|s| (&s.service, &s.name)).collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Every service wrote JSON lines without colour codes; the gateway's access line of the
/// request carries the client's trace id, a span id and the request id, and the vision tier's
/// line of the same request the same trace and request ids.
fn check_json_logs(cluster: &Cluster, trace_id: &str) {
    let lines = |svc: &dsvl_e2e::Svc| -> Vec<serde_json::Value> {
        let log = svc.proc.logs();
        assert!(!log.is_empty(), "the service logged something");
        assert!(!log.contains('\u{1b}'), "no ANSI escape codes in a log file:\n{log}");
        log.lines()
            .map(|line| {
                serde_json::from_str(line)
                    .unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"))
            })
            .collect()
    };
    let gateway_lines = lines(&cluster.gateway);
    let vision_lines = lines(&cluster.vision[0]);
    lines(&cluster.decoder);
    let finished = gateway_lines
        .iter()
        .find(|l| l["message"] == "request finished")
        .unwrap_or_else(|| panic!("no access line in {gateway_lines:#?}"));
    assert_eq!(finished["level"], "INFO");
    assert_eq!(finished["trace_id"], trace_id, "{finished}");
    let span_id = finished["span_id"].as_str().unwrap_or_default();
    assert!(
        span_id.len() == 16 && span_id != "00f067aa0ba902b7",
        "the gateway's own span: {finished}"
    );
    let request_id = finished["request_id"].as_str().unwrap_or_default();
    assert!(request_id.starts_with("gw-"), "{finished}");
    let encoded = vision_lines
        .iter()
        .find(|l| l["message"] == "images encoded")
        .unwrap_or_else(|| panic!("no access line in {vision_lines:#?}"));
    assert_eq!(encoded["request_id"], request_id, "{encoded}");
    assert_eq!(encoded["trace_id"], trace_id, "{encoded}");
    assert_eq!(finished["completion_tokens"], 3);
}

fn hex(s: &str) -> Vec<u8> {
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
}
