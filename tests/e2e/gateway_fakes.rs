//! The gateway (its library `run`, in process) against fake vision and decoder tiers: small
//! in-process gRPC servers that implement the internal contracts and script their answers.
//! Fast tests of the gateway's own logic, without models: the typed re-encode signal, and
//! `echo` with `logprobs` against a decoder that ignores `prompt_logprobs`.

use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Parser;
use dsvl_proto::internal::decoder_server::{Decoder, DecoderServer};
use dsvl_proto::internal::encode_result::Result as EncodeOutcome;
use dsvl_proto::internal::generate_response::Event as GenEvent;
use dsvl_proto::internal::image_slot::Embedding as Slot;
use dsvl_proto::internal::vision_encoder_server::{VisionEncoder, VisionEncoderServer};
use dsvl_proto::internal::{
    DType, Embedding, EmbeddingRef, EncodeRequest, EncodeResponse, EncodeResult, FinishEvent,
    FinishReason, GenerateRequest, GenerateResponse, InfoRequest, InfoResponse, LoadRequest,
    LoadResponse, TokenEvent, Usage,
};
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart, SamplingParams};
use dsvl_telemetry::server::GrpcBase;
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

const TOKENS_PER_IMAGE: u32 = 4;
const HIDDEN: u32 = 2;

/// Answers every image with a reference, or inline when asked; counts the calls.
#[derive(Default)]
struct FakeVision {
    calls: Mutex<Vec<bool>>,
}

#[tonic::async_trait]
impl VisionEncoder for FakeVision {
    async fn encode(&self, r: Request<EncodeRequest>) -> Result<Response<EncodeResponse>, Status> {
        let r = r.into_inner();
        self.calls.lock().unwrap().push(r.return_inline);
        let results = r
            .images
            .iter()
            .map(|_| EncodeResult {
                result: Some(if r.return_inline {
                    EncodeOutcome::Inline(Embedding {
                        shape: vec![TOKENS_PER_IMAGE, HIDDEN],
                        dtype: DType::DtypeF32 as i32,
                        data: vec![0u8; (TOKENS_PER_IMAGE * HIDDEN * 4) as usize].into(),
                        model_fingerprint: "fake".into(),
                    })
                } else {
                    EncodeOutcome::Ref(EmbeddingRef {
                        key: "dsvl:emb:v2:fake".into(),
                        shape: vec![TOKENS_PER_IMAGE, HIDDEN],
                        dtype: DType::DtypeF32 as i32,
                        model_fingerprint: "fake".into(),
                        stored_bytes: 0,
                    })
                }),
                cache_hit: false,
                key: "dsvl:emb:v2:fake".into(),
            })
            .collect();
        Ok(Response::new(EncodeResponse { results }))
    }

    async fn info(&self, _: Request<InfoRequest>) -> Result<Response<InfoResponse>, Status> {
        Ok(Response::new(InfoResponse {
            model_fingerprint: "fake".into(),
            tokens_per_image: TOKENS_PER_IMAGE,
            hidden_size: HIDDEN,
            dtype: DType::DtypeF32 as i32,
            shared_cache: true,
            ..Default::default()
        }))
    }
}

/// Refuses referenced embeddings with `refusal`; streams three tokens for inline ones.
struct FakeDecoder {
    refusal: fn() -> Status,
    calls: AtomicUsize,
    /// The requests it was sent, in order.
    seen: Mutex<Vec<GenerateRequest>>,
}

impl FakeDecoder {
    fn new(refusal: fn() -> Status) -> Self {
        Self { refusal, calls: AtomicUsize::new(0), seen: Mutex::new(Vec::new()) }
    }
}

type GenStream = Pin<Box<dyn futures::Stream<Item = Result<GenerateResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Decoder for FakeDecoder {
    type GenerateStream = GenStream;

    async fn generate(&self, r: Request<GenerateRequest>) -> Result<Response<GenStream>, Status> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let r = r.into_inner();
        self.seen.lock().expect("not poisoned").push(r.clone());
        if r.images.iter().any(|s| matches!(s.embedding, Some(Slot::Ref(_)))) {
            return Err((self.refusal)());
        }
        let mut events: Vec<Result<GenerateResponse, Status>> = (0..3)
            .map(|i| {
                Ok(GenerateResponse {
                    event: Some(GenEvent::Token(TokenEvent {
                        id: 10 + i,
                        logprob: 0.0,
                        index: i,
                        cached_tokens: 0,
                        top_logprobs: vec![],
                        prompt_logprobs: vec![],
                    })),
                })
            })
            .collect();
        events.push(Ok(GenerateResponse {
            event: Some(GenEvent::Finish(FinishEvent {
                reason: FinishReason::Length as i32,
                usage: Some(Usage {
                    prompt_tokens: r.prompt_token_ids.len() as u32,
                    completion_tokens: 3,
                    ..Default::default()
                }),
            })),
        }));
        Ok(Response::new(Box::pin(futures::stream::iter(events))))
    }

    async fn load(&self, _: Request<LoadRequest>) -> Result<Response<LoadResponse>, Status> {
        Ok(Response::new(LoadResponse {
            ready: true,
            tensor_parallel: 1,
            max_positions: 16384,
            ..Default::default()
        }))
    }
}

