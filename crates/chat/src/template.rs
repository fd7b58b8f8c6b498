//! The "deepseek" conversation template of the reference (`conversation.py`,
//! `VLChatProcessor.apply_sft_template_for_multi_turn_prompts`), byte for byte:
//!
//! `{system}\n\n` (omitted when the system prompt is empty), then for message `i` with non-empty
//! content `{role}: {content}{sep[i % 2]}` where `sep = ["\n\n", "<｜end▁of▁sentence｜>"]`, or
//! `{role}:` for empty content; every content is `.strip()`ped first and the whole prompt is
//! `.strip()`ped at the end. The separator follows the message *index*, as in the reference.
//!
//! [`render_prompt_continuing`] leaves the last message open (no separator after it), so the
//! model continues that message instead of answering it: Hugging Face's and vLLM's
//! `continue_final_message`, a reply begun by the caller.

use serde::{Deserialize, Serialize};

use crate::ChatError;

/// `VLChatProcessor.system_prompt`, used when the caller gives none.
pub const DEFAULT_SYSTEM_PROMPT: &str = "You are a helpful language and vision assistant. You are able to understand the visual content that the user provides, and assist the user with a variety of tasks using natural language.";

/// The image placeholder in message text.
pub const IMAGE_TAG: &str = "<image_placeholder>";

const SEPS: [&str; 2] = ["\n\n", "<｜end▁of▁sentence｜>"];

/// Conversation roles of the template.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    /// The human turn.
    #[serde(alias = "user")]
    User,
    /// The model turn.
    #[serde(alias = "assistant")]
    Assistant,
}

impl Role {
    fn as_str(self) -> &'static str {
        match self {
            Self::User => "User",
            Self::Assistant => "Assistant",
        }
    }
}

/// One message in the reference conversation format (`CHAT.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Message {
    /// Who speaks.
    pub role: Role,
    /// Text, with one `<image_placeholder>` per image.
    #[serde(default)]
    pub content: String,
    /// Image paths (or other references), in placeholder order.
    #[serde(default)]
    pub images: Vec<String>,
}

/// Python's `str.strip()`: Unicode whitespace plus the four ASCII separators (U+001C..U+001F)
/// that Python's `isspace` also counts.
fn py_strip(s: &str) -> &str {
    s.trim_matches(|c: char| c.is_whitespace() || ('\u{1c}'..='\u{1f}').contains(&c))
}

/// Renders `messages` with `system_prompt` into the model prompt string.
///
/// # Errors
/// [`ChatError::Conversation`] when there are no messages or the placeholder count differs from
/// the number of images attached to the messages.
pub fn render_prompt(system_prompt: &str, messages: &[Message]) -> Result<String, ChatError> {
    render(system_prompt, messages, false)
}

/// [`render_prompt`] with the last message left open: its separator is not written, so the
/// prompt ends with its (stripped) content and the model goes on with it.
///
/// # Errors
/// As [`render_prompt`].
pub fn render_prompt_continuing(
    system_prompt: &str,
    messages: &[Message],
) -> Result<String, ChatError> {
    render(system_prompt, messages, true)
}

fn render(system_prompt: &str, messages: &[Message], open_last: bool) -> Result<String, ChatError> {
    if messages.is_empty() {
        return Err(ChatError::Conversation("no messages".into()));
    }
    let placeholders: usize = messages.iter().map(|m| m.content.matches(IMAGE_TAG).count()).sum();
    let images: usize = messages.iter().map(|m| m.images.len()).sum();
    if placeholders != images {
        return Err(ChatError::Conversation(format!(
            "{placeholders} `{IMAGE_TAG}` placeholder(s) but {images} image(s)"
        )));
    }
    let mut out = String::new();
    if !system_prompt.is_empty() {
        out.push_str(system_prompt);
        out.push_str(SEPS[0]);
    }
    for (i, m) in messages.iter().enumerate() {
        let content = py_strip(&m.content);
        out.push_str(m.role.as_str());
        if content.is_empty() {
            out.push(':');
        } else {
            out.push_str(": ");
            out.push_str(content);
            if !(open_last && i + 1 == messages.len()) {
                out.push_str(SEPS[i % 2]);
            }
        }
    }
    Ok(py_strip(&out).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> Message {
        Message { role, content: content.into(), images: vec![] }
    }

    #[test]
    fn single_turn_ends_with_assistant_colon() {
        let p =
            render_prompt("SYS", &[msg(Role::User, "  hi  "), msg(Role::Assistant, "")]).unwrap();
        assert_eq!(p, "SYS\n\nUser: hi\n\nAssistant:");
    }

    #[test]
    fn assistant_turns_end_with_eos_string() {
        let p = render_prompt(
            "",
            &[
                msg(Role::User, "a"),
                msg(Role::Assistant, "b"),
                msg(Role::User, "c"),
                msg(Role::Assistant, ""),
            ],
        )
        .unwrap();
        assert_eq!(p, "User: a\n\nAssistant: b<｜end▁of▁sentence｜>User: c\n\nAssistant:");
    }

    #[test]
    fn a_continued_last_message_stays_open() {
        let turns = [msg(Role::User, "a"), msg(Role::Assistant, " The answer is ")];
        let p = render_prompt_continuing("SYS", &turns).unwrap();
        assert_eq!(p, "SYS\n\nUser: a\n\nAssistant: The answer is");
        let p = render_prompt("SYS", &turns).unwrap();
        assert_eq!(p, "SYS\n\nUser: a\n\nAssistant: The answer is<｜end▁of▁sentence｜>");
        let p = render_prompt_continuing("", &[msg(Role::User, "Once upon")]).unwrap();
        assert_eq!(p, "User: Once upon");
    }

    #[test]
    fn placeholder_count_must_match_images() {
        let m = Message { role: Role::User, content: format!("{IMAGE_TAG} x"), images: vec![] };
        assert!(render_prompt("", &[m])
            .unwrap_err()
            .to_string()
            .contains("1 `<image_placeholder>`"));
    }

    #[test]
    fn roles_accept_openai_spelling() {
        let m: Message = serde_json::from_str(r#"{"role": "user", "content": "x"}"#).unwrap();
        assert_eq!(m.role, Role::User);
        assert!(serde_json::from_str::<Message>(r#"{"role": "system", "content": "x"}"#).is_err());
    }
}
