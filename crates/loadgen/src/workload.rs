//! What the load generator sends: a built-in mix of request kinds, or requests read from a
//! JSONL file. Items are made on demand from their index, so a run of any length needs no
//! memory per request and the same seed gives the same requests.
//!
//! The built-in mix has four kinds, as serving benchmarks use them:
//! - `text`: a short text question with a fresh prompt (no prefix shared with other requests);
//! - `image`: one image and a question; the image is one of `distinct_images` variants of the
//!   bundled (or given) images, each with a few pixels changed, so each variant is encoded once;
//! - `multiturn`: a conversation of three turns about a recurring image (a cache hit for the
//!   image and a prefix the decoder has seen);
//! - `long`: a long text prompt (`long_words` words, about 1.3 tokens each).
//!
//! A workload file has one OpenAI chat request per line: `messages` as the OpenAI API takes
//! them, `max_tokens`, and optionally `timeout_s` and `kind` (a label for the report). An
//! `image_url` may be a `data:` URL, an `http(s)` URL (OpenAI HTTP only), or a file path,
//! relative to the workload file. Other fields (`temperature`, `ignore_eos`, ...) are sent as
//! they are over HTTP.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use bytes::Bytes;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Map, Value};

use crate::LoadError;

/// An encoded image, with its `data:` URL made once.
#[derive(Debug)]
pub struct Image {
    pub bytes: Bytes,
    pub data_url: String,
}

impl Image {
    pub fn new(bytes: Vec<u8>) -> Self {
        let mime = match image::guess_format(&bytes) {
            Ok(image::ImageFormat::Jpeg) => "image/jpeg",
            Ok(image::ImageFormat::WebP) => "image/webp",
            _ => "image/png",
        };
        let b64 = base64::engine::general_purpose::STANDARD.encode(&bytes);
        Self { data_url: format!("data:{mime};base64,{b64}"), bytes: bytes.into() }
    }
}

/// One part of a message.
#[derive(Debug, Clone)]
pub enum Part {
    Text(String),
    Image(Arc<Image>),
    /// An `http(s)` URL, fetched by the gateway (OpenAI HTTP only).
    ImageUrl(String),
}

#[derive(Debug, Clone)]
pub struct Message {
    pub role: String,
    pub parts: Vec<Part>,
}

/// One request.
#[derive(Debug, Clone)]
pub struct WorkItem {
    /// The kind, for the report (`text`, `image`, ... or a file's `kind`).
    pub kind: Arc<str>,
    pub messages: Vec<Message>,
    pub max_tokens: u32,
    /// This request's deadline, when it has its own.
    pub timeout: Option<Duration>,
    /// Other OpenAI fields, sent as they are over HTTP.
    pub extra: Map<String, Value>,
}

/// The weights of the built-in mix's kinds.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Mix {
    pub text: u32,
    pub image: u32,
    pub multiturn: u32,
    pub long: u32,
}

impl Default for Mix {
    fn default() -> Self {
        Self { text: 1, image: 1, multiturn: 1, long: 1 }
    }
}

impl std::str::FromStr for Mix {
    type Err = LoadError;

    /// `text=2,image=1,multiturn=1,long=0`; kinds left out weigh 0.
    fn from_str(s: &str) -> Result<Self, LoadError> {
        let mut mix = Mix { text: 0, image: 0, multiturn: 0, long: 0 };
        for pair in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let bad = || LoadError::Mix(format!("`{pair}` is not KIND=WEIGHT"));
            let (kind, weight) = pair.split_once('=').ok_or_else(bad)?;
            let weight: u32 = weight.trim().parse().map_err(|_| bad())?;
            match kind.trim() {
                "text" => mix.text = weight,
                "image" => mix.image = weight,
                "multiturn" => mix.multiturn = weight,
                "long" => mix.long = weight,
                other => {
                    return Err(LoadError::Mix(format!(
                        "unknown kind `{other}` (kinds: text, image, multiturn, long)"
                    )))
                }
            }
        }
        if mix.text + mix.image + mix.multiturn + mix.long == 0 {
            return Err(LoadError::Mix("every weight is 0".into()));
        }
        Ok(mix)
    }
}