/// Serves `svc` on a free port with health SERVING for `S`; returns the address.
async fn serve<S>(svc: S) -> Result<String>
where
    S: tonic::codegen::Service<
            http::Request<tonic::body::Body>,
            Response = http::Response<tonic::body::Body>,
            Error = std::convert::Infallible,
        > + tonic::server::NamedService
        + Clone
        + Send
        + Sync
        + 'static,
    S::Future: Send + 'static,
{
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let GrpcBase { health, drain, router, .. } = GrpcBase::new::<S>(&[]).await?;
    dsvl_telemetry::probes::set_ready::<S>(&health, true).await;
    tokio::spawn(async move {
        let _keep = health;
        router
            .add_service(svc)
            .serve_with_incoming_shutdown(
                dsvl_telemetry::incoming_nodelay(listener),
                drain.stopped(),
            )
            .await
    });
    Ok(addr)
}

/// The gateway on free ports against `vision` and `decoder`; its gRPC address.
async fn gateway(vision: &str, decoder: &str) -> Result<String> {
    Ok(gateway_with_http(vision, decoder).await?.0)
}

/// The gateway on free ports against `vision` and `decoder`; its gRPC and HTTP addresses.
async fn gateway_with_http(vision: &str, decoder: &str) -> Result<(String, String)> {
    let grpc = TcpListener::bind("127.0.0.1:0").await?;
    let http = TcpListener::bind("127.0.0.1:0").await?;
    let addr = grpc.local_addr()?.to_string();
    let http_addr = http.local_addr()?.to_string();
    let args = dsvl_gateway::Args::parse_from([
        "dsvl-gateway",
        "--vision",
        vision,
        "--decoder",
        decoder,
        "--refresh-secs",
        "1",
        "--allow-unauthenticated",
        "--insecure",
    ]);
    let cfg = dsvl_gateway::GatewayConfig::try_from(&args)?;
    tokio::spawn(dsvl_gateway::run(cfg, grpc, http, std::future::pending()));
    Ok((addr, http_addr))
}

async fn chat_with_image(gateway: &str) -> Result<Result<Vec<u32>, Status>> {
    let png = dsvl_e2e::golden_image("chelsea.png")?;
    let request = ChatRequest {
        messages: vec![ChatMessage {
            role: "user".into(),
            content: vec![
                ContentPart { part: Some(Part::Image(png.into())) },
                ContentPart { part: Some(Part::Text("What is this?".into())) },
            ],
        }],
        sampling: Some(SamplingParams { temperature: Some(0.0), ..Default::default() }),
        max_tokens: 3,
        ..Default::default()
    };
    // The gateway becomes ready once it has polled both fakes.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut client = ChatClient::connect(format!("http://{gateway}"))
            .await?
            .max_encoding_message_size(64 << 20);
        match client.generate(request.clone()).await {
            Err(s) if s.code() == tonic::Code::Unavailable && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(s) => return Ok(Err(s)),
            Ok(stream) => {
                let mut stream = stream.into_inner();
                while let Some(m) = stream.message().await? {
                    if let Some(Event::Finish(f)) = m.event {
                        return Ok(Ok(f.token_ids));
                    }
                }
                anyhow::bail!("no finish");
            }
        }
    }
}

/// A decoder that answers with the typed re-encode signal gets the embedding inline on the
/// second try, and the request succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typed_reencode_signal_resends_inline() -> Result<()> {
    let vision = Arc::new(FakeVision::default());
    let decoder = Arc::new(FakeDecoder::new(|| {
        dsvl_proto::convert::embedding_unavailable("embedding gone: re-encode")
    }));
    let v = serve(VisionEncoderServer::from_arc(vision.clone())).await?;
    let d = serve(DecoderServer::from_arc(decoder.clone())).await?;
    let g = gateway(&v, &d).await?;
    let ids = chat_with_image(&g).await?.map_err(|s| anyhow::anyhow!("{s:?}"))?;
    assert_eq!(ids, [10, 11, 12]);
    assert_eq!(*vision.calls.lock().unwrap(), [false, true], "encoded by reference, then inline");
    assert_eq!(decoder.calls.load(Ordering::SeqCst), 2);
    Ok(())
}

