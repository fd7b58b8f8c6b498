//! Opening a model directory in the original Hugging Face layout.
//!
//! A checkpoint is `config.json` (DeepSeek-VL: nested `vision_config` / `aligner_config` /
//! `language_config`; DeepSeek LLM: a plain Llama config), weights as `model.safetensors` or as
//! shards listed in `model.safetensors.index.json` (any other single `*.safetensors` file is
//! accepted too), and the processor and tokenizer files next to them. The bundled tiny model
//! behaves exactly like a directory.

mod bundled;
mod weights;

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use safetensors::SafeTensors;
use serde::Deserialize;

pub use weights::ProgressFn;
use weights::{FirstError, TensorSource, WeightBackend};

use crate::ModelError;

/// Where a checkpoint comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModelSource {
    /// A directory on disk.
    Dir(PathBuf),
    /// The tiny random-weight model compiled into the binary.
    Bundled,
}

impl std::fmt::Display for ModelSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Dir(p) => write!(f, "{}", p.display()),
            Self::Bundled => f.write_str("bundled tiny-dsvl (random weights)"),
        }
    }
}

/// An opened checkpoint: parsed `config.json` and indexed (not yet loaded) weights.
pub struct Checkpoint {
    source: ModelSource,
    config: serde_json::Value,
    tensors: TensorSource,
    weight_bytes: u64,
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens `source`: reads `config.json` and memory-maps the safetensors.
    ///
    /// # Errors
    /// Missing or unreadable files, malformed JSON, or an index naming absent shards.
    pub fn open(source: &ModelSource) -> Result<Self, ModelError> {
        match source {
            ModelSource::Bundled => Self::bundled(),
            ModelSource::Dir(dir) => Self::open_dir(dir),
        }
    }

    /// The bundled tiny model.
    pub fn bundled() -> Result<Self, ModelError> {
        let config =
            parse_json("config.json", bundled::file("config.json").expect("bundled config.json"))?;
        let bytes = bundled::file("model.safetensors").expect("bundled model.safetensors");
        let st = SafeTensors::deserialize(bytes)
            .map_err(|e| ModelError::config("bundled model.safetensors", e.to_string()))?;
        Ok(Self::from_parts(ModelSource::Bundled, config, TensorSource::Static(st)))
    }

    fn open_dir(dir: &Path) -> Result<Self, ModelError> {
        if !dir.is_dir() {
            return Err(ModelError::io(
                dir,
                std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory"),
            ));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read(&config_path).map_err(|e| ModelError::io(&config_path, e))?;
        let config = parse_json(&config_path.display().to_string(), &text)?;
        let files = weight_files(dir)?;
        // SAFETY: the files are memory-mapped read-only; like every safetensors loader we assume
        // nobody truncates them while the model is being loaded.
        let mmap =
            unsafe { candle_core::safetensors::MmapedSafetensors::multi(&files) }.map_err(|e| {
                ModelError::config(
                    dir.display().to_string(),
                    format!("cannot map safetensors: {e}"),
                )
            })?;
        Ok(Self::from_parts(ModelSource::Dir(dir.to_path_buf()), config, TensorSource::Mmap(mmap)))
    }

    fn from_parts(source: ModelSource, config: serde_json::Value, tensors: TensorSource) -> Self {
        let weight_bytes = tensors.sizes().iter().map(|(_, s)| s).sum();
        Self { source, config, tensors, weight_bytes }
    }

    /// Where this checkpoint came from.
    pub fn source(&self) -> &ModelSource {
        &self.source
    }

    /// The parsed `config.json`.
    pub fn config(&self) -> &serde_json::Value {
        &self.config
    }

    /// Total bytes of all tensors in the checkpoint.
    pub fn weight_bytes(&self) -> u64 {
        self.weight_bytes
    }

    /// Names of every tensor, sorted.
    pub fn tensor_names(&self) -> Vec<String> {
        let mut names: Vec<String> = self.tensors.sizes().into_iter().map(|(n, _)| n).collect();
        names.sort();
        names
    }

    /// Reads a small side file (`preprocessor_config.json`, `tokenizer.json`, ...), `None` when
    /// the checkpoint does not have it.
    pub fn read_file(&self, name: &str) -> Result<Option<Cow<'static, [u8]>>, ModelError> {
        match &self.source {
            ModelSource::Bundled => Ok(bundled::file(name).map(Cow::Borrowed)),
            ModelSource::Dir(dir) => {
                let path = dir.join(name);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(Cow::Owned(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(ModelError::io(&path, e)),
                }
            }
        }
    }

    /// BLAKE3 over the name, dtype, shape and bytes of every tensor whose name starts with one
    /// of `prefixes` (sorted by name): identifies the weights independently of file layout.
    pub fn digest_tensors(&self, prefixes: &[&str]) -> blake3::Hash {
        let mut names: Vec<String> = self
            .tensor_names()
            .into_iter()
            .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
            .collect();
        names.sort();
        let mut h = blake3::Hasher::new();
        for name in names {
            if let Some(view) = self.tensors.view_of(&name) {
                h.update(&(name.len() as u64).to_le_bytes());
                h.update(name.as_bytes());
                h.update(format!("{:?}{:?}", view.dtype(), view.shape()).as_bytes());
                h.update(&(view.data().len() as u64).to_le_bytes());
                h.update_rayon(view.data());
            }
        }
        h.finalize()
    }

    /// Parses a sub-config of `config.json` by key (`vision_config`, `language_config`, ...).
    pub fn sub_config<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, ModelError> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| ModelError::config("config.json", format!("{key}: {e}"))),
        }
    }

    /// Builds a model from the weights: `build` gets a `VarBuilder` rooted at the checkpoint
    /// and converting to `dtype` on `device`. Missing or mis-shaped tensors come back as
    /// [`ModelError::MissingTensor`] / [`ModelError::ShapeMismatch`]; progress (bytes of the
    /// tensors under `prefixes`) goes to `progress`.
    pub fn build<T>(
        &self,
        dtype: DType,
        device: &Device,
        prefixes: &[&str],
        progress: Option<ProgressFn>,
        build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
    ) -> Result<T, ModelError> {
        let errors = Arc::new(FirstError::default());
        let backend = WeightBackend::new(&self.tensors, prefixes, progress, errors.clone());
        let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
        build(vb).map_err(|e| errors.take_or(e))
    }
}

fn parse_json(name: &str, bytes: &[u8]) -> Result<serde_json::Value, ModelError> {
    serde_json::from_slice(bytes).map_err(|e| ModelError::config(name, e.to_string()))
}

/// The safetensors files of a directory: the shards of the index if there is one, else
/// `model.safetensors`, else the only `*.safetensors` file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read(&index_path).map_err(|e| ModelError::io(&index_path, e))?;
        let index: SafetensorsIndex = serde_json::from_slice(&text)
            .map_err(|e| ModelError::config(index_path.display().to_string(), e.to_string()))?;
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(ModelError::config(
                index_path.display().to_string(),
                format!("lists shard {} which does not exist", missing.display()),
            ));
        }
        return Ok(files);
    }
    let single = dir.join("model.safetensors");
    if single.exists() {
        return Ok(vec![single]);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(|e| ModelError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found),
        0 => Err(ModelError::config(dir.display().to_string(), "no model.safetensors or model.safetensors.index.json")),
        n => Err(ModelError::config(
            dir.display().to_string(),
            format!("{n} safetensors files but no model.safetensors.index.json saying how they fit together"),
        )),
    }
}
