//! Checkpoint layouts and variants beyond the fixture: sharded weights, reduced-precision
//! storage, the SigLIP-only (1.3B-style) tower with the `mlp_gelu` aligner, and the errors for
//! missing or mis-shaped tensors.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};
use dsvl_models::vision::VisionEncoder;
use dsvl_models::ModelError;
use dsvl_testkit::{assert_close, golden_dir, tiny_model_dir};

fn tiny_tensors() -> Result<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(tiny_model_dir().join("model.safetensors"), &Device::Cpu)?)
}

/// A copy of the tiny checkpoint's side files in a fresh directory, with `tensors` as weights.
fn write_checkpoint(
    dir: &Path,
    config: &serde_json::Value,
    tensors: &HashMap<String, Tensor>,
) -> Result<()> {
    for f in [
        "preprocessor_config.json",
        "processor_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ] {
        std::fs::copy(tiny_model_dir().join(f), dir.join(f))?;
    }
    std::fs::write(dir.join("config.json"), serde_json::to_vec_pretty(config)?)?;
    candle_core::safetensors::save(tensors, dir.join("model.safetensors"))?;
    Ok(())
}

fn tiny_config() -> Result<serde_json::Value> {
    Ok(serde_json::from_slice(&std::fs::read(tiny_model_dir().join("config.json"))?)?)
}

fn golden_pixels() -> Result<Tensor> {
    let pre =
        candle_core::safetensors::load(golden_dir().join("preprocess.safetensors"), &Device::Cpu)?;
    let u8s = pre["photo_jpeg.pixel_values_u8"].flatten_all()?.to_dtype(DType::U32)?;
    Ok(pre["rescale_lut"].index_select(&u8s, 0)?.reshape((1, 3, 1024, 1024))?)
}

fn load_dir(dir: &Path, dtype: DType) -> Result<VisionEncoder, ModelError> {
    let ckpt = Checkpoint::open(&ModelSource::Dir(dir.to_path_buf()))?;
    VisionEncoder::load(&ckpt, dtype, &Device::Cpu, None)
}

/// Weights split over two shards with `model.safetensors.index.json` load to the same model.
#[test]
fn sharded_checkpoint_matches_single_file() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let tensors = tiny_tensors()?;
    write_checkpoint(dir.path(), &tiny_config()?, &HashMap::new())?;
    std::fs::remove_file(dir.path().join("model.safetensors"))?;
    let (mut a, mut b) = (HashMap::new(), HashMap::new());
    let mut weight_map = serde_json::Map::new();
    for (i, (name, t)) in tensors.iter().enumerate() {
        let (shard, file) = if i % 2 == 0 {
            (&mut a, "model-00001-of-00002.safetensors")
        } else {
            (&mut b, "model-00002-of-00002.safetensors")
        };
        shard.insert(name.clone(), t.clone());
        weight_map.insert(name.clone(), file.into());
    }
    candle_core::safetensors::save(&a, dir.path().join("model-00001-of-00002.safetensors"))?;
    candle_core::safetensors::save(&b, dir.path().join("model-00002-of-00002.safetensors"))?;
    let index = serde_json::json!({"metadata": {}, "weight_map": weight_map});
    std::fs::write(dir.path().join("model.safetensors.index.json"), serde_json::to_vec(&index)?)?;

    let pixels = golden_pixels()?;
    let sharded = load_dir(dir.path(), DType::F32)?.forward(&pixels)?;
    let single = load_dir(&tiny_model_dir(), DType::F32)?.forward(&pixels)?;
    assert_close("sharded vs single", &sharded, &single, 0.0, 0.0)?;

    // An index naming a shard that is not there is a clear error.
    std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors"))?;
    let err = Checkpoint::open(&ModelSource::Dir(dir.path().to_path_buf()))
        .err()
        .context("expected an error")?;
    assert!(err.to_string().contains("model-00002-of-00002.safetensors"), "{err}");
    Ok(())
}

/// Weights stored as bf16 or f16 load into any working dtype (converted on load).
#[test]
fn reduced_precision_storage_loads() -> Result<()> {
    let pixels = golden_pixels()?;
    let reference = load_dir(&tiny_model_dir(), DType::F32)?.forward(&pixels)?;
    for stored in [DType::BF16, DType::F16] {
        let dir = tempfile::tempdir()?;
        let tensors: HashMap<String, Tensor> = tiny_tensors()?
            .into_iter()
            .map(|(n, t)| Ok((n, t.to_dtype(stored)?)))
            .collect::<Result<_>>()?;
        write_checkpoint(dir.path(), &tiny_config()?, &tensors)?;
        let out = load_dir(dir.path(), DType::F32)?.forward(&pixels)?;
        // Only the weights were rounded: close to the f32 model, not equal.
        let d = assert_close(&format!("{stored:?} storage"), &out, &reference, 0.1, 0.05)?;
        assert!(d.max_abs > 0.0, "rounded weights cannot give identical outputs");
    }
    Ok(())
}

