//! Request validation and prompt construction: limits, roles and parts → the reference chat
//! template → token ids with one span of image tokens per image.
//!
//! Transport-neutral: the gRPC and HTTP front ends both build a [`ChatInput`].

use std::time::Instant;

use bytes::Bytes;
use dsvl_chat::{
    render_prompt, render_prompt_continuing, Message, Prompt, Role as TemplateRole,
    DEFAULT_SYSTEM_PROMPT, IMAGE_TAG,
};
use dsvl_core::cache_key::ImageDigest;
use dsvl_core::sampling::{SamplingParams, SamplingRequest, MAX_TOP_LOGPROBS};

use crate::config::GatewayConfig;
use crate::error::GatewayError;
use crate::fetch::{decode_data_url, RemoteImage};
use crate::served::ServedModel;

/// Who speaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Replaces the default system prompt.
    System,
    /// The human turn.
    User,
    /// The model turn.
    Assistant,
}

impl Role {
    /// Parses `system` / `user` / `assistant` (any case).
    pub fn parse(s: &str) -> Result<Self, GatewayError> {
        match s.to_ascii_lowercase().as_str() {
            "system" | "developer" => Ok(Self::System),
            "user" => Ok(Self::User),
            "assistant" => Ok(Self::Assistant),
            other => Err(GatewayError::InvalidArgument(format!(
                "unsupported message role `{other}` (use system, user or assistant)"
            ))),
        }
    }
}

/// One part of a message.
#[derive(Debug, Clone)]
pub enum Part {
    /// Text.
    Text(String),
    /// Encoded image bytes.
    Image(Bytes),
    /// An OpenAI `image_url`: a `data:` URL (decoded with the other cheap work) or a remote URL
    /// (checked against the fetch policy here, fetched once the request is admitted).
    ImageUrl(String),
}

/// One message.
#[derive(Debug, Clone)]
pub struct InMessage {
    /// Speaker.
    pub role: Role,
    /// Parts in order.
    pub parts: Vec<Part>,
}

/// A chat request, whichever protocol it came in.
#[derive(Debug, Clone, Default)]
pub struct ChatInput {
    /// Requested model name (empty: the served one).
    pub model: String,
    /// Conversation.
    pub messages: Vec<InMessage>,
    /// Token selection as asked (unset fields take the shared defaults in [`prepare`]).
    pub sampling: SamplingRequest,
    /// Stop strings.
    pub stop: Vec<String>,
    /// Most new tokens (None: the gateway default, capped by the positions left).
    pub max_tokens: Option<u32>,
    /// Return the prompt ids in the final message.
    pub return_prompt_token_ids: bool,
    /// What the reply must match (structured outputs), passed to the decoder as is.
    pub constraint: Option<dsvl_proto::internal::Constraint>,
    /// `/v1/completions`: the prompt as is (no chat template; `messages` must be empty).
    pub raw_prompt: Option<RawPrompt>,
    /// Choices, log-probabilities and stop ids.
    pub output: OutputOptions,
    /// How the chat template ends the prompt.
    pub template: TemplateOptions,
    /// vLLM's `truncate_prompt_tokens`: keep the prompt's last this many tokens (at least 1;
    /// refused where that would cut into or drop an image).
    pub truncate_prompt_tokens: Option<u32>,
    /// vLLM's `cache_salt`: the prompt's cached KV blocks are shared only with requests of the
    /// same tenant and the same salt.
    pub cache_salt: Option<String>,
    /// vLLM's `priority`: lower values are admitted first by the decoder.
    pub priority: i32,
}

/// How the chat template ends the prompt (vLLM's and Hugging Face's names).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TemplateOptions {
    /// Leave the last message open (no separator after it): the model continues it, and the
    /// reply is the continuation.
    pub continue_final_message: bool,
    /// `Some(false)`: no empty assistant turn after a final user message. Unset or true: the
    /// reference's rule (the empty assistant turn follows a final user message only).
    pub add_generation_prompt: Option<bool>,
    /// vLLM chat's `echo`: when the last message is the assistant's (the one being continued),
    /// the reply's text starts with it.
    pub echo: bool,
}

