//! `dsvl chat` without a conversation file: an interactive chat with a gateway, in the manner
//! of `ollama run` and `llama-cli -cnv`.
//!
//! * Multi-turn: every turn sends the whole conversation so far (images included; the
//!   vision tier's cache makes resending them cheap).
//! * `/image PATH` attaches an image to the next message; so does a path to an image file or an
//!   `http(s)://` image URL anywhere in a message (what dragging a file onto a terminal types,
//!   quoted or with escaped spaces). URLs go to the gateway as `image_url` parts and are
//!   fetched there, under its fetch policy.
//! * Tokens are printed as they stream in. Ctrl-C stops the current answer and keeps the
//!   session (the part already received stays in the conversation; a message stopped or failed
//!   before its first token is withdrawn, its `/image` attachments kept for the next one); at
//!   the prompt it only clears the line. Ctrl-D, `/bye` or end of input ends the session.
//! * `/reset` forgets the conversation, `/stats` prints the last answer's time to first
//!   token, decode rate and cached prompt tokens, `/help` lists the commands.
//! * On a terminal, lines are edited with `rustyline`, with a history kept across sessions
//!   (`$XDG_STATE_HOME/dsvl/chat_history`, else `~/.local/state/dsvl/chat_history`). When stdin
//!   is not a terminal, lines are read from it as they are (scripts, tests), with no prompt.

use std::io::{BufRead, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Result;
use dsvl_proto::v1::chat_response::Event;
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatFinish, ChatMessage, ContentPart};

use crate::chat_client::{status_error, ChatArgs};

const HELP: &str = "\
/image PATH|URL  attach an image to the next message (a path or URL typed in a message works too)
/reset           forget the conversation
/stats           time to first token, decode rate and cached tokens of the last answer
/help            this list
/bye             end the session (or Ctrl-D); Ctrl-C stops an answer";

/// What the user typed.
enum Input {
    Line(String),
    /// Ctrl-C at the prompt.
    Interrupted,
    Eof,
}

/// Where lines come from: the line editor on a terminal, stdin otherwise.
enum Lines {
    Editor { editor: Box<rustyline::DefaultEditor>, history: Option<PathBuf> },
    Piped(std::io::StdinLock<'static>),
}

impl Lines {
    fn open() -> Result<Self> {
        if !std::io::stdin().is_terminal() {
            return Ok(Self::Piped(std::io::stdin().lock()));
        }
        let mut editor = rustyline::DefaultEditor::new()?;
        let history = history_file();
        if let Some(h) = &history {
            let _ = editor.load_history(h);
        }
        Ok(Self::Editor { editor: Box::new(editor), history })
    }

    fn read(&mut self, prompt: &str) -> Result<Input> {
        match self {
            Self::Editor { editor, .. } => match editor.readline(prompt) {
                Ok(line) => {
                    if !line.trim().is_empty() {
                        let _ = editor.add_history_entry(line.as_str());
                    }
                    Ok(Input::Line(line))
                }
                Err(rustyline::error::ReadlineError::Interrupted) => Ok(Input::Interrupted),
                Err(rustyline::error::ReadlineError::Eof) => Ok(Input::Eof),
                Err(e) => Err(e.into()),
            },
            Self::Piped(stdin) => {
                let mut line = String::new();
                Ok(match stdin.read_line(&mut line)? {
                    0 => Input::Eof,
                    _ => Input::Line(line.trim_end_matches(['\n', '\r']).to_string()),
                })
            }
        }
    }

    fn is_terminal(&self) -> bool {
        matches!(self, Self::Editor { .. })
    }

    fn save_history(&mut self) {
        if let Self::Editor { editor, history: Some(h) } = self {
            if let Some(dir) = h.parent() {
                let _ = std::fs::create_dir_all(dir);
            }
            let _ = editor.save_history(h);
        }
    }
}

fn history_file() -> Option<PathBuf> {
    let state = std::env::var_os("XDG_STATE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/state")))?;
    Some(state.join("dsvl").join("chat_history"))
}

/// The last answer, for `/stats`.
struct LastAnswer {
    first_token_seconds: Option<f64>,
    total_seconds: f64,
    /// Tokens received (the finish message's count when there was one).
    tokens: usize,
    finish: Option<ChatFinish>,
    interrupted: bool,
}

