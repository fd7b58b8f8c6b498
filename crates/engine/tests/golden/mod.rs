//! The golden fixture shared by the decoder tests: the tiny checkpoint, its tokenizer, the
//! golden LM tensors and conversations, and the golden image's rows through our encoder.

use std::collections::HashMap;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_chat::{render_prompt, ChatTokenizer, Message};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::vision::VisionEncoder;
use dsvl_testkit::{golden_dir, tiny_model_dir};

pub struct Fixture {
    pub ckpt: Checkpoint,
    pub tok: ChatTokenizer,
    pub lm: HashMap<String, Tensor>,
    pub chat: serde_json::Value,
}

pub fn fixture() -> Result<Fixture> {
    let ckpt = Checkpoint::open(&ModelSource::Dir(tiny_model_dir()))?;
    let tok = ChatTokenizer::from_bytes(&std::fs::read(tiny_model_dir().join("tokenizer.json"))?)?;
    let lm = candle_core::safetensors::load(golden_dir().join("lm.safetensors"), &Device::Cpu)?;
    let chat = serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    Ok(Fixture { ckpt, tok, lm, chat })
}

pub fn case_ids(f: &Fixture, name: &str) -> Result<Vec<u32>> {
    let case =
        f.chat["cases"].as_array().unwrap().iter().find(|c| c["name"] == name).context("case")?;
    let messages: Vec<Message> = serde_json::from_value(case["conversation"].clone())?;
    let prompt = render_prompt(case["system_prompt"].as_str().unwrap(), &messages)?;
    Ok(f.tok.encode_prompt(&prompt, 576)?.ids)
}

pub fn golden_ids(t: &Tensor) -> Result<Vec<u32>> {
    Ok(t.flatten_all()?.to_vec1::<i64>()?.into_iter().map(|v| v as u32).collect())
}

/// The golden pixels of photo_jpeg through our vision encoder.
pub fn image_rows(f: &Fixture) -> Result<Tensor> {
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let u8s = pre["photo_jpeg.pixel_values_u8"].flatten_all()?.to_dtype(DType::U32)?;
    let pixels = pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?;
    let enc = VisionEncoder::load(&f.ckpt, DType::F32, &Device::Cpu, None)?;
    Ok(enc.forward(&pixels)?.reshape((576, 128))?)
}