/// What to generate besides the token selection: how many choices, which log-probabilities,
/// where to stop.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OutputOptions {
    /// Independent choices (0 is read as 1; at most the gateway's `max_n`). Choice `i` samples
    /// with seed `seed + i`.
    pub n: u32,
    /// Report each token's log-probability.
    pub logprobs: bool,
    /// With `logprobs`: this many most likely alternatives per token (at most 20).
    pub top_logprobs: u32,
    /// Token ids that also end generation (kept in the output).
    pub stop_token_ids: Vec<u32>,
    /// Do not stop at the end-of-sequence token.
    pub ignore_eos: bool,
    /// vLLM's `min_tokens`: neither EOS, `stop_token_ids` nor stop strings end the reply
    /// before this many tokens (0: no minimum; at most the new-token budget; not with a
    /// grammar, which decides where the reply ends).
    pub min_tokens: u32,
    /// vLLM's `include_stop_str_in_output`: the matched stop string, or the text of the
    /// `stop_token_ids` id that ended the reply, stays at the end of the text.
    pub include_stop_str: bool,
    /// Completions' `echo`: each choice's text starts with the prompt, and with `logprobs`
    /// its log-probabilities start with the prompt tokens' (the first has none).
    pub echo: bool,
    /// vLLM's `prompt_logprobs`: each prompt token's log-probability and rank, and this many
    /// alternatives (at most 20), on the reply.
    pub prompt_logprobs: Option<u32>,
    /// vLLM's `allowed_token_ids`: only these may be chosen (not empty; not with a grammar).
    pub allowed_token_ids: Option<Vec<u32>>,
    /// vLLM's `bad_words`: words the reply never contains as tokenized (at most 128, each as
    /// is and with a leading space; not with a grammar).
    pub bad_words: Vec<String>,
}

/// Most `bad_words` per request.
pub const MAX_BAD_WORDS: usize = 128;
/// Longest bad word, in bytes.
const MAX_BAD_WORD_BYTES: usize = 256;
/// Most tokens a bad word may take (the decoder's limit).
const MAX_BAD_WORD_TOKENS: usize = 64;

/// Most `stop_token_ids` per request.
pub const MAX_STOP_TOKEN_IDS: usize = 64;

impl OutputOptions {
    /// Checks the options against the gateway's limits; `n` comes back at least 1.
    fn validated(mut self, max_n: u32) -> Result<Self, GatewayError> {
        self.n = self.n.max(1);
        if self.n > max_n {
            return Err(invalid(format!("n is {}; this gateway allows at most {max_n}", self.n)));
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(invalid(format!(
                "top_logprobs is {}; at most {MAX_TOP_LOGPROBS}",
                self.top_logprobs
            )));
        }
        if let Some(k) = self.prompt_logprobs.filter(|&k| k > MAX_TOP_LOGPROBS) {
            return Err(invalid(format!("prompt_logprobs is {k}; at most {MAX_TOP_LOGPROBS}")));
        }
        if self.allowed_token_ids.as_ref().is_some_and(Vec::is_empty) {
            return Err(invalid("allowed_token_ids is empty: no token could be chosen"));
        }
        if self.bad_words.len() > MAX_BAD_WORDS {
            return Err(invalid(format!(
                "{} bad_words; at most {MAX_BAD_WORDS}",
                self.bad_words.len()
            )));
        }
        if let Some(w) = self
            .bad_words
            .iter()
            .find(|w| w.trim_start().is_empty() || w.len() > MAX_BAD_WORD_BYTES)
        {
            return Err(invalid(format!(
                "bad_words: {:?} is empty or over {MAX_BAD_WORD_BYTES} bytes",
                w.chars().take(40).collect::<String>()
            )));
        }
        if self.top_logprobs > 0 && !self.logprobs {
            return Err(invalid("top_logprobs needs logprobs set to true"));
        }
        if self.stop_token_ids.len() > MAX_STOP_TOKEN_IDS {
            return Err(invalid(format!("at most {MAX_STOP_TOKEN_IDS} stop_token_ids")));
        }
        Ok(self)
    }
}

/// A completion prompt: text (tokenized with BOS, no template) or token ids (used as given).
#[derive(Debug, Clone)]
pub enum RawPrompt {
    /// Text.
    Text(String),
    /// Token ids.
    Ids(Vec<u32>),
}

/// The ids of a raw prompt; text must not ask for images (completions take none).
fn raw_prompt(model: &ServedModel, raw: RawPrompt) -> Result<Prompt, GatewayError> {
    let ids = match raw {
        RawPrompt::Text(t) if t.contains(IMAGE_TAG) => {
            return Err(invalid(format!(
                "a completion prompt cannot hold `{IMAGE_TAG}`: completions take no images"
            )))
        }
        RawPrompt::Text(t) => model
            .tokenizer
            .encode(&t)
            .map_err(|e| GatewayError::Internal(format!("tokenizer: {e}")))?,
        RawPrompt::Ids(ids) => ids,
    };
    if ids.is_empty() {
        return Err(invalid("the prompt is empty"));
    }
    Ok(Prompt { ids_before_expansion: ids.clone(), ids, image_spans: Vec::new() })
}