/// A bare FAILED_PRECONDITION (no typed detail) is an error for the client, not a re-encode:
/// the gateway acts on the typed reason only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untyped_precondition_is_not_a_reencode() -> Result<()> {
    let vision = Arc::new(FakeVision::default());
    let decoder = Arc::new(FakeDecoder::new(|| Status::failed_precondition("something else")));
    let v = serve(VisionEncoderServer::from_arc(vision.clone())).await?;
    let d = serve(DecoderServer::from_arc(decoder.clone())).await?;
    let g = gateway(&v, &d).await?;
    let err = chat_with_image(&g).await?.err().ok_or_else(|| anyhow::anyhow!("succeeded"))?;
    assert_ne!(err.code(), tonic::Code::Ok, "{err:?}");
    assert_eq!(*vision.calls.lock().unwrap(), [false], "no inline re-encode");
    assert_eq!(decoder.calls.load(Ordering::SeqCst), 1);
    Ok(())
}

/// A decoder that ignores `prompt_logprobs` (as one older than the field would) leaves the
/// prompt unscored: `echo` with `logprobs` is then an error that says so, not an echo without
/// figures; `echo` alone needs nothing from the decoder and works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn echo_logprobs_from_a_decoder_that_ignores_them_is_an_error() -> Result<()> {
    let vision = Arc::new(FakeVision::default());
    let decoder = Arc::new(FakeDecoder::new(|| Status::internal("no images here")));
    let v = serve(VisionEncoderServer::from_arc(vision)).await?;
    let d = serve(DecoderServer::from_arc(decoder)).await?;
    let (_, http) = gateway_with_http(&v, &d).await?;
    let scored =
        serde_json::json!({"prompt": [5, 6, 7], "echo": true, "logprobs": 1, "max_tokens": 1});
    let at = http.clone();
    let r = tokio::task::spawn_blocking(move || post_when_ready(&at, &scored)).await??;
    assert_eq!(r.status, 500, "{}", r.body);
    assert!(r.body.contains("scored 0 of the prompt's 2 later tokens"), "{}", r.body);
    let plain = serde_json::json!({"prompt": [5, 6, 7], "echo": true, "max_tokens": 1});
    let r = tokio::task::spawn_blocking(move || post_when_ready(&http, &plain)).await??;
    assert_eq!(r.status, 200, "{}", r.body);
    Ok(())
}

/// `body` posted to the gateway's `/v1/completions` at `http`, again while it answers 503 (until
/// it has polled the fakes, for at most 30 s).
fn post_when_ready(http: &str, body: &serde_json::Value) -> Result<dsvl_e2e::HttpResponse> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let r = dsvl_e2e::http_post(http, "/v1/completions", &[], body)?;
        if r.status != 503 || Instant::now() > deadline {
            return Ok(r);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// vLLM's request extensions reach the decoder as its contract says: the priority, the minimum,
/// the allowed ids, the bad words tokenized, the prompt truncated, and a cache salt of the
/// request's own (another than the tenant's alone).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vllm_extensions_reach_the_decoder() -> Result<()> {
    let vision = Arc::new(FakeVision::default());
    let decoder = Arc::new(FakeDecoder::new(|| Status::internal("no images here")));
    let v = serve(VisionEncoderServer::from_arc(vision)).await?;
    let d = serve(DecoderServer::from_arc(decoder.clone())).await?;
    let (_, http) = gateway_with_http(&v, &d).await?;
    let plain = serde_json::json!({"prompt": [5, 6, 7, 8, 9], "max_tokens": 3});
    let mut extended = plain.clone();
    for (k, v) in serde_json::json!({"priority": -4, "min_tokens": 2,
        "allowed_token_ids": [10, 11, 12], "bad_words": ["hello"], "truncate_prompt_tokens": 3,
        "cache_salt": "mine"})
    .as_object()
    .expect("object")
    {
        extended[k] = v.clone();
    }
    for body in [plain, extended] {
        let at = http.clone();
        let r = tokio::task::spawn_blocking(move || post_when_ready(&at, &body)).await??;
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let seen = decoder.seen.lock().expect("not poisoned").clone();
    let (plain, extended) = (&seen[seen.len() - 2], &seen[seen.len() - 1]);
    assert_eq!((plain.priority, plain.min_new_tokens), (0, 0));
    assert!(plain.allowed_token_ids.is_empty() && plain.bad_words.is_empty());
    assert_eq!((extended.priority, extended.min_new_tokens), (-4, 2));
    assert_eq!(extended.allowed_token_ids, [10, 11, 12]);
    assert!(!extended.bad_words.is_empty() && extended.bad_words.iter().all(|w| !w.ids.is_empty()));
    assert_eq!(extended.prompt_token_ids, [7, 8, 9]);
    assert_ne!(extended.cache_salt, plain.cache_salt);
    assert!(!extended.cache_salt.is_empty());
    Ok(())
}
