//! `dsvl chat`: a streaming client of the gateway's `dsvl.v1.Chat`. Takes the same
//! conversation file, sampling flags and `--json` output as `dsvl generate`, so the two can be
//! compared directly (same prompt, same greedy tokens).

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use dsvl_chat::{Message, Role, IMAGE_TAG};
use dsvl_proto::v1::chat_client::ChatClient;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatFinish, ChatMessage, ChatRequest, ContentPart};

use crate::generate::{read_chat, SamplingArgs};

/// Arguments of `dsvl chat`.
#[derive(Args, Debug)]
pub struct ChatArgs {
    /// Gateway gRPC endpoint.
    #[arg(long, default_value = "http://127.0.0.1:50051")]
    gateway: String,
    /// Conversation file (as for `dsvl generate`); image paths are relative to it.
    #[arg(long)]
    chat: PathBuf,
    /// System prompt (default: the reference's; "" for none).
    #[arg(long)]
    system_prompt: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 512)]
    max_new_tokens: u32,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop strings (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// API key (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "DSVL_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    /// Request deadline in seconds.
    #[arg(long, default_value_t = 300.0)]
    timeout: f64,
    /// Print one JSON object {prompt_token_ids, generated_token_ids, text} instead of streaming.
    #[arg(long)]
    json: bool,
}

/// Message parts: the content split at each placeholder, with the message's images in order.
pub fn to_proto_messages(
    messages: &[Message],
    system_prompt: Option<&str>,
) -> Result<Vec<ChatMessage>> {
    let mut out = Vec::with_capacity(messages.len() + 1);
    if let Some(s) = system_prompt {
        out.push(ChatMessage {
            role: "system".into(),
            content: vec![ContentPart { part: Some(Part::Text(s.to_string())) }],
        });
    }
    for m in messages {
        let pieces: Vec<&str> = m.content.split(IMAGE_TAG).collect();
        if pieces.len() - 1 != m.images.len() {
            bail!(
                "a message has {} `{IMAGE_TAG}` placeholders but {} images",
                pieces.len() - 1,
                m.images.len()
            );
        }
        let mut content = Vec::new();
        for (i, text) in pieces.iter().enumerate() {
            if i > 0 {
                let path = &m.images[i - 1];
                let bytes = std::fs::read(path).with_context(|| format!("cannot read {path}"))?;
                content.push(ContentPart { part: Some(Part::Image(bytes.into())) });
            }
            if !text.is_empty() {
                content.push(ContentPart { part: Some(Part::Text((*text).to_string())) });
            }
        }
        let role = match m.role {
            Role::User => "user",
            Role::Assistant => "assistant",
        };
        out.push(ChatMessage { role: role.into(), content });
    }
    Ok(out)
}

/// Runs the command.
pub fn run(args: ChatArgs) -> Result<()> {
    let messages = read_chat(&args.chat)?;
    args.sampling.params()?;
    let p = args.sampling.request();
    let request = ChatRequest {
        model: String::new(),
        messages: to_proto_messages(&messages, args.system_prompt.as_deref())?,
        sampling: Some(dsvl_proto::v1::SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k,
            top_p: p.top_p,
            repetition_penalty: p.repetition_penalty,
            seed: p.seed,
            ..Default::default()
        }),
        stop: args.stop.clone(),
        max_tokens: args.max_new_tokens,
        return_prompt_token_ids: args.json,
        output_format: None,
        ..Default::default()
    };
    tokio::runtime::Runtime::new()?.block_on(stream_chat(&args, request))
}

async fn stream_chat(args: &ChatArgs, request: ChatRequest) -> Result<()> {
    let mut client = ChatClient::connect(args.gateway.clone())
        .await
        .with_context(|| format!("cannot reach the gateway at {}", args.gateway))?
        .max_encoding_message_size(256 << 20);
    let mut req = tonic::Request::new(request);
    req.set_timeout(Duration::from_secs_f64(args.timeout));
    if let Some(key) = &args.api_key {
        req.metadata_mut().insert(
            "authorization",
            format!("Bearer {key}").parse().context("the API key is not valid header text")?,
        );
    }
    let started = Instant::now();
    let mut stream = client
        .generate(req)
        .await
        .map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
        .into_inner();
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut first_token = None;
    let mut finish: Option<ChatFinish> = None;
    while let Some(msg) =
        stream.message().await.map_err(|s| anyhow::anyhow!("{:?}: {}", s.code(), s.message()))?
    {
        match msg.event {
            Some(Event::Delta(d)) => {
                first_token.get_or_insert(started.elapsed().as_secs_f64());
                text.push_str(&d.text);
                if !args.json {
                    stdout.write_all(d.text.as_bytes())?;
                    stdout.flush()?;
                }
            }
            Some(Event::Finish(f)) => finish = Some(f),
            None => {}
        }
    }
    let f = finish.context("the stream ended without a finish message")?;
    if args.json {
        let obj = serde_json::json!({"prompt_token_ids": f.prompt_token_ids, "generated_token_ids": f.token_ids, "text": text});
        writeln!(stdout, "{obj}")?;
    } else {
        writeln!(stdout)?;
        let t = f.timing.unwrap_or_default();
        eprintln!(
            "{} prompt + {} new tokens, finish {}; first token {:.3}s (tokenize {:.3}s, vision {:.3}s with {} cached, decoder prefill {:.3}s), total {:.3}s",
            f.prompt_tokens,
            f.completion_tokens,
            f.finish_reason,
            first_token.unwrap_or(0.0),
            t.tokenize_seconds,
            t.vision_seconds,
            t.images_cached,
            t.decoder_first_token_seconds,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