/// A validated, tokenized request.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// Token ids with image spans.
    pub prompt: Prompt,
    /// Images in placeholder order.
    pub images: Vec<Bytes>,
    /// Their digests (BLAKE3), computed once here: routing, `client_digest` and cache keys.
    pub image_digests: Vec<ImageDigest>,
    /// Images still to fetch, by index into `images` (empty there until fetched).
    pub remote_images: Vec<(usize, RemoteImage)>,
    /// Sampling parameters, resolved and validated.
    pub sampling: SamplingParams,
    /// Stop strings.
    pub stop: Vec<String>,
    /// New-token budget.
    pub max_new_tokens: u32,
    /// Seconds spent in template + tokenization.
    pub tokenize_seconds: f64,
    /// Whether to echo the prompt ids.
    pub return_prompt_token_ids: bool,
    /// What the reply must match.
    pub constraint: Option<dsvl_proto::internal::Constraint>,
    /// Choices, log-probabilities and stop ids (validated; `n` at least 1).
    pub output: OutputOptions,
    /// With `output.echo`: the prompt as each choice's text begins (a text prompt as given,
    /// token ids decoded).
    pub echo_text: Option<String>,
    /// `output.bad_words` tokenized, each as is and (where that starts another token) with a
    /// leading space, as vLLM tokenizes them.
    pub bad_words: Vec<Vec<u32>>,
    /// The request's own prefix-cache salt, within its tenant's.
    pub cache_salt: Option<String>,
    /// Its scheduling priority on the decoder.
    pub priority: i32,
}

const MAX_STOPS: usize = 16;
/// Longest stop string, in bytes.
const MAX_STOP_BYTES: usize = 256;
/// Most messages in a conversation.
pub const MAX_MESSAGES: usize = 512;
/// Most content parts in one message.
pub const MAX_PARTS: usize = 64;
/// Text bytes allowed per prompt position: the text of a prompt that fits the model is far
/// below this (a token is a few bytes), so the bound only stops text no prompt could hold
/// from being tokenized at all.
pub(crate) const TEXT_BYTES_PER_POSITION: usize = 32;

/// The cheap refusals, before any tokenizing, fetching or charging: message, part, text,
/// stop-string and image counts and sizes.
fn check_shape(
    config: &GatewayConfig,
    model: &ServedModel,
    input: &ChatInput,
) -> Result<(), GatewayError> {
    if input.messages.len() > MAX_MESSAGES {
        return Err(invalid(format!("{} messages; at most {MAX_MESSAGES}", input.messages.len())));
    }
    let positions = if config.max_prompt_tokens == 0 {
        model.max_positions
    } else {
        config.max_prompt_tokens.min(model.max_positions)
    };
    let text_budget = positions * TEXT_BYTES_PER_POSITION;
    let mut text = 0;
    let mut images = 0;
    for (i, m) in input.messages.iter().enumerate() {
        if m.parts.len() > MAX_PARTS {
            return Err(invalid(format!(
                "message {i} has {} parts; at most {MAX_PARTS}",
                m.parts.len()
            )));
        }
        for p in &m.parts {
            match p {
                Part::Text(t) => text += t.len(),
                Part::Image(_) | Part::ImageUrl(_) => images += 1,
            }
        }
    }
    if let Some(RawPrompt::Text(t)) = &input.raw_prompt {
        text += t.len();
    }
    if let Some(RawPrompt::Ids(ids)) = &input.raw_prompt {
        if ids.len() >= positions {
            return Err(invalid(format!(
                "the prompt is {} tokens; the limit is {}",
                ids.len(),
                positions - 1
            )));
        }
    }
    if text > text_budget {
        return Err(invalid(format!(
            "the text is {text} bytes; a prompt of at most {positions} tokens cannot hold more than {text_budget}"
        )));
    }
    if images > config.max_images {
        return Err(invalid(format!("{images} images; at most {} per request", config.max_images)));
    }
    if input.stop.len() > MAX_STOPS
        || input.stop.iter().any(|s| s.is_empty() || s.len() > MAX_STOP_BYTES)
    {
        return Err(invalid(format!(
            "at most {MAX_STOPS} stop strings, each 1 to {MAX_STOP_BYTES} bytes"
        )));
    }
    Ok(())
}

/// A 400 / INVALID_ARGUMENT with `msg`.
pub(crate) fn invalid(msg: impl Into<String>) -> GatewayError {
    GatewayError::InvalidArgument(msg.into())
}

