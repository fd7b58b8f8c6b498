//! The client and both loops against a small OpenAI-shaped server on loopback: tokens and
//! latencies come from the stream as it arrives, `[DONE]` without a finish is a cut stream, an
//! error status is its class, and every request sent is counted exactly once.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::routing::{get, post};
use axum::Router;
use dsvl_loadgen::{
    run, Client, ConnectOptions, Load, Message, Mode, Part, Report, Slo, TlsFiles, Until, WorkItem,
    Workload,
};
use serde_json::{json, Map, Value};

/// Streams three one-token chunks 40 ms apart, then a finish, usage and `[DONE]`; the prompt
/// `cut` ends after the first chunk without `[DONE]`, `busy` is a 503.
async fn chat(counter: Arc<AtomicUsize>, body: String) -> axum::response::Response {
    counter.fetch_add(1, Ordering::SeqCst);
    let v: Value = serde_json::from_str(&body).unwrap();
    let prompt = v["messages"][0]["content"][0]["text"].as_str().unwrap_or("").to_string();
    assert_eq!(v["stream"], true);
    assert_eq!(v["model"], "m");
    if prompt == "busy" {
        return axum::response::Response::builder().status(503).body(Body::from("{}")).unwrap();
    }
    let chunk = |content: &str, finish: Value| {
        format!(
            "data: {}\n\n",
            json!({"choices": [{"delta": {"content": content}, "finish_reason": finish}]})
        )
    };
    let mut events =
        vec![chunk("a", Value::Null), chunk("b", Value::Null), chunk("c", Value::Null)];
    if prompt == "cut" {
        events.truncate(1);
    } else {
        events.push(chunk("", json!("length")));
        events.push(format!(
            "data: {}\n\n",
            json!({"choices": [], "usage": {"completion_tokens": 3}})
        ));
        events.push("data: [DONE]\n\n".into());
    }
    let stream = futures::stream::iter(events).then(|e| async move {
        tokio::time::sleep(Duration::from_millis(40)).await;
        Ok::<_, std::convert::Infallible>(e)
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap()
}

use futures::StreamExt;

async fn server() -> (String, Arc<AtomicUsize>) {
    let counter = Arc::new(AtomicUsize::new(0));
    let c = counter.clone();
    let app = Router::new()
        .route("/v1/models", get(|| async { axum::Json(json!({"data": [{"id": "m"}]})) }))
        .route("/v1/chat/completions", post(move |body: String| chat(c.clone(), body)));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (format!("http://{addr}"), counter)
}

fn item(text: &str) -> WorkItem {
    WorkItem {
        kind: text.into(),
        messages: vec![Message { role: "user".into(), parts: vec![Part::Text(text.into())] }],
        max_tokens: 3,
        timeout: None,
        extra: Map::new(),
    }
}

fn load(mode: Mode, n: usize) -> Load {
    Load {
        mode,
        until: Until::Requests(n),
        deadline: Duration::from_secs(5),
        hang_after: Duration::from_secs(2),
        warmup: 0,
        seed: 1,
        first_index: 0,
        progress: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outcomes_follow_the_stream_and_each_request_counts_once() {
    let (url, served) = server().await;
    let client = Client::connect(&url, ConnectOptions::default()).await.unwrap();
    assert_eq!(client.model(), "m");
    let workload =
        Arc::new(Workload::File { items: vec![item("hi"), item("cut"), item("busy"), item("ok")] });

    let r =
        run(&client, workload.clone(), &load(Mode::Closed { concurrency: 3 }, 12)).await.unwrap();
    assert_eq!(r.outcomes.len(), 12);
    assert_eq!(served.load(Ordering::SeqCst), 12, "each request sent once");
    let report = Report::new(&r.outcomes, r.duration, Slo::default());
    assert_eq!(report.completed, 6);
    assert_eq!(report.errors.get("stream_cut"), Some(&3));
    assert_eq!(report.errors.get("http_503"), Some(&3));
    assert_eq!(report.failed_not_retryable, 3, "a cut stream is not retryable");
    assert_eq!(report.output_tokens, 18, "usage.completion_tokens");
    for o in r.outcomes.iter().filter(|o| o.result.is_ok()) {
        assert!(o.ttft.unwrap() >= Duration::from_millis(35), "{o:?}");
        assert_eq!(o.itl.len(), 2, "three chunks, two gaps");
        assert!(o.itl.iter().all(|g| *g >= Duration::from_millis(30)), "{o:?}");
        assert!(o.e2e >= Duration::from_millis(200), "six events 40 ms apart");
    }

    // Open loop at 100/s: the arrivals do not wait for answers (40 in flight would take
    // 0.25 s each if they did), and every request is counted once.
    let before = served.load(Ordering::SeqCst);
    let t = std::time::Instant::now();
    let open = Mode::Open { rate: 100.0, max_in_flight: None };
    let r = run(&client, Arc::new(Workload::File { items: vec![item("ok")] }), &load(open, 40))
        .await
        .unwrap();
    assert_eq!(r.outcomes.len(), 40);
    assert_eq!(served.load(Ordering::SeqCst) - before, 40);
    assert!(t.elapsed() < Duration::from_secs(3), "open loop took {:?}", t.elapsed());
    assert!(r.outcomes.windows(2).all(|w| w[0].sent_at <= w[1].sent_at));
    assert!(r.outcomes.iter().all(|o| o.result.is_ok()));
}

#[tokio::test]
async fn a_refused_connection_is_a_clear_error_at_start() {
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let e = Client::connect(&format!("http://127.0.0.1:{port}"), ConnectOptions::default())
        .await
        .err()
        .unwrap();
    assert!(e.to_string().contains("/v1/models"), "{e}");
    let e = Client::connect("ftp://x", ConnectOptions::default()).await.err().unwrap();
    assert!(e.to_string().contains("grpc:// or grpcs://"), "{e}");
    // Trust files mean TLS: a plain-text URL with them is a mistake, not silently plain text.
    let e = refusal(&format!("http://127.0.0.1:{port}"), "ca.pem").await;
    assert!(e.contains("https:// or grpcs://"), "{e}");
    // A CA file that is not there is named.
    let e = refusal(&format!("https://127.0.0.1:{port}"), "/nonexistent/ca.pem").await;
    assert!(e.contains("/nonexistent/ca.pem"), "{e}");
}

/// Why connecting to `url` trusting the CA file `ca` fails.
async fn refusal(url: &str, ca: &str) -> String {
    let tls = TlsFiles { ca: Some(ca.into()), identity: None };
    let options = ConnectOptions { tls, ..ConnectOptions::default() };
    Client::connect(url, options).await.err().expect("the connection was refused").to_string()
}