/// Settings of the built-in mix.
#[derive(Debug, Clone)]
pub struct BuiltIn {
    pub mix: Mix,
    pub max_tokens: u32,
    pub long_words: usize,
    pub distinct_images: usize,
    /// A folder of images to use instead of the bundled ones.
    pub images: Option<PathBuf>,
    pub seed: u64,
    /// When set, request `i` is request `i % cycle`: the same requests come back, so the
    /// caches' content is bounded (a soak measures leaks, not caches filling up).
    pub cycle: Option<usize>,
    /// Other OpenAI fields for every request (HTTP only), e.g. `ignore_eos`.
    pub extra: Map<String, Value>,
    /// A share of the requests sent with another priority, reported as their own kind.
    pub urgent: Option<Urgent>,
}

/// Requests of another scheduling priority within the built-in mix (vLLM's `priority`: lower
/// values first): a seeded draw picks each with probability `share`, sends it with
/// `priority` and reports it under the kind `urgent`, so the report compares them with the
/// rest of the same load.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Urgent {
    pub share: f64,
    pub priority: i32,
}

/// The requests of a run.
pub enum Workload {
    BuiltIn { cfg: Box<BuiltIn>, originals: Vec<Arc<Image>>, variants: Vec<Arc<Image>> },
    File { items: Vec<WorkItem> },
}

const BUNDLED: [&[u8]; 2] = [
    include_bytes!("../../../assets/images/chelsea.png"),
    include_bytes!("../../../assets/images/rocket.jpg"),
];

const WORDS: &[&str] = &[
    "river", "orange", "engine", "quiet", "mountain", "signal", "paper", "garden", "window",
    "silver", "market", "planet", "winter", "coffee", "bridge", "library", "yellow", "forest",
    "number", "island", "camera", "pocket", "thunder", "marble", "velvet", "harbor", "lantern",
    "compass", "meadow", "circuit", "glacier", "pepper", "saddle", "tunnel", "violin", "walnut",
];

fn words(rng: &mut StdRng, n: usize) -> String {
    let mut s = String::with_capacity(n * 8);
    for i in 0..n {
        if i > 0 {
            s.push(' ');
        }
        s.push_str(WORDS[rng.random_range(0..WORDS.len())]);
    }
    s
}

fn text(role: &str, t: String) -> Message {
    Message { role: role.into(), parts: vec![Part::Text(t)] }
}

/// A copy of `img` with a few pixels set from `n`: the same picture, another content hash.
fn variant(img: &image::DynamicImage, n: usize) -> Result<Image, LoadError> {
    let mut rgb = img.to_rgb8();
    let (w, h) = rgb.dimensions();
    for k in 0..4u32 {
        let x = (n as u32).wrapping_mul(2654435761).wrapping_add(k * 97) % w;
        let y = (n as u32 / w.max(1) + k * 13) % h;
        rgb.put_pixel(x, y, image::Rgb([(n % 251) as u8, (n / 251 % 251) as u8, k as u8 * 60]));
    }
    let mut out = std::io::Cursor::new(Vec::new());
    rgb.write_to(&mut out, image::ImageFormat::Png)
        .map_err(|e| LoadError::Image(format!("encoding an image variant: {e}")))?;
    Ok(Image::new(out.into_inner()))
}

fn load_folder(dir: &Path) -> Result<Vec<Vec<u8>>, LoadError> {
    let read = |e: std::io::Error| LoadError::Image(format!("reading {}: {e}", dir.display()));
    let mut paths: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(read)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("").to_ascii_lowercase();
            matches!(ext.as_str(), "png" | "jpg" | "jpeg" | "webp" | "gif")
        })
        .collect();
    paths.sort();
    if paths.is_empty() {
        return Err(LoadError::Image(format!("no PNG, JPEG, WebP or GIF in {}", dir.display())));
    }
    paths.iter().map(|p| std::fs::read(p).map_err(read)).collect()
}