/// Validates `input` against the limits and the model, renders the template and tokenizes.
///
/// # Errors
/// [`GatewayError::InvalidArgument`] naming what is wrong.
pub fn prepare(
    config: &GatewayConfig,
    model: &ServedModel,
    input: ChatInput,
) -> Result<Prepared, GatewayError> {
    let started = Instant::now();
    if !input.model.is_empty() && input.model != model.name {
        return Err(invalid(format!(
            "model `{}` is not served here; this gateway serves `{}`",
            input.model, model.name
        )));
    }
    check_shape(config, model, &input)?;
    let sampling = input.sampling.resolve().map_err(|e| invalid(e.to_string()))?;
    let output = input.output.validated(config.max_n)?;
    let echo_text = match (&input.raw_prompt, output.echo) {
        (_, false) => None,
        (Some(RawPrompt::Text(t)), true) => Some(t.clone()),
        (Some(RawPrompt::Ids(ids)), true) => Some(
            model
                .tokenizer
                .decode(ids, true)
                .map_err(|e| invalid(format!("the prompt's ids do not decode: {e}")))?,
        ),
        (None, true) => return Err(invalid("echo is for completion prompts only")),
    };
    // Chat's echo: the last message's text, when it is the assistant's.
    let echo_text = echo_text.or_else(|| {
        let last =
            input.messages.last().filter(|m| input.template.echo && m.role == Role::Assistant)?;
        Some(
            last.parts
                .iter()
                .filter_map(|p| match p {
                    Part::Text(t) => Some(t.as_str()),
                    _ => None,
                })
                .collect::<String>(),
        )
    });
    if input.cache_salt.as_ref().is_some_and(|s| s.is_empty() || s.len() > MAX_CACHE_SALT_BYTES) {
        return Err(invalid(format!("cache_salt must be 1 to {MAX_CACHE_SALT_BYTES} bytes")));
    }
    let (mut prompt, images, remote_images) = match input.raw_prompt {
        Some(raw) => (raw_prompt(model, raw)?, Vec::new(), Vec::new()),
        None => chat_prompt(config, model, input.messages, input.template)?,
    };
    if let Some(keep) = input.truncate_prompt_tokens {
        truncate(&mut prompt, keep)?;
    }
    let mut prepared = finish(
        config,
        model,
        started,
        prompt,
        images,
        sampling,
        input.stop,
        input.max_tokens,
        input.return_prompt_token_ids,
        input.constraint,
        output,
    )?;
    prepared.remote_images = remote_images;
    prepared.echo_text = echo_text;
    prepared.cache_salt = input.cache_salt;
    prepared.priority = input.priority;
    Ok(prepared)
}

/// Longest `cache_salt`, in bytes.
const MAX_CACHE_SALT_BYTES: usize = 256;

/// vLLM's `truncate_prompt_tokens`: the prompt's last `keep` tokens (the whole prompt when it
/// is no longer), refused where the cut would fall inside or after an image's tokens.
fn truncate(prompt: &mut Prompt, keep: u32) -> Result<(), GatewayError> {
    if keep == 0 {
        return Err(invalid("truncate_prompt_tokens must be at least 1"));
    }
    let cut = prompt.ids.len().saturating_sub(keep as usize);
    if cut == 0 {
        return Ok(());
    }
    if let Some(&(start, _)) = prompt.image_spans.first().filter(|&&(start, _)| start < cut) {
        return Err(invalid(format!(
            "truncate_prompt_tokens {keep} would cut the prompt's first {cut} tokens, into its \
             images (the first starts at token {start}): keep at least {}",
            prompt.ids.len() - start
        )));
    }
    prompt.ids.drain(..cut);
    prompt.ids_before_expansion.drain(..cut);
    for span in &mut prompt.image_spans {
        *span = (span.0 - cut, span.1 - cut);
    }
    Ok(())
}

impl Prepared {
    /// The prompt's ids for the finish, when the caller asked for them
    /// (`return_prompt_token_ids`); none otherwise.
    pub fn returned_prompt_ids(&self) -> Vec<u32> {
        if self.return_prompt_token_ids {
            self.prompt.ids.clone()
        } else {
            Vec::new()
        }
    }

    /// Whether the decoder scores the prompt: `echo` with `logprobs`, or `prompt_logprobs`.
    pub fn scores_prompt(&self) -> bool {
        (self.output.echo && self.output.logprobs) || self.output.prompt_logprobs.is_some()
    }

    /// Alternatives per prompt position the decoder computes: the most either use asks for.
    pub fn prompt_top_logprobs(&self) -> u32 {
        let echoed = if self.output.echo { self.output.top_logprobs } else { 0 };
        echoed.max(self.output.prompt_logprobs.unwrap_or(0))
    }