/// A missing tensor and a mis-shaped tensor are reported by name with both shapes.
#[test]
fn missing_and_misshaped_tensors_are_named() -> Result<()> {
    let missing = "vision_model.vision_tower_high.vision_tower.blocks.1.attn.rel_pos_h";
    let dir = tempfile::tempdir()?;
    let mut tensors = tiny_tensors()?;
    tensors.remove(missing);
    write_checkpoint(dir.path(), &tiny_config()?, &tensors)?;
    match load_dir(dir.path(), DType::F32) {
        Err(ModelError::MissingTensor { name, expected }) => {
            assert_eq!(name, missing);
            assert_eq!(expected, vec![127, 16]);
        }
        Err(other) => panic!("expected MissingTensor, got {other}"),
        Ok(_) => panic!("loading succeeded without {missing}"),
    }

    let reshaped = "aligner.layers.1.weight";
    let dir = tempfile::tempdir()?;
    let mut tensors = tiny_tensors()?;
    tensors.insert(reshaped.into(), Tensor::zeros((128, 64), DType::F32, &Device::Cpu)?);
    write_checkpoint(dir.path(), &tiny_config()?, &tensors)?;
    let err = load_dir(dir.path(), DType::F32).err().context("expected an error")?;
    let msg = err.to_string();
    assert!(matches!(err, ModelError::ShapeMismatch { .. }), "{msg}");
    assert!(
        msg.contains(reshaped) && msg.contains("[128, 64]") && msg.contains("[128, 128]"),
        "{msg}"
    );
    Ok(())
}

/// The 1.3B layout: `CLIPVisionTower` with SigLIP only (prefix `vision_model.vision_tower.`)
/// and an `mlp_gelu` aligner (`layers.0`, GELU, `layers.2`). Built from the tiny model's SigLIP
/// weights and fed the golden 384² input, its tower output must equal the golden `siglip_out`.
#[test]
fn siglip_only_tower_with_mlp_gelu_aligner() -> Result<()> {
    let golden =
        candle_core::safetensors::load(golden_dir().join("vision.safetensors"), &Device::Cpu)?;
    let mut config = tiny_config()?;
    let low = config["vision_config"]["params"]["low_res_cfg"].clone();
    config["vision_config"] =
        serde_json::json!({"cls": "CLIPVisionTower", "model_type": "vision", "params": low});
    config["aligner_config"] = serde_json::json!({"cls": "MlpProjector", "params": {"projector_type": "mlp_gelu", "depth": 2, "input_dim": 64, "n_embed": 128}});
    let mut tensors = HashMap::new();
    let dev = Device::Cpu;
    for (name, t) in tiny_tensors()? {
        if let Some(rest) = name.strip_prefix("vision_model.vision_tower_low.") {
            tensors.insert(format!("vision_model.{rest}"), t);
        }
    }
    let w0 = (Tensor::arange(0f32, (128 * 64) as f32, &dev)?.reshape((128, 64))? * 1e-4)?.sin()?;
    let w2 =
        (Tensor::arange(0f32, (128 * 128) as f32, &dev)?.reshape((128, 128))? * 3e-4)?.cos()?;
    let (b0, b2) = (Tensor::full(0.05f32, 128, &dev)?, Tensor::full(-0.02f32, 128, &dev)?);
    for (k, v) in [
        ("aligner.layers.0.weight", &w0),
        ("aligner.layers.0.bias", &b0),
        ("aligner.layers.2.weight", &w2),
        ("aligner.layers.2.bias", &b2),
    ] {
        tensors.insert(k.into(), v.clone());
    }
    let dir = tempfile::tempdir()?;
    write_checkpoint(dir.path(), &config, &tensors)?;
    let mut pre: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("preprocessor_config.json"))?)?;
    pre["image_size"] = 384.into();
    std::fs::write(dir.path().join("preprocessor_config.json"), serde_json::to_vec(&pre)?)?;

    let enc = load_dir(dir.path(), DType::F32)?;
    assert_eq!((enc.image_size(), enc.num_tokens(), enc.hidden_size()), (384, 576, 128));
    let input = golden["low_res_pixel_values"].narrow(0, 0, 1)?;
    let (emb, trace) = enc.forward_traced(&input)?;
    assert_close("siglip_out", &trace.siglip, &golden["siglip_out"].narrow(0, 0, 1)?, 1e-4, 1e-4)?;
    let hidden = trace.siglip.broadcast_matmul(&w0.t()?)?.broadcast_add(&b0)?.gelu_erf()?;
    let expected = hidden.broadcast_matmul(&w2.t()?)?.broadcast_add(&b2)?;
    assert_close("mlp_gelu aligner", &emb, &expected, 1e-5, 1e-5)?;
    Ok(())
}

/// A text-only checkpoint has no vision tower: a clear error, not a panic.
#[test]
fn text_only_checkpoint_has_no_vision_tower() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let config =
        serde_json::json!({"model_type": "llama", "hidden_size": 128, "num_hidden_layers": 1});
    write_checkpoint(dir.path(), &config, &tiny_tensors()?)?;
    let err = load_dir(dir.path(), DType::F32).err().context("expected an error")?;
    assert!(err.to_string().contains("text-only"), "{err}");
    Ok(())
}
