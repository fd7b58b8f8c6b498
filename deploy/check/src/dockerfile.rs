//! A static lint of the Dockerfiles in `deploy/docker/` (CI has a Docker client but no engine,
//! and hadolint is in none of the registries we can reach).
//!
//! Rules:
//! * every base image (`FROM`, after `ARG` defaults are substituted) is pinned: a digest, an
//!   exact `X.Y.Z` tag, or for Debian and Ubuntu a point release (`12.12`, `24.04`);
//!   `scratch` and earlier stages are fine;
//! * no `ADD` from a URL or a git repository (it bypasses the build cache's content pinning;
//!   fetch in a `RUN` with a checksum, or better, from a registry package);
//! * the final stage switches to a numeric, non-root `USER` (a name cannot be verified by
//!   Kubernetes' `runAsNonRoot`);
//! * the final stage's `ENTRYPOINT` starts an init process (tini) that forwards signals.

use std::collections::{BTreeMap, BTreeSet};

use crate::images::{has_point_release, ImageRef};

/// A broken Dockerfile rule; `line` is 1-based, the first line of the instruction.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DockerViolation {
    /// A base image that is not pinned.
    #[error("line {line}: FROM {image} is not pinned (digest, X.Y.Z tag, or a Debian/Ubuntu point release)")]
    UnpinnedBase {
        /// Line.
        line: usize,
        /// The image, after ARG substitution.
        image: String,
    },
    /// `ADD` of a remote source.
    #[error("line {line}: ADD from a remote source {source_ref}")]
    RemoteAdd {
        /// Line.
        line: usize,
        /// The source.
        source_ref: String,
    },
    /// The final stage never sets `USER`.
    #[error("the final stage runs as root: no USER")]
    MissingUser,
    /// The final stage's `USER` is root or not numeric.
    #[error("line {line}: USER {user} must be a numeric non-root uid")]
    BadUser {
        /// Line.
        line: usize,
        /// The user.
        user: String,
    },
    /// The final stage's entrypoint is not an init process.
    #[error("the final stage's ENTRYPOINT does not start tini (signals would not be forwarded)")]
    MissingInit,
}

/// One instruction: keyword (upper case), arguments, first line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instruction {
    /// `FROM`, `RUN`, ...
    pub keyword: String,
    /// Everything after the keyword, continuation lines joined.
    pub args: String,
    /// 1-based line of the keyword.
    pub line: usize,
}

/// Splits a Dockerfile into instructions (comments dropped, `\` continuations joined).
pub fn instructions(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut current: Option<(usize, String)> = None;
    for (i, raw) in text.lines().enumerate() {
        let trimmed = raw.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && current.is_none()) {
            continue;
        }
        let (continues, body) = match trimmed.strip_suffix('\\') {
            Some(b) => (true, b),
            None => (false, trimmed),
        };
        let (line, mut text) = current.take().unwrap_or((i + 1, String::new()));
        if !text.is_empty() {
            text.push(' ');
        }
        text.push_str(body.trim());
        if continues {
            current = Some((line, text));
        } else if !text.is_empty() {
            let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
            out.push(Instruction {
                keyword: keyword.to_ascii_uppercase(),
                args: args.trim().to_string(),
                line,
            });
        }
    }
    out
}

fn substitute(text: &str, args: &BTreeMap<String, String>) -> String {
    let mut s = text.to_string();
    for (k, v) in args {
        s = s.replace(&format!("${{{k}}}"), v).replace(&format!("${k}"), v);
    }
    s
}

fn words(args: &str) -> Vec<&str> {
    args.split_whitespace().filter(|w| !w.starts_with("--")).collect()
}

/// Checks one Dockerfile's text.
pub fn check(text: &str) -> Vec<DockerViolation> {
    let mut out = Vec::new();
    let mut arg_defaults = BTreeMap::new();
    let mut stages = BTreeSet::new();
    // State of the stage being read: its USER instruction and ENTRYPOINT.
    let mut user: Option<(usize, String)> = None;
    let mut entrypoint: Option<String> = None;
    for ins in instructions(text) {
        match ins.keyword.as_str() {
            "ARG" => {
                if let Some((k, v)) = ins.args.split_once('=') {
                    arg_defaults
                        .insert(k.trim().to_string(), v.trim().trim_matches('"').to_string());
                }
            }
            "FROM" => {
                let w = words(&ins.args);
                let image = substitute(w.first().copied().unwrap_or(""), &arg_defaults);
                if let (Some(kw), Some(alias)) = (w.get(1), w.get(2)) {
                    if kw.eq_ignore_ascii_case("as") {
                        stages.insert(alias.to_ascii_lowercase());
                    }
                }
                let r = ImageRef::parse(&image);
                let distro = matches!(r.short_name(), "debian" | "ubuntu")
                    && r.tag.is_some_and(has_point_release);
                let known = image == "scratch" || stages.contains(&image.to_ascii_lowercase());
                if !known && (image.contains('$') || r.floats() || !(r.pinned() || distro)) {
                    out.push(DockerViolation::UnpinnedBase { line: ins.line, image });
                }
                user = None;
                entrypoint = None;
            }
            "ADD" => {
                for source in words(&ins.args).iter().rev().skip(1) {
                    let remote = ["http://", "https://", "ftp://", "git@", "git://"]
                        .iter()
                        .any(|p| source.starts_with(p));
                    if remote {
                        out.push(DockerViolation::RemoteAdd {
                            line: ins.line,
                            source_ref: source.to_string(),
                        });
                    }
                }
            }
            "USER" => user = Some((ins.line, ins.args.clone())),
            "ENTRYPOINT" => entrypoint = Some(ins.args.clone()),
            _ => {}
        }
    }
    match user {
        None => out.push(DockerViolation::MissingUser),
        Some((line, u)) => {
            let uid = u.split(':').next().unwrap_or("");
            if uid.parse::<u32>().map_or(true, |n| n == 0) {
                out.push(DockerViolation::BadUser { line, user: u });
            }
        }
    }
    let first_word = entrypoint.as_deref().map(|e| {
        e.trim_start_matches(['[', ' ']).split([',', ' ']).next().unwrap_or("").trim_matches('"')
    });
    if first_word.is_none_or(|w| w.rsplit('/').next() != Some("tini")) {
        out.push(DockerViolation::MissingInit);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn continuations_and_comments() {
        let ins = instructions("# c\nFROM a:1.2.3 AS b\nRUN x \\\n  # inside\n  && y\n\nUSER 1\n");
        assert_eq!(ins.len(), 3);
        assert_eq!(
            (ins[1].keyword.as_str(), ins[1].args.as_str(), ins[1].line),
            ("RUN", "x && y", 3)
        );
    }
}