    /// Puts the fetched bytes of [`Self::remote_images`] in place, with their digests.
    pub fn fill_remote_images(&mut self, fetched: Vec<Bytes>) {
        for ((i, _), bytes) in std::mem::take(&mut self.remote_images).into_iter().zip(fetched) {
            self.image_digests[i] = ImageDigest::of(&bytes);
            self.images[i] = bytes;
        }
    }
}

/// The chat template's prompt of `messages`, their images in order (empty where still to be
/// fetched), and the remote images to fetch.
#[allow(clippy::type_complexity)]
fn chat_prompt(
    config: &GatewayConfig,
    model: &ServedModel,
    in_messages: Vec<InMessage>,
    template: TemplateOptions,
) -> Result<(Prompt, Vec<Bytes>, Vec<(usize, RemoteImage)>), GatewayError> {
    if template.continue_final_message && template.add_generation_prompt == Some(true) {
        return Err(invalid(
            "continue_final_message and add_generation_prompt cannot both be true: the reply \
             either continues the last message or answers it",
        ));
    }
    let mut system: Option<String> = None;
    let mut messages = Vec::with_capacity(in_messages.len());
    let mut images = Vec::new();
    let mut remote = Vec::new();
    for (i, m) in in_messages.into_iter().enumerate() {
        let mut content = String::new();
        let mut attached = Vec::new();
        for part in m.parts {
            match part {
                Part::Text(t) if t.contains(IMAGE_TAG) => {
                    return Err(invalid(format!("message {i}: text may not contain `{IMAGE_TAG}`; send images as image parts")));
                }
                Part::Text(t) => content.push_str(&t),
                Part::ImageUrl(url) if !url.starts_with("data:") => {
                    if !model.vision {
                        return Err(invalid(format!(
                            "model `{}` is text-only: it cannot take images",
                            model.name
                        )));
                    }
                    remote.push((images.len(), RemoteImage::parse(&url, config)?));
                    content.push_str(IMAGE_TAG);
                    attached.push(format!("image-{}", images.len()));
                    images.push(Bytes::new());
                }
                Part::Image(_) | Part::ImageUrl(_) => {
                    let bytes = match part {
                        Part::ImageUrl(url) => decode_data_url(&url, config.max_image_bytes)?,
                        Part::Image(bytes) => bytes,
                        Part::Text(_) => unreachable!("matched above"),
                    };
                    if !model.vision {
                        return Err(invalid(format!(
                            "model `{}` is text-only: it cannot take images",
                            model.name
                        )));
                    }
                    if bytes.len() > config.max_image_bytes {
                        return Err(invalid(format!(
                            "image {} is {} bytes; the limit is {}",
                            images.len() + 1,
                            bytes.len(),
                            config.max_image_bytes
                        )));
                    }
                    if bytes.is_empty() {
                        return Err(invalid(format!("image {} is empty", images.len() + 1)));
                    }
                    content.push_str(IMAGE_TAG);
                    attached.push(format!("image-{}", images.len()));
                    images.push(bytes);
                }
            }
        }
        match m.role {
            Role::System if !attached.is_empty() => {
                return Err(invalid("system messages cannot carry images"))
            }
            Role::System => {
                system = Some(match system.take() {
                    Some(prev) => format!("{prev}\n\n{content}"),
                    None => content,
                })
            }
            Role::User => {
                messages.push(Message { role: TemplateRole::User, content, images: attached })
            }
            Role::Assistant => {
                messages.push(Message { role: TemplateRole::Assistant, content, images: attached })
            }
        }
    }
    if images.len() > config.max_images {
        return Err(invalid(format!(
            "{} images; at most {} per request",
            images.len(),
            config.max_images
        )));
    }
    if messages.is_empty() {
        return Err(invalid("no user or assistant messages"));
    }
    // The reference appends an empty assistant turn to ask for the reply.
    let generation_prompt =
        !template.continue_final_message && template.add_generation_prompt != Some(false);
    if generation_prompt && messages.last().is_some_and(|m| m.role == TemplateRole::User) {
        messages.push(Message {
            role: TemplateRole::Assistant,
            content: String::new(),
            images: Vec::new(),
        });
    }
    let system = system.as_deref().unwrap_or(DEFAULT_SYSTEM_PROMPT);
    let text = if template.continue_final_message {
        render_prompt_continuing(system, &messages)
    } else {
        render_prompt(system, &messages)
    }
    .map_err(|e| invalid(e.to_string()))?;
    let prompt = model
        .tokenizer
        .encode_prompt(&text, model.image_tokens)
        .map_err(|e| GatewayError::Internal(format!("tokenizer: {e}")))?;
    Ok((prompt, images, remote))
}