impl LastAnswer {
    fn describe(&self) -> String {
        let ttft = self.first_token_seconds.map_or("-".into(), |t| format!("{t:.3} s"));
        // The decode rate: tokens after the first over the time after the first.
        let rate = match self.first_token_seconds {
            Some(t) if self.tokens > 1 && self.total_seconds > t => {
                format!("{:.1} tokens/s", (self.tokens - 1) as f64 / (self.total_seconds - t))
            }
            _ => "-".into(),
        };
        let (prompt, cached, reason) =
            self.finish.as_ref().map_or(("-".to_string(), "-".to_string(), "-".to_string()), |f| {
                (f.prompt_tokens.to_string(), f.cached_tokens.to_string(), f.finish_reason.clone())
            });
        format!(
            "last answer: TTFT {ttft}, {rate}, {} tokens in {:.3} s, prompt {prompt} tokens ({cached} cached), finish {}",
            self.tokens,
            self.total_seconds,
            if self.interrupted { "interrupted".to_string() } else { reason }
        )
    }
}

/// Runs the interactive chat until the user ends it.
///
/// # Errors
/// The gateway cannot be reached, or stdin or stdout fail.
pub fn run(args: &ChatArgs) -> Result<()> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut client = runtime.block_on(args.connect())?;
    // SIGINT is ours from here on (Ctrl-C stops an answer; at a terminal prompt the line
    // editor reads it as a key).
    let mut interrupts = runtime.block_on(async {
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())
    })?;
    let mut lines = Lines::open()?;
    let interactive = lines.is_terminal();
    if interactive {
        eprintln!("dsvl chat with {} (/help for commands, Ctrl-D to quit)", args.gateway);
    }
    let system: Vec<ChatMessage> = args
        .system_prompt
        .iter()
        .map(|s| ChatMessage { role: "system".into(), content: vec![text_part(s)] })
        .collect();
    let mut conversation: Vec<ChatMessage> = Vec::new();
    let mut attached: Vec<ContentPart> = Vec::new();
    let mut last: Option<LastAnswer> = None;
    let mut stdout = std::io::stdout();
    loop {
        let prompt = if attached.is_empty() {
            ">>> ".to_string()
        } else {
            format!("[{} image(s)] >>> ", attached.len())
        };
        let line = match lines.read(&prompt)? {
            Input::Eof => break,
            Input::Interrupted => {
                eprintln!("(Ctrl-D or /bye ends the session)");
                continue;
            }
            Input::Line(l) => l,
        };
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (command, rest) = line.split_once(char::is_whitespace).unwrap_or((line, ""));
        match command {
            "/bye" | "/quit" | "/exit" => break,
            "/help" => println!("{HELP}"),
            "/reset" => {
                conversation.clear();
                attached.clear();
                println!("conversation cleared");
            }
            "/stats" => match &last {
                Some(a) => println!("{}", a.describe()),
                None => println!("no answer yet"),
            },
            "/image" => match image_part(rest.trim()) {
                Ok((part, what)) => {
                    attached.push(part);
                    println!("attached {what} to the next message");
                }
                Err(e) => eprintln!("error: {e:#}"),
            },
            // A message; a leading absolute path is a dragged file, not a command.
            c if c.starts_with('/')
                && !Path::new(&unquote(&words(line).swap_remove(0))).exists() =>
            {
                eprintln!("unknown command {c}; /help lists them");
            }
            _ => {
                let (text, dragged) = split_attachments(line);
                let mut content: Vec<ContentPart> = std::mem::take(&mut attached);
                let from_image_command = content.len();
                content.extend(dragged);
                if !text.is_empty() {
                    content.push(text_part(&text));
                }
                conversation.push(ChatMessage { role: "user".into(), content });
                let mut messages = system.clone();
                messages.extend(conversation.iter().cloned());
                let request = args.request(messages);
                let (answer, text) = runtime.block_on(answer(
                    args,
                    &mut client,
                    request,
                    &mut stdout,
                    &mut interrupts,
                ));
                match answer {
                    Ok(a) => {
                        if a.interrupted {
                            eprintln!("[stopped]");
                        }
                        if text.is_empty() {
                            attached = withdraw(&mut conversation, from_image_command);
                        } else {
                            conversation.push(ChatMessage {
                                role: "assistant".into(),
                                content: vec![text_part(&text)],
                            });
                        }
                        last = Some(a);
                    }
                    Err(e) => {
                        eprintln!("error: {e:#}");
                        attached = withdraw(&mut conversation, from_image_command);
                    }
                }
            }
        }
        stdout.flush()?;
    }
    lines.save_history();
    Ok(())
}

