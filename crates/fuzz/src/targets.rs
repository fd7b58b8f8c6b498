//! The target functions. The gateway's configuration and the bundled tiny model's tokenizer
//! are made once per process; image limits are tighter than production so each execution
//! stays fast, on the same code path.

use std::io::Cursor;
use std::sync::OnceLock;

use candle_core::Device;
use clap::Parser;
use dsvl_core::codec::{self, CodecError};
use dsvl_core::{EmbeddingSeal, ImageLimits};
use dsvl_gateway::config::GatewayConfig;
use dsvl_gateway::served::ServedModel;
use dsvl_gateway::untrusted;
use dsvl_models::preprocess::{PreprocessConfig, Preprocessor};
use dsvl_parallel::{FrameLimits, Message};
use prost::Message as _;

struct Gateway {
    config: GatewayConfig,
    model: ServedModel,
}

fn gateway() -> &'static Gateway {
    static G: OnceLock<Gateway> = OnceLock::new();
    G.get_or_init(|| {
        let args = dsvl_gateway::Args::try_parse_from([
            "fuzz",
            "--decoder",
            "unused:1",
            "--allow-unauthenticated",
            "--insecure",
            "--image-url-allow",
            "images.example.com,*.example.org",
        ])
        .expect("static arguments");
        let config = GatewayConfig::try_from(&args).expect("static configuration");
        let model = ServedModel::load(None, config.model_name.clone()).expect("bundled model");
        Gateway { config, model }
    })
}

fn preprocessor() -> &'static Preprocessor {
    static P: OnceLock<Preprocessor> = OnceLock::new();
    P.get_or_init(|| {
        let limits = ImageLimits {
            max_input_bytes: 4 << 20,
            max_width: 4096,
            max_height: 4096,
            max_alloc: 128 << 20,
            max_pixels: 4 << 20,
        };
        let config = PreprocessConfig::from_json(r#"{"image_size": 384, "do_normalize": false}"#)
            .expect("static config");
        Preprocessor::new(config, limits)
    })
}

/// A `POST /v1/chat/completions` body through validation, the template and the tokenizer.
pub fn openai_chat(data: &[u8]) {
    let g = gateway();
    if let Ok(p) = untrusted::openai_chat(&g.config, &g.model, data) {
        assert!(!p.prompt.ids.is_empty(), "an accepted request has a prompt");
    }
}

/// A `POST /v1/completions` body through validation and the tokenizer.
pub fn openai_completion(data: &[u8]) {
    let g = gateway();
    let _ = untrusted::openai_completion(&g.config, &g.model, data);
}

/// A `dsvl.v1.ChatRequest` as it comes off the wire, then validation, template and tokenizer.
pub fn grpc_chat(data: &[u8]) {
    let Ok(request) = dsvl_proto::v1::ChatRequest::decode(data) else { return };
    let g = gateway();
    let _ = untrusted::grpc_chat(&g.config, &g.model, request);
}

/// An `image_url` value; the bytes of a `data:` URL go on through image decoding.
pub fn image_url(data: &[u8]) {
    let Ok(url) = std::str::from_utf8(data) else { return };
    if let Ok(Some(bytes)) = untrusted::image_url(&gateway().config, url) {
        image_decode(&bytes);
    }
}

/// Image bytes through decode and preprocess (what the vision-encoder runs).
pub fn image_decode(data: &[u8]) {
    if let Ok(out) = preprocessor().preprocess_bytes(data) {
        assert_eq!(out.pixel_values.len(), 3 * 384 * 384);
    }
}

/// Deadline headers: the first byte picks `x-request-timeout`, `x-stainless-timeout` or
/// `grpc-timeout`; the rest is the value.
pub fn deadline(data: &[u8]) {
    let Some((&which, value)) = data.split_first() else { return };
    match which % 3 {
        0 | 1 => {
            if let Some(Ok(d)) = untrusted::openai_deadline(which % 3 == 1, value) {
                assert!(d <= std::time::Duration::from_secs(600), "capped at the gateway's own");
            }
        }
        _ => {
            let Ok(v) = tonic::metadata::MetadataValue::try_from(value) else { return };
            let mut meta = tonic::metadata::MetadataMap::new();
            meta.insert("grpc-timeout", v);
            let _ = dsvl_telemetry::deadline::grpc_timeout(&meta);
        }
    }
}

/// A value read from the embedding cache. The first byte picks raw parsing, or parsing with the
/// seal recomputed (so the fuzzer gets past it to the payload checks); a value that parses
/// must encode back to the same bytes.
pub fn embedding_value(data: &[u8]) {
    let Some((&mode, value)) = data.split_first() else { return };
    let seal = EmbeddingSeal::public();
    let mut value = value.to_vec();
    let mut parsed = codec::decode(&value, &seal, "k").map(|(h, p)| (h, p.to_vec()));
    if mode & 1 == 1 && matches!(parsed, Err(CodecError::Seal)) {
        if let Some(h) = header_len(&value) {
            let mac = seal.mac("k", &value[..h], &value[h + 32..]);
            value[h..h + 32].copy_from_slice(mac.as_bytes());
            parsed = codec::decode(&value, &seal, "k").map(|(h, p)| (h, p.to_vec()));
        }
    }
    if let Ok((header, payload)) = parsed {
        assert_eq!(codec::encode(&header, &payload, &seal, "k"), value, "encode(decode(v)) == v");
    }
}

/// Where the seal starts in a value whose header parsed: the header ends with the payload's
/// length, and the seal and the payload fill the rest.
fn header_len(v: &[u8]) -> Option<usize> {
    (22..v.len().saturating_sub(31)).find(|&h| {
        let len = u64::from_le_bytes(v[h - 8..h].try_into().expect("8 bytes"));
        len == (v.len() - h - 32) as u64
    })
}

/// A tensor-parallel frame, as a rank reads it from a peer (group limits, but at most 64 MiB
/// per tensor here); a frame that parses is turned into tensors and written back unchanged.
pub fn tp_frame(data: &[u8]) {
    let limits = FrameLimits { max_tensor_bytes: 64 << 20, ..FrameLimits::GROUP };
    let Ok(msg) = Message::read_limited(&mut Cursor::new(data), limits) else { return };
    for t in &msg.tensors {
        let _ = t.to_tensor(&Device::Cpu);
    }
    let mut out = Vec::new();
    msg.write_to(&mut out).expect("writing to memory");
    let again =
        Message::read_limited(&mut Cursor::new(&out), limits).expect("a written frame reads");
    assert_eq!(again.header, msg.header);
    let mut twice = Vec::new();
    again.write_to(&mut twice).expect("writing to memory");
    assert_eq!(twice, out, "a frame read back writes the same bytes");
}
