//! `dsvl chat`: a streaming client of the gateway's `dsvl.v1.Chat`. With `--chat FILE` it takes
//! the same conversation file, sampling flags and `--json` output as `dsvl generate`, so the two
//! can be compared directly (same prompt, same greedy tokens); without, it is an interactive
//! chat ([`crate::chat_repl`]).

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
    pub gateway: String,
    /// Conversation file (as for `dsvl generate`; image paths are relative to it): one reply
    /// to it. Without it, an interactive chat on the terminal (or over stdin when piped).
    #[arg(long)]
    pub chat: Option<PathBuf>,
    /// System prompt (default: the reference's; "" for none).
    #[arg(long)]
    pub system_prompt: Option<String>,
    /// Most new tokens.
    #[arg(long, default_value_t = 512)]
    pub max_new_tokens: u32,
    #[command(flatten)]
    pub sampling: SamplingArgs,
    /// Stop strings (repeatable).
    #[arg(long)]
    pub stop: Vec<String>,
    /// API key (sent as `authorization: Bearer <key>`).
    #[arg(long, env = "DSVL_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Request deadline in seconds.
    #[arg(long, default_value_t = 300.0)]
    pub timeout: f64,
    /// Keep generating past the end-of-sequence token, up to `--max-new-tokens` (benchmarks,
    /// tests).
    #[arg(long)]
    pub ignore_eos: bool,
    /// Print one JSON object {prompt_token_ids, generated_token_ids, text} instead of streaming
    /// (with `--chat`).
    #[arg(long, requires = "chat")]
    pub json: bool,
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
    args.sampling.params()?;
    let Some(chat) = &args.chat else {
        return crate::chat_repl::run(&args);
    };
    let messages = read_chat(chat)?;
    let mut request = args.request(to_proto_messages(&messages, args.system_prompt.as_deref())?);
    request.return_prompt_token_ids = args.json;
    tokio::runtime::Runtime::new()?.block_on(stream_chat(&args, request))
}

impl ChatArgs {
    /// A request for `messages` with the flags' sampling, stops and token limit.
    pub fn request(&self, messages: Vec<ChatMessage>) -> ChatRequest {
        let p = self.sampling.request();
        ChatRequest {
            model: String::new(),
            messages,
            sampling: Some(dsvl_proto::v1::SamplingParams {
                temperature: p.temperature,
                top_k: p.top_k,
                top_p: p.top_p,
                repetition_penalty: p.repetition_penalty,
                seed: p.seed,
                ..Default::default()
            }),
            stop: self.stop.clone(),
            max_tokens: self.max_new_tokens,
            ignore_eos: self.ignore_eos,
            output_format: None,
            ..Default::default()
        }
    }

    /// A client of the gateway.
    ///
    /// # Errors
    /// The gateway cannot be reached.
    pub async fn connect(&self) -> Result<ChatClient<tonic::transport::Channel>> {
        Ok(ChatClient::connect(self.gateway.clone())
            .await
            .with_context(|| format!("cannot reach the gateway at {}", self.gateway))?
            .max_encoding_message_size(256 << 20))
    }

    /// Opens the response stream of `request` (deadline and API key from the flags).
    ///
    /// # Errors
    /// The gateway refuses the request.
    pub async fn open(
        &self,
        client: &mut ChatClient<tonic::transport::Channel>,
        request: ChatRequest,
    ) -> Result<tonic::Streaming<dsvl_proto::v1::ChatResponse>> {
        let mut req = tonic::Request::new(request);
        req.set_timeout(Duration::from_secs_f64(self.timeout));
        if let Some(key) = &self.api_key {
            req.metadata_mut().insert(
                "authorization",
                format!("Bearer {key}").parse().context("the API key is not valid header text")?,
            );
        }
        Ok(client.generate(req).await.map_err(status_error)?.into_inner())
    }
}

/// A gRPC status as an error that reads well.
pub fn status_error(s: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", s.code(), s.message())
}

async fn stream_chat(args: &ChatArgs, request: ChatRequest) -> Result<()> {
    let mut client = args.connect().await?;
    let started = Instant::now();
    let mut stream = args.open(&mut client, request).await?;
    let mut stdout = std::io::stdout().lock();
    let mut text = String::new();
    let mut first_token = None;
    let mut finish: Option<ChatFinish> = None;
    while let Some(msg) = stream.message().await.map_err(status_error)? {
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