/// The limits every prompt passes, and the new-token budget.
#[allow(clippy::too_many_arguments)]
fn finish(
    config: &GatewayConfig,
    model: &ServedModel,
    started: Instant,
    prompt: Prompt,
    images: Vec<Bytes>,
    sampling: SamplingParams,
    stop: Vec<String>,
    max_tokens: Option<u32>,
    return_prompt_token_ids: bool,
    constraint: Option<dsvl_proto::internal::Constraint>,
    output: OutputOptions,
) -> Result<Prepared, GatewayError> {
    let limit = if config.max_prompt_tokens == 0 {
        model.max_positions
    } else {
        config.max_prompt_tokens.min(model.max_positions)
    };
    if prompt.ids.len() >= limit {
        return Err(invalid(format!(
            "the prompt is {} tokens (with {} per image); the limit is {}",
            prompt.ids.len(),
            model.image_tokens,
            limit - 1
        )));
    }
    let room = (model.max_positions - prompt.ids.len()) as u32;
    let max_new_tokens = match max_tokens {
        // `echo` of the prompt alone (with its log-probabilities, say): nothing generated.
        Some(0) if output.echo => 0,
        Some(0) => return Err(invalid("max_tokens must be at least 1 (0 only with echo)")),
        Some(n) if n > config.max_new_tokens => {
            return Err(invalid(format!(
                "max_tokens {n} is over this gateway's limit of {}",
                config.max_new_tokens
            )))
        }
        Some(n) if n > room => {
            return Err(invalid(format!(
                "prompt ({}) + max_tokens ({n}) exceeds the model's {} positions",
                prompt.ids.len(),
                model.max_positions
            )));
        }
        Some(n) => n,
        None => config.max_new_tokens.min(room),
    };
    if output.min_tokens > max_new_tokens {
        return Err(invalid(format!(
            "min_tokens {} is more than the reply's budget of {max_new_tokens} tokens",
            output.min_tokens
        )));
    }
    if constraint.is_some() && (output.allowed_token_ids.is_some() || !output.bad_words.is_empty())
    {
        return Err(invalid(
            "allowed_token_ids and bad_words cannot be combined with a structured output \
             (response_format, guided_*, tool_choice required or named, strict tools): the \
             grammar decides which tokens may come",
        ));
    }
    let bad_words = bad_word_ids(model, &output.bad_words)?;
    if output.min_tokens > 0 && constraint.is_some() {
        return Err(invalid(
            "min_tokens cannot be combined with a structured output (response_format, guided_*, \
             tool_choice required or named, strict tools): the grammar decides where the reply \
             ends",
        ));
    }
    let image_digests = images.iter().map(|b| ImageDigest::of(b)).collect();
    Ok(Prepared {
        prompt,
        images,
        image_digests,
        remote_images: Vec::new(),
        sampling,
        stop,
        max_new_tokens,
        tokenize_seconds: started.elapsed().as_secs_f64(),
        return_prompt_token_ids,
        constraint,
        output,
        echo_text: None,
        bad_words,
        cache_salt: None,
        priority: 0,
    })
}