impl Workload {
    /// The built-in mix; makes the image variants up front.
    pub fn built_in(cfg: BuiltIn) -> Result<Self, LoadError> {
        let raw = match &cfg.images {
            Some(dir) => load_folder(dir)?,
            None => BUNDLED.iter().map(|b| b.to_vec()).collect(),
        };
        let decoded = raw
            .iter()
            .map(|b| image::load_from_memory(b).map_err(|e| LoadError::Image(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let variants = if cfg.mix.image > 0 {
            (0..cfg.distinct_images.max(1))
                .map(|n| variant(&decoded[n % decoded.len()], n).map(Arc::new))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let originals = raw.into_iter().map(|b| Arc::new(Image::new(b))).collect();
        Ok(Self::BuiltIn { cfg: Box::new(cfg), originals, variants })
    }

    /// Requests from a JSONL file (see the module docs).
    pub fn from_file(path: &Path) -> Result<Self, LoadError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| LoadError::Workload(format!("{}: {e}", path.display())))?;
        let base = path.parent().unwrap_or(Path::new("."));
        let mut items = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            let item = crate::workload_file::parse_line(line, base)
                .map_err(|e| LoadError::Workload(format!("{}:{}: {e}", path.display(), n + 1)))?;
            items.push(item);
        }
        if items.is_empty() {
            return Err(LoadError::Workload(format!("{} has no requests", path.display())));
        }
        Ok(Self::File { items })
    }

    /// Whether any request carries an image by URL (which gRPC cannot send).
    pub fn has_image_urls(&self) -> bool {
        match self {
            Self::BuiltIn { .. } => false,
            Self::File { items } => items.iter().any(|i| {
                i.messages.iter().flat_map(|m| &m.parts).any(|p| matches!(p, Part::ImageUrl(_)))
            }),
        }
    }

    /// Request number `i`.
    pub fn item(&self, i: usize) -> WorkItem {
        match self {
            Self::File { items } => items[i % items.len()].clone(),
            Self::BuiltIn { cfg, originals, variants } => {
                let i = cfg.cycle.map_or(i, |c| i % c.max(1));
                let mut rng = StdRng::seed_from_u64(cfg.seed ^ (i as u64).wrapping_mul(0x9E37));
                let m = cfg.mix;
                let roll = rng.random_range(0..m.text + m.image + m.multiturn + m.long);
                let (kind, messages) = if roll < m.text {
                    let n = rng.random_range(6..30);
                    let q = format!("Tell me about {}.", words(&mut rng, n));
                    ("text", vec![text("user", q)])
                } else if roll < m.text + m.image {
                    let img = variants[i % variants.len()].clone();
                    let q = format!("What is in this picture? {}", words(&mut rng, 4));
                    let parts = vec![Part::Image(img), Part::Text(q)];
                    ("image", vec![Message { role: "user".into(), parts }])
                } else if roll < m.text + m.image + m.multiturn {
                    let img = originals[i % originals.len()].clone();
                    let first = vec![Part::Image(img), Part::Text("Describe this picture.".into())];
                    let messages = vec![
                        Message { role: "user".into(), parts: first },
                        text("assistant", format!("It shows {}.", words(&mut rng, 12))),
                        text("user", format!("And the {}?", words(&mut rng, 3))),
                    ];
                    ("multiturn", messages)
                } else {
                    let body = words(&mut rng, cfg.long_words);
                    ("long", vec![text("user", format!("Summarise this: {body}"))])
                };
                let mut extra = cfg.extra.clone();
                // Drawn last, so the messages are the same with or without urgent requests.
                let kind = match cfg.urgent {
                    Some(u) if rng.random_bool(u.share.clamp(0.0, 1.0)) => {
                        extra.insert("priority".into(), u.priority.into());
                        "urgent"
                    }
                    _ => kind,
                };
                WorkItem {
                    kind: kind.into(),
                    messages,
                    max_tokens: cfg.max_tokens,
                    timeout: None,
                    extra,
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(mix: Mix) -> BuiltIn {
        BuiltIn {
            mix,
            max_tokens: 8,
            long_words: 50,
            distinct_images: 3,
            images: None,
            seed: 7,
            cycle: None,
            extra: Map::new(),
            urgent: None,
        }
    }

    /// A quarter of the requests, drawn by the seed, go out urgent with their priority; the
    /// messages are those of the same mix without urgent requests.
    #[test]
    fn urgent_requests_are_a_seeded_share_with_their_priority() {
        let plain = Workload::built_in(cfg(Mix::default())).unwrap();
        let urgent = Urgent { share: 0.25, priority: -3 };
        let w =
            Workload::built_in(BuiltIn { urgent: Some(urgent), ..cfg(Mix::default()) }).unwrap();
        let items: Vec<WorkItem> = (0..400).map(|i| w.item(i)).collect();
        let n = items.iter().filter(|it| &*it.kind == "urgent").count();
        assert!((70..130).contains(&n), "{n} of 400");
        for (i, it) in items.iter().enumerate() {
            let p = plain.item(i);
            assert_eq!(format!("{:?}", it.messages), format!("{:?}", p.messages), "request {i}");
            let priority = it.extra.get("priority").and_then(Value::as_i64);
            assert_eq!(priority, (&*it.kind == "urgent").then_some(-3), "request {i}");
        }
        assert_eq!(format!("{:?}", w.item(7)), format!("{:?}", items[7]), "repeatable");
    }

    #[test]
    fn the_mix_follows_its_weights_and_is_repeatable() {
        let w =
            Workload::built_in(cfg("text=1,image=1,multiturn=1,long=1".parse().unwrap())).unwrap();
        let kinds: Vec<_> = (0..400).map(|i| w.item(i).kind.to_string()).collect();
        for k in ["text", "image", "multiturn", "long"] {
            let n = kinds.iter().filter(|x| *x == k).count();
            assert!((60..=140).contains(&n), "{k}: {n} of 400");
        }
        let again: Vec<_> = (0..400).map(|i| w.item(i).kind.to_string()).collect();
        assert_eq!(kinds, again);
    }

    #[test]
    fn a_cycle_repeats_the_same_requests() {
        let w = Workload::built_in(BuiltIn { cycle: Some(5), ..cfg(Mix::default()) }).unwrap();
        for i in 0..5 {
            assert_eq!(
                format!("{:?}", w.item(i).messages),
                format!("{:?}", w.item(i + 5).messages)
            );
        }
        assert_ne!(format!("{:?}", w.item(0).messages), format!("{:?}", w.item(1).messages));
    }

    #[test]
    fn image_variants_differ_but_decode() {
        let w = Workload::built_in(cfg("image=1".parse().unwrap())).unwrap();
        let Workload::BuiltIn { variants, .. } = &w else { unreachable!() };
        assert_eq!(variants.len(), 3);
        assert_ne!(variants[0].bytes, variants[2].bytes);
        for v in variants {
            image::load_from_memory(&v.bytes).unwrap();
            assert!(v.data_url.starts_with("data:image/png;base64,"));
        }
    }

    #[test]
    fn a_bad_mix_is_refused_with_its_reason() {
        for (s, want) in [
            ("text=x", "not KIND=WEIGHT"),
            ("video=1", "unknown kind `video`"),
            ("text=0", "every weight is 0"),
        ] {
            let e = s.parse::<Mix>().unwrap_err().to_string();
            assert!(e.contains(want), "{s}: {e}");
        }
    }
}