/// Streams one answer to `out`; Ctrl-C (an `interrupts` signal) stops it, also while the
/// request is still being prepared. Returns the answer's figures and its text (what was
/// received, also after an interruption or an error mid-stream).
async fn answer(
    args: &ChatArgs,
    client: &mut dsvl_proto::v1::chat_client::ChatClient<tonic::transport::Channel>,
    request: dsvl_proto::v1::ChatRequest,
    out: &mut std::io::Stdout,
    interrupts: &mut tokio::signal::unix::Signal,
) -> (Result<LastAnswer>, String) {
    // A Ctrl-C that arrived at the prompt (stdin mode) is not meant for this answer.
    let mut idle = std::task::Context::from_waker(std::task::Waker::noop());
    while interrupts.poll_recv(&mut idle).is_ready() {}
    let started = Instant::now();
    let mut text = String::new();
    let mut first_token_seconds = None;
    let mut tokens = 0;
    let mut finish = None;
    let stopped = || LastAnswer {
        first_token_seconds: None,
        total_seconds: started.elapsed().as_secs_f64(),
        tokens: 0,
        finish: None,
        interrupted: true,
    };
    let mut stream = tokio::select! {
        opened = args.open(client, request) => match opened {
            Ok(s) => s,
            Err(e) => return (Err(e), text),
        },
        _ = interrupts.recv() => return (Ok(stopped()), text),
    };
    let interrupted = loop {
        tokio::select! {
            _ = interrupts.recv() => break true,
            message = stream.message() => match message.map_err(status_error) {
                Ok(Some(m)) => match m.event {
                    Some(Event::Delta(d)) => {
                        first_token_seconds.get_or_insert(started.elapsed().as_secs_f64());
                        tokens += d.token_ids.len();
                        text.push_str(&d.text);
                        let _ = out.write_all(d.text.as_bytes());
                        let _ = out.flush();
                    }
                    Some(Event::Finish(f)) => finish = Some(f),
                    None => {}
                },
                Ok(None) => break false,
                Err(e) => {
                    let _ = writeln!(out);
                    return (Err(e), text);
                }
            },
        }
    };
    let _ = writeln!(out);
    let tokens = finish.as_ref().map_or(tokens, |f| f.completion_tokens as usize);
    let answer = LastAnswer {
        first_token_seconds,
        total_seconds: started.elapsed().as_secs_f64(),
        tokens,
        finish,
        interrupted,
    };
    (Ok(answer), text)
}

/// Takes an unanswered message (stopped or failed before its first token) out of the
/// conversation, so the next turn does not send two user messages in a row, and returns its
/// first `from_image_command` parts: the `/image` attachments, which stay attached to the next
/// message. Its text and dragged paths are one Up away in the line history.
fn withdraw(conversation: &mut Vec<ChatMessage>, from_image_command: usize) -> Vec<ContentPart> {
    let Some(mut message) = conversation.pop() else {
        return Vec::new();
    };
    message.content.truncate(from_image_command);
    let note = match message.content.len() {
        0 => String::new(),
        n => format!("; its {n} /image attachment(s) stay for the next message"),
    };
    eprintln!("(no answer: the message was withdrawn{note})");
    message.content
}

fn text_part(text: &str) -> ContentPart {
    ContentPart { part: Some(Part::Text(text.to_string())) }
}

/// Whether `s` names an image by URL.
fn is_image_url(s: &str) -> bool {
    s.starts_with("http://") || s.starts_with("https://") || s.starts_with("data:image/")
}

/// An image part from a path or URL, and a description of it.
fn image_part(target: &str) -> Result<(ContentPart, String)> {
    let target = unquote(target);
    anyhow::ensure!(!target.is_empty(), "/image needs a path or an http(s):// URL");
    if is_image_url(&target) {
        let shown: String = target.chars().take(80).collect();
        return Ok((ContentPart { part: Some(Part::ImageUrl(target.clone())) }, shown));
    }
    let bytes = std::fs::read(&target)
        .map_err(|e| anyhow::anyhow!("cannot read the image {target}: {e}"))?;
    let what = format!("{target} ({} kB)", bytes.len().div_ceil(1024));
    Ok((ContentPart { part: Some(Part::Image(bytes.into())) }, what))
}

/// Removes one level of shell quoting: `'a b'`, `"a b"`, `a\ b`.
fn unquote(word: &str) -> String {
    let w = word.trim();
    for q in ['\'', '"'] {
        if w.len() >= 2 && w.starts_with(q) && w.ends_with(q) {
            return w[1..w.len() - 1].to_string();
        }
    }
    w.replace("\\ ", " ")
}

