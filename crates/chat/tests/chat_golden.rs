//! Template, tokenizer and expansion parity with the reference on `golden/chat.json`.

use anyhow::Result;
use dsvl_chat::{render_prompt, ChatTokenizer, IncrementalDecoder, Message};
use dsvl_testkit::{golden_dir, tiny_model_dir};
use serde_json::Value;

fn tokenizer() -> Result<ChatTokenizer> {
    Ok(ChatTokenizer::from_bytes(&std::fs::read(tiny_model_dir().join("tokenizer.json"))?)?)
}

fn golden() -> Result<Value> {
    Ok(serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?)
}

fn ids(v: &Value) -> Vec<u32> {
    v.as_array().expect("id list").iter().map(|x| x.as_u64().expect("id") as u32).collect()
}

/// Every case: prompt string byte-exact, ids before and after expansion, image spans.
#[test]
fn every_case_matches_the_reference_processor() -> Result<()> {
    let tok = tokenizer()?;
    let g = golden()?;
    assert_eq!(tok.special().bos, g["bos_token_id"].as_u64().unwrap() as u32);
    assert_eq!(tok.special().eos, g["eos_token_id"].as_u64().unwrap() as u32);
    assert_eq!(tok.special().image, g["image_token_id"].as_u64().unwrap() as u32);
    let n_img = g["num_image_tokens"].as_u64().unwrap() as usize;
    for case in g["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone())?;
        let prompt = render_prompt(case["system_prompt"].as_str().unwrap(), &messages)?;
        assert_eq!(prompt, case["sft_format"].as_str().unwrap(), "{name}: prompt string");
        let p = tok.encode_prompt(&prompt, n_img)?;
        assert_eq!(
            p.ids_before_expansion,
            ids(&case["input_ids_before_image_expansion"]),
            "{name}: ids before expansion"
        );
        assert_eq!(p.ids, ids(&case["input_ids"]), "{name}: expanded ids");
        let spans: Vec<(usize, usize)> = case["image_token_spans"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| (s[0].as_u64().unwrap() as usize, s[1].as_u64().unwrap() as usize))
            .collect();
        assert_eq!(p.image_spans, spans, "{name}: spans");
    }
    Ok(())
}

/// Every tokenizer test: ids with BOS, token strings, decode with and without specials.
#[test]
fn tokenizer_tests_match() -> Result<()> {
    let tok = tokenizer()?;
    for t in golden()?["tokenizer_tests"].as_array().unwrap() {
        let text = t["text"].as_str().unwrap();
        let got = tok.encode(text)?;
        assert_eq!(got, ids(&t["ids_with_bos"]), "ids of {text:?}");
        let tokens: Vec<String> = t["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect();
        assert_eq!(tok.tokens(&got), tokens, "tokens of {text:?}");
        assert_eq!(
            tok.decode(&got, true)?,
            t["decoded_skip_special"].as_str().unwrap(),
            "decode skip of {text:?}"
        );
        assert_eq!(tok.decode(&got, false)?, t["decoded"].as_str().unwrap(), "decode of {text:?}");
    }
    Ok(())
}

/// Streaming: pieces are valid text (never a split character) and concatenate to the full
/// decode, including the reference's U+FFFD for lone added byte tokens.
#[test]
fn incremental_decoding_concatenates_to_full_decode() -> Result<()> {
    let tok = tokenizer()?;
    for t in golden()?["tokenizer_tests"].as_array().unwrap() {
        let all = ids(&t["ids_with_bos"]);
        let mut dec = IncrementalDecoder::new(true);
        let mut text = String::new();
        for &id in &all {
            if let Some(piece) = dec.push(&tok, id)? {
                assert!(!piece.ends_with('\u{FFFD}'), "piece {piece:?} ends mid-character");
                text.push_str(&piece);
            }
        }
        if let Some(rest) = dec.finish(&tok)? {
            text.push_str(&rest);
        }
        assert_eq!(text, tok.decode(&all, true)?, "stream of {:?}", t["text"]);
    }
    // The golden generations decode to the texts recorded in summary.json.
    let summary: Value =
        serde_json::from_slice(&std::fs::read(golden_dir().join("summary.json"))?)?;
    assert!(summary["generated_text"]["text"].as_str().unwrap().contains('\u{FFFD}'));
    Ok(())
}