/// vLLM's tokenization of `bad_words`: each word without its leading whitespace, and with one
/// space before it where that gives as many tokens and a different first one (the word inside
/// a text as well as at its start).
fn bad_word_ids(model: &ServedModel, words: &[String]) -> Result<Vec<Vec<u32>>, GatewayError> {
    let encode = |text: &str| {
        model
            .tokenizer
            .encode_with(text, false)
            .map_err(|e| GatewayError::Internal(format!("tokenizer: {e}")))
    };
    let mut out: Vec<Vec<u32>> = Vec::with_capacity(words.len() * 2);
    for word in words {
        let bare = encode(word.trim_start())?;
        let spaced = encode(&format!(" {}", word.trim_start()))?;
        if bare.len() > MAX_BAD_WORD_TOKENS {
            return Err(invalid(format!(
                "bad_words: {word:?} is {} tokens; at most {MAX_BAD_WORD_TOKENS}",
                bare.len()
            )));
        }
        let also_spaced = spaced.len() == bare.len() && spaced.first() != bare.first();
        out.push(bare);
        if also_spaced {
            out.push(spaced);
        }
    }
    out.sort();
    out.dedup();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    fn setup() -> (GatewayConfig, ServedModel) {
        let args = crate::Args::parse_from([
            "dsvl-gateway",
            "--decoder",
            "127.0.0.1:1",
            "--allow-unauthenticated",
            "--insecure",
            "--max-prompt-tokens",
            "100",
        ]);
        (GatewayConfig::try_from(&args).unwrap(), ServedModel::load(None, "tiny".into()).unwrap())
    }

    fn user(parts: Vec<Part>) -> InMessage {
        InMessage { role: Role::User, parts }
    }

    #[test]
    fn shapes_are_refused_before_tokenizing() {
        let (config, model) = setup();
        let text = |n: usize| Part::Text("x".repeat(n));
        let cases = [
            (
                ChatInput {
                    messages: (0..=MAX_MESSAGES).map(|_| user(vec![text(1)])).collect(),
                    ..Default::default()
                },
                "messages; at most",
            ),
            (
                ChatInput {
                    messages: vec![user((0..=MAX_PARTS).map(|_| text(1)).collect())],
                    ..Default::default()
                },
                "parts; at most",
            ),
            (
                ChatInput {
                    messages: vec![user(vec![text(100 * TEXT_BYTES_PER_POSITION + 1)])],
                    ..Default::default()
                },
                "cannot hold more than 3200",
            ),
            (
                ChatInput {
                    messages: vec![user(vec![Part::Image(vec![1u8].into()); 5])],
                    ..Default::default()
                },
                "5 images; at most 4",
            ),
            (
                ChatInput {
                    messages: vec![user(vec![text(1)])],
                    stop: vec!["s".repeat(MAX_STOP_BYTES + 1)],
                    ..Default::default()
                },
                "stop strings",
            ),
            (
                ChatInput { raw_prompt: Some(RawPrompt::Ids(vec![1; 100])), ..Default::default() },
                "the limit is 99",
            ),
        ];
        for (input, want) in cases {
            let e = prepare(&config, &model, input).unwrap_err().to_string();
            assert!(e.contains(want), "{e} (wanted `{want}`)");
        }
        // Within the bounds the usual checks follow (here: the token limit after tokenizing).
        let input = ChatInput { messages: vec![user(vec![text(3000)])], ..Default::default() };
        let e = prepare(&config, &model, input).unwrap_err().to_string();
        assert!(e.contains("tokens"), "{e}");
    }

    #[test]
    fn min_tokens_fits_the_budget_and_not_a_grammar() {
        let (config, model) = setup();
        let input = |min_tokens: u32, max_tokens: Option<u32>, grammar: bool| ChatInput {
            messages: vec![user(vec![Part::Text("hi".into())])],
            max_tokens,
            output: OutputOptions { min_tokens, ..Default::default() },
            constraint: grammar.then(|| dsvl_proto::internal::Constraint {
                kind: Some(dsvl_proto::internal::constraint::Kind::Regex("a+".into())),
            }),
            ..Default::default()
        };
        let p = prepare(&config, &model, input(8, Some(8), false)).unwrap();
        assert_eq!((p.output.min_tokens, p.max_new_tokens), (8, 8));
        let e = prepare(&config, &model, input(9, Some(8), false)).unwrap_err().to_string();
        assert!(e.contains("min_tokens 9 is more than the reply's budget of 8"), "{e}");
        // Unset max_tokens: the budget is what the positions leave.
        let room = prepare(&config, &model, input(0, None, false)).unwrap().max_new_tokens;
        assert!(prepare(&config, &model, input(room, None, false)).is_ok());
        let e = prepare(&config, &model, input(room + 1, None, false)).unwrap_err().to_string();
        assert!(e.contains("is more than the reply's budget"), "{e}");
        let e = prepare(&config, &model, input(1, Some(8), true)).unwrap_err().to_string();
        assert!(e.contains("min_tokens cannot be combined with a structured output"), "{e}");
        assert!(prepare(&config, &model, input(0, Some(8), true)).is_ok());
    }

    #[test]
    fn template_options_end_the_prompt() {
        let (config, model) = setup();
        let text = |role, t: &str| InMessage { role, parts: vec![Part::Text(t.into())] };
        let ends = |messages: Vec<InMessage>, template: TemplateOptions| {
            let input = ChatInput { messages, template, ..Default::default() };
            prepare(&config, &model, input)
                .map(|p| model.tokenizer.decode(&p.prompt.ids, false).unwrap())
        };
        let begun = || vec![text(Role::User, "Name a colour."), text(Role::Assistant, "It is ")];
        let asked = || vec![text(Role::User, "Name a colour.")];
        let continuing = TemplateOptions { continue_final_message: true, ..Default::default() };
        let prompt = ends(begun(), continuing).unwrap();
        assert!(prompt.ends_with("User: Name a colour.\n\nAssistant: It is"), "{prompt:?}");
        let prompt = ends(begun(), TemplateOptions::default()).unwrap();
        assert!(prompt.ends_with("Assistant: It is<｜end▁of▁sentence｜>"), "{prompt:?}");
        let prompt = ends(asked(), TemplateOptions::default()).unwrap();
        assert!(prompt.ends_with("User: Name a colour.\n\nAssistant:"), "{prompt:?}");
        let bare = TemplateOptions { add_generation_prompt: Some(false), ..Default::default() };
        let prompt = ends(asked(), bare).unwrap();
        assert!(prompt.ends_with("User: Name a colour."), "{prompt:?}");
        let prompt = ends(asked(), continuing).unwrap();
        assert!(prompt.ends_with("User: Name a colour."), "{prompt:?}");
        let both = TemplateOptions { add_generation_prompt: Some(true), ..continuing };
        let e = ends(begun(), both).unwrap_err().to_string();
        assert!(e.contains("cannot both be true"), "{e}");
    }

    #[test]
    fn bad_words_are_tokenized_as_vllm_does() {
        let (config, model) = setup();
        let tok = &model.tokenizer;
        let ids = |w: &str| bad_word_ids(&model, &[w.to_string()]).unwrap();
        // A word: as is, and with a space where that starts with another token.
        let bare = tok.encode_with("rocket", false).unwrap();
        let spaced = tok.encode_with(" rocket", false).unwrap();
        let mut want = vec![bare.clone()];
        if spaced.len() == bare.len() && spaced[0] != bare[0] {
            want.push(spaced);
        }
        want.sort();
        assert_eq!(ids("  rocket"), want, "leading whitespace is dropped first");
        let input = |bad_words: Vec<String>, grammar: bool| ChatInput {
            messages: vec![user(vec![Part::Text("hi".into())])],
            output: OutputOptions { bad_words, ..Default::default() },
            constraint: grammar.then(|| dsvl_proto::internal::Constraint {
                kind: Some(dsvl_proto::internal::constraint::Kind::Regex("a+".into())),
            }),
            ..Default::default()
        };
        let p = prepare(&config, &model, input(vec!["rocket".into()], false)).unwrap();
        assert_eq!(p.bad_words, ids("rocket"));
        for (words, grammar, why) in [
            (vec!["rocket".to_string()], true, "cannot be combined with a structured output"),
            (vec![" ".into()], false, "is empty or over 256 bytes"),
            (vec!["x".repeat(257)], false, "is empty or over 256 bytes"),
            (vec!["a".into(); MAX_BAD_WORDS + 1], false, "129 bad_words; at most 128"),
        ] {
            let e = prepare(&config, &model, input(words, grammar)).unwrap_err().to_string();
            assert!(e.contains(why), "{e} (wanted `{why}`)");
        }
        let empty = ChatInput {
            messages: vec![user(vec![Part::Text("hi".into())])],
            output: OutputOptions { allowed_token_ids: Some(vec![]), ..Default::default() },
            ..Default::default()
        };
        let e = prepare(&config, &model, empty).unwrap_err().to_string();
        assert!(e.contains("allowed_token_ids is empty"), "{e}");
    }

    #[test]
    fn truncation_keeps_the_last_tokens_and_spares_images() {
        let mut text = Prompt {
            ids_before_expansion: vec![1, 2, 3, 4],
            ids: vec![1, 2, 3, 4],
            image_spans: vec![],
        };
        truncate(&mut text, 9).unwrap();
        assert_eq!(text.ids, [1, 2, 3, 4], "a shorter prompt stays whole");
        truncate(&mut text, 2).unwrap();
        assert_eq!((text.ids.clone(), text.ids_before_expansion.clone()), (vec![3, 4], vec![3, 4]));
        assert!(truncate(&mut text, 0).unwrap_err().to_string().contains("at least 1"));
        // Ids 1 2 [image x3] 6: a cut before the image shifts its span; into it, refused.
        let image = || Prompt {
            ids_before_expansion: vec![1, 2, 9, 6],
            ids: vec![1, 2, 9, 9, 9, 6],
            image_spans: vec![(2, 5)],
        };
        let mut p = image();
        truncate(&mut p, 5).unwrap();
        assert_eq!(
            (p.ids, p.image_spans, p.ids_before_expansion),
            (vec![2, 9, 9, 9, 6], vec![(1, 4)], vec![2, 9, 6])
        );
        let e = truncate(&mut image(), 3).unwrap_err().to_string();
        assert!(e.contains("into its images") && e.contains("keep at least 4"), "{e}");
    }
}
