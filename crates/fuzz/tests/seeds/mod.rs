//! Hand-made seeds: one valid input of each shape a target parses, and a few near misses, so
//! campaigns start past the first layer of each parser.

use std::path::Path;

use base64::Engine as _;
use candle_core::{Device, Tensor};
use dsvl_core::codec::{encode, EmbeddingHeader};
use dsvl_core::{EmbeddingDType, EmbeddingSeal};
use dsvl_parallel::{Message, WireTensor};
use dsvl_proto::v1::content_part::Part;
use dsvl_proto::v1::{ChatMessage, ChatRequest, ContentPart, OutputFormat, SamplingParams};
use prost::Message as _;
use serde_json::json;

const TINY_PNG: &[u8] = include_bytes!("../../corpus/image_decode/tiny_3x2.png");

fn data_url() -> String {
    format!("data:image/png;base64,{}", base64::engine::general_purpose::STANDARD.encode(TINY_PNG))
}

fn chat_bodies() -> Vec<serde_json::Value> {
    let img = json!({"type": "image_url", "image_url": {"url": data_url()}});
    vec![
        json!({"model": "tiny-dsvl", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 8}),
        json!({"messages": [{"role": "system", "content": "Be brief."},
            {"role": "user", "content": [img, {"type": "text", "text": "What is this?"}]},
            {"role": "assistant", "content": "A cat."},
            {"role": "user", "content": "And?"}],
            "temperature": 0.7, "top_p": 0.9, "seed": 3, "n": 2, "stop": ["\n\n"], "stream": true,
            "stream_options": {"include_usage": true}, "logprobs": true, "top_logprobs": 2}),
        json!({"messages": [{"role": "user", "content": "JSON please"}],
            "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema":
                {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}}),
        json!({"messages": [{"role": "user", "content": "weather?"}], "tool_choice": "auto",
            "tools": [{"type": "function", "function": {"name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]}),
        json!({"messages": [{"role": "user", "content": [{"type": "image_url",
            "image_url": {"url": "https://images.example.com/cat.png"}}]}],
            "logit_bias": {"5": -100}, "frequency_penalty": 0.5, "max_completion_tokens": 4}),
        json!({"messages": [{"role": "user", "content": "x"}], "guided_regex": "[a-z]+", "ignore_eos": true}),
        // vLLM's extensions (seed 6; accepted).
        json!({"messages": [{"role": "user", "content": "Pick"}, {"role": "assistant", "content": "I pick"}],
            "continue_final_message": true, "echo": true, "min_tokens": 1, "max_tokens": 4,
            "include_stop_str_in_output": true, "stop": ["."], "prompt_logprobs": 1,
            "bad_words": ["no"], "allowed_token_ids": [5, 6, 7], "truncate_prompt_tokens": 30,
            "cache_salt": "s", "priority": -1, "request_id": "r-1", "skip_special_tokens": true}),
        json!({"messages": [{"role": "user", "content": "x"}],
            "structured_outputs": {"choice": ["a", "b"], "disable_fallback": true}}),
        // Strict tools under auto, a call in the history, usage in every chunk (accepted).
        json!({"messages": [{"role": "user", "content": "weather?"},
            {"role": "assistant", "content": null, "tool_calls": [{"id": "call_1", "type": "function",
                "function": {"name": "get_weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "rain"}],
            "tools": [{"type": "function", "function": {"name": "get_weather", "description": "w", "strict": true,
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}],
            "tool_choice": "auto", "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    ]
}

fn completion_bodies() -> Vec<serde_json::Value> {
    vec![
        json!({"model": "tiny-dsvl", "prompt": "Once upon a time", "max_tokens": 5}),
        json!({"prompt": [1, 2, 3, 4], "max_tokens": 2, "logprobs": 2, "echo": false}),
        json!({"prompt": "a", "stream": true, "stream_options": {"include_usage": true}, "stop": "b", "seed": 1}),
        // vLLM's extensions (seed 3; accepted).
        json!({"prompt": [1, 2, 3, 4, 5], "max_tokens": 2, "prompt_logprobs": 2, "truncate_prompt_tokens": 3,
            "guided_json": "{\"type\": \"object\"}", "request_id": "c-1", "cache_salt": "t"}),
        json!({"prompt": "a", "n": 2, "stream": true,
            "stream_options": {"include_usage": true, "continuous_usage_stats": true}}),
    ]
}

fn grpc_requests() -> Vec<ChatRequest> {
    let text = |t: &str| ContentPart { part: Some(Part::Text(t.into())) };
    vec![
        ChatRequest {
            messages: vec![ChatMessage { role: "user".into(), content: vec![text("Hi")] }],
            max_tokens: 8,
            ..Default::default()
        },
        ChatRequest {
            messages: vec![ChatMessage {
                role: "user".into(),
                content: vec![
                    ContentPart { part: Some(Part::Image(TINY_PNG.to_vec().into())) },
                    text("what?"),
                ],
            }],
            sampling: Some(SamplingParams {
                temperature: Some(0.5),
                seed: Some(9),
                top_k: Some(4),
                ..Default::default()
            }),
            stop: vec!["END".into()],
            n: 2,
            logprobs: true,
            top_logprobs: 1,
            ..Default::default()
        },
        ChatRequest {
            messages: vec![ChatMessage { role: "user".into(), content: vec![text("json")] }],
            output_format: Some(OutputFormat {
                kind: Some(dsvl_proto::v1::output_format::Kind::JsonObject(true)),
            }),
            stop_token_ids: vec![1, 2],
            ignore_eos: true,
            ..Default::default()
        },
        // vLLM's extensions (seed 3; accepted).
        ChatRequest {
            messages: vec![
                ChatMessage { role: "user".into(), content: vec![text("Pick")] },
                ChatMessage { role: "assistant".into(), content: vec![text("I pick")] },
            ],
            max_tokens: 4,
            min_tokens: 1,
            continue_final_message: true,
            prompt_logprobs: Some(1),
            bad_words: vec!["no".into()],
            allowed_token_ids: vec![5, 6, 7],
            truncate_prompt_tokens: Some(30),
            cache_salt: Some("s".into()),
            priority: 2,
            ..Default::default()
        },
    ]
}

fn embedding_values() -> Vec<Vec<u8>> {
    let seal = EmbeddingSeal::public();
    let h =
        |dtype, shape: Vec<u32>| EmbeddingHeader { dtype, shape, model_fingerprint: "fp".into() };
    let good = encode(&h(EmbeddingDType::BF16, vec![2, 3]), &[0u8; 12], &seal, "k");
    let f32v =
        encode(&h(EmbeddingDType::F32, vec![1, 2]), &1.5f32.to_le_bytes().repeat(2), &seal, "k");
    let mut nan =
        encode(&h(EmbeddingDType::F32, vec![1, 1]), &f32::NAN.to_le_bytes(), &seal, "other");
    nan.insert(0, 1);
    let mut forged = good.clone();
    *forged.last_mut().unwrap() ^= 1;
    forged.insert(0, 1);
    vec![[&[0u8][..], &good].concat(), [&[0u8][..], &f32v].concat(), nan, forged]
}

fn frames() -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut plain = Vec::new();
    Message::new(json!({"kind": "step", "seq": 1})).write_to(&mut plain).unwrap();
    out.push(plain);
    let mut m = Message::new(json!({"kind": "hidden"}));
    let t = Tensor::arange(0f32, 6., &Device::Cpu).unwrap().reshape((2, 3)).unwrap();
    m.tensors.push(WireTensor::from_tensor(&t).unwrap());
    m.tensors
        .push(WireTensor::from_tensor(&t.to_dtype(candle_core::DType::BF16).unwrap()).unwrap());
    let mut two = Vec::new();
    m.write_to(&mut two).unwrap();
    out.push(two.clone());
    two.truncate(two.len() - 3);
    out.push(two);
    out
}

/// Writes every seed into `corpus/<target>/seed-<n>`.
pub fn write(corpus: &Path) -> std::io::Result<()> {
    let json = |v: Vec<serde_json::Value>| {
        v.iter().map(|v| v.to_string().into_bytes()).collect::<Vec<_>>()
    };
    let sets: Vec<(&str, Vec<Vec<u8>>)> = vec![
        ("openai_chat", json(chat_bodies())),
        ("openai_completion", json(completion_bodies())),
        ("grpc_chat", grpc_requests().iter().map(|r| r.encode_to_vec()).collect()),
        (
            "image_url",
            [
                data_url().as_str(),
                "data:image/png,abc",
                "https://images.example.com/a.png",
                "http://10.0.0.1/x.png",
                "https://cdn.example.org:8443/a?b=c",
                "ftp://x/y",
            ]
            .iter()
            .map(|s| s.as_bytes().to_vec())
            .collect(),
        ),
        (
            "deadline",
            vec![
                b"\x0030".to_vec(),
                b"\x011.5".to_vec(),
                b"\x02100m".to_vec(),
                b"\x025S".to_vec(),
                b"\x00-1".to_vec(),
            ],
        ),
        ("embedding_value", embedding_values()),
        ("tp_frame", frames()),
    ];
    for (target, seeds) in sets {
        let dir = corpus.join(target);
        std::fs::create_dir_all(&dir)?;
        for (n, s) in seeds.iter().enumerate() {
            std::fs::write(dir.join(format!("seed-{n}")), s)?;
        }
    }
    Ok(())
}