/// Splits a line into words the way a terminal's drag and drop quotes paths: whitespace
/// separates, except inside quotes or after a backslash. Words keep their quoting.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote: Option<char> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match (quote, c) {
            (None, '\\') => {
                word.push(c);
                if let Some(n) = chars.next() {
                    word.push(n);
                }
            }
            (None, '\'' | '"') if word.is_empty() => {
                quote = Some(c);
                word.push(c);
            }
            (Some(q), c) if c == q => {
                quote = None;
                word.push(c);
            }
            (None, c) if c.is_whitespace() => {
                if !word.is_empty() {
                    out.push(std::mem::take(&mut word));
                }
            }
            _ => word.push(c),
        }
    }
    if !word.is_empty() {
        out.push(word);
    }
    out
}

/// The message text without the image paths and URLs typed into it, and those images' parts
/// (a file that cannot be read stays text).
fn split_attachments(line: &str) -> (String, Vec<ContentPart>) {
    let mut text = Vec::new();
    let mut images = Vec::new();
    for word in words(line) {
        let target = unquote(&word);
        let image = (is_image_url(&target) || crate::encode::is_image_file(Path::new(&target)))
            .then(|| image_part(&target).ok())
            .flatten();
        match image {
            Some((part, _)) => images.push(part),
            None => text.push(word),
        }
    }
    (text.join(" "), images)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A message stopped before its first token leaves the conversation, and only its
    /// `/image` attachments come back (dragged images are in the line that Up recalls).
    #[test]
    fn an_unanswered_message_is_withdrawn_and_keeps_its_image_command_attachments() {
        let image = |b: &[u8]| ContentPart { part: Some(Part::Image(b.to_vec().into())) };
        let earlier = ChatMessage { role: "assistant".into(), content: vec![text_part("hi")] };
        let message = ChatMessage {
            role: "user".into(),
            content: vec![image(b"attached"), image(b"dragged"), text_part("what is this?")],
        };
        let mut conversation = vec![earlier.clone(), message];
        let kept = withdraw(&mut conversation, 1);
        assert_eq!(conversation, vec![earlier.clone()]);
        assert_eq!(kept, vec![image(b"attached")]);

        conversation.push(ChatMessage { role: "user".into(), content: vec![text_part("x")] });
        assert!(withdraw(&mut conversation, 0).is_empty());
        assert_eq!(conversation, vec![earlier]);
    }

    #[test]
    fn dragged_paths_and_urls_become_images_and_leave_the_text() {
        let dir = tempfile::tempdir().unwrap();
        let spaced = dir.path().join("my photo.png");
        std::fs::write(&spaced, b"\x89PNG not really").unwrap();
        let plain = dir.path().join("cat.JPG");
        std::fs::write(&plain, b"jpeg").unwrap();
        let line = format!(
            "what is in '{}' and {} compared to https://example.com/dog.webp ?",
            spaced.display(),
            plain.display()
        );
        let (text, images) = split_attachments(&line);
        assert_eq!(text, "what is in and compared to ?");
        assert_eq!(images.len(), 3);
        assert!(matches!(&images[0].part, Some(Part::Image(b)) if b.starts_with(b"\x89PNG")));
        assert!(
            matches!(&images[2].part, Some(Part::ImageUrl(u)) if u == "https://example.com/dog.webp")
        );

        let escaped = spaced.display().to_string().replace(' ', "\\ ");
        let (text, images) = split_attachments(&format!("{escaped} describe"));
        assert_eq!((text.as_str(), images.len()), ("describe", 1));

        // Missing files and other words stay text.
        let (text, images) = split_attachments("see /nonexistent/x.png or it's 'fine'");
        assert_eq!((text.as_str(), images.len()), ("see /nonexistent/x.png or it's 'fine'", 0));
    }

    #[test]
    fn stats_describe_the_last_answer() {
        let a = LastAnswer {
            first_token_seconds: Some(0.5),
            total_seconds: 2.5,
            tokens: 41,
            finish: Some(ChatFinish {
                finish_reason: "length".into(),
                prompt_tokens: 600,
                cached_tokens: 576,
                ..Default::default()
            }),
            interrupted: false,
        };
        let s = a.describe();
        assert!(s.contains("TTFT 0.500 s") && s.contains("20.0 tokens/s"), "{s}");
        assert!(s.contains("prompt 600 tokens (576 cached)") && s.contains("finish length"), "{s}");
        let stopped = LastAnswer { interrupted: true, finish: None, ..a };
        assert!(stopped.describe().contains("finish interrupted"));
    }
}
