//! Opening a model directory in the original Hugging Face layout.
//!
//! A checkpoint is `config.json` (DeepSeek-VL: nested `vision_config` / `aligner_config` /
//! `language_config`; DeepSeek LLM: a plain Llama config), weights as `model.safetensors` or as
//! shards listed in `model.safetensors.index.json` (any other single `*.safetensors` file is
//! accepted too), and the processor and tokenizer files next to them. The bundled tiny model
//! behaves exactly like a directory.
//!
//! Weights are memory-mapped and only their headers are parsed here: names, dtypes, shapes and
//! byte ranges. Turning them into tensors is the model crate's business
//! (`dsvl_models::checkpoint`), so binaries that only need the served facts (the gateway) do
//! not link a tensor library.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorView};
use safetensors::SafeTensors;
use serde::Deserialize;

use crate::bundled;
use crate::CheckpointError;

/// The name a model is served under when none is given: the checkpoint directory's name, or
/// `tiny-dsvl` for the bundled model (one rule for the gateway's API and every tier's
/// `model_name` metric label).
pub fn default_model_name(dir: Option<&Path>) -> String {
    match dir {
        Some(p) => p
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_else(|| "deepseek-vl".into()),
        None => "tiny-dsvl".into(),
    }
}

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

/// The bytes of one safetensors file.
enum Buffer {
    Mapped(memmap2::Mmap),
    Static(&'static [u8]),
}

impl std::ops::Deref for Buffer {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Self::Mapped(m) => m,
            Self::Static(s) => s,
        }
    }
}

/// One safetensors file: its bytes and its parsed header.
struct Shard {
    /// The file name (no directory), for progress reports.
    file: String,
    buffer: Buffer,
    /// Where the tensor data starts (8-byte length + JSON header).
    data_start: usize,
    meta: Metadata,
}

impl Shard {
    fn parse(name: &str, buffer: Buffer) -> Result<Self, CheckpointError> {
        let (header_len, meta) = SafeTensors::read_metadata(&buffer)
            .map_err(|e| CheckpointError::config(name, format!("not a safetensors file: {e}")))?;
        let file = std::path::Path::new(name)
            .file_name()
            .map_or_else(|| name.to_string(), |f| f.to_string_lossy().into_owned());
        Ok(Self { file, data_start: 8 + header_len, meta, buffer })
    }

    fn view(&self, name: &str) -> Option<TensorView<'_>> {
        let info = self.meta.info(name)?;
        let (start, end) = info.data_offsets;
        let data = self.buffer.get(self.data_start + start..self.data_start + end)?;
        TensorView::new(info.dtype, info.shape.clone(), data).ok()
    }
}

#[derive(Deserialize)]
struct SafetensorsIndex {
    weight_map: std::collections::BTreeMap<String, String>,
}

/// An opened checkpoint: parsed `config.json` and indexed (not yet loaded) weights.
pub struct Checkpoint {
    source: ModelSource,
    config: serde_json::Value,
    shards: Vec<Shard>,
    /// Tensor name → index in `shards`.
    index: HashMap<String, usize>,
    weight_bytes: u64,
}

impl Checkpoint {
    /// Opens `source`: reads `config.json` and memory-maps the safetensors.
    ///
    /// # Errors
    /// Missing or unreadable files, malformed JSON, or an index naming absent shards.
    pub fn open(source: &ModelSource) -> Result<Self, CheckpointError> {
        match source {
            ModelSource::Bundled => Self::bundled(),
            ModelSource::Dir(dir) => Self::open_dir(dir),
        }
    }

    /// The bundled tiny model.
    ///
    /// # Errors
    /// Only if the embedded files are corrupt (a build problem).
    pub fn bundled() -> Result<Self, CheckpointError> {
        let config =
            parse_json("config.json", bundled::file("config.json").expect("bundled config.json"))?;
        let bytes = bundled::file("model.safetensors").expect("bundled model.safetensors");
        let shard = Shard::parse("bundled model.safetensors", Buffer::Static(bytes))?;
        Ok(Self::from_parts(ModelSource::Bundled, config, vec![shard]))
    }

    fn open_dir(dir: &Path) -> Result<Self, CheckpointError> {
        if !dir.is_dir() {
            let e = std::io::Error::new(std::io::ErrorKind::NotFound, "not a model directory");
            return Err(CheckpointError::io(dir, e));
        }
        let config_path = dir.join("config.json");
        let text = std::fs::read(&config_path).map_err(|e| CheckpointError::io(&config_path, e))?;
        let config = parse_json(&config_path.display().to_string(), &text)?;
        let mut shards = Vec::new();
        for file in weight_files(dir)? {
            let f = std::fs::File::open(&file).map_err(|e| CheckpointError::io(&file, e))?;
            // SAFETY: the file is mapped read-only; like every safetensors loader we assume
            // nobody truncates it while the model is being loaded.
            let mmap =
                unsafe { memmap2::Mmap::map(&f) }.map_err(|e| CheckpointError::io(&file, e))?;
            shards.push(Shard::parse(&file.display().to_string(), Buffer::Mapped(mmap))?);
        }
        Ok(Self::from_parts(ModelSource::Dir(dir.to_path_buf()), config, shards))
    }

    fn from_parts(source: ModelSource, config: serde_json::Value, shards: Vec<Shard>) -> Self {
        let mut index = HashMap::new();
        let mut weight_bytes = 0;
        for (i, shard) in shards.iter().enumerate() {
            for (name, info) in shard.meta.tensors() {
                weight_bytes += (info.data_offsets.1 - info.data_offsets.0) as u64;
                index.insert(name, i);
            }
        }
        Self { source, config, shards, index, weight_bytes }
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
        let mut names: Vec<String> = self.index.keys().cloned().collect();
        names.sort();
        names
    }

    /// A tensor's dtype, shape and bytes (memory-mapped, not copied).
    pub fn tensor(&self, name: &str) -> Option<TensorView<'_>> {
        self.shards[*self.index.get(name)?].view(name)
    }

    /// The file a tensor is stored in, its position among the checkpoint's files (from 1)
    /// and how many files there are: for progress reports.
    pub fn shard_of(&self, name: &str) -> Option<(&str, usize, usize)> {
        let i = *self.index.get(name)?;
        Some((self.shards[i].file.as_str(), i + 1, self.shards.len()))
    }

    /// Names and byte sizes of every tensor.
    pub fn tensor_sizes(&self) -> Vec<(String, u64)> {
        let mut out = Vec::with_capacity(self.index.len());
        for shard in &self.shards {
            for (name, info) in shard.meta.tensors() {
                out.push((name, (info.data_offsets.1 - info.data_offsets.0) as u64));
            }
        }
        out
    }

    /// Reads a small side file (`preprocessor_config.json`, `tokenizer.json`, ...), `None` when
    /// the checkpoint does not have it.
    ///
    /// # Errors
    /// The file exists but cannot be read.
    pub fn read_file(&self, name: &str) -> Result<Option<Cow<'static, [u8]>>, CheckpointError> {
        match &self.source {
            ModelSource::Bundled => Ok(bundled::file(name).map(Cow::Borrowed)),
            ModelSource::Dir(dir) => {
                let path = dir.join(name);
                match std::fs::read(&path) {
                    Ok(b) => Ok(Some(Cow::Owned(b))),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
                    Err(e) => Err(CheckpointError::io(&path, e)),
                }
            }
        }
    }

    /// BLAKE3 over the name, dtype, shape and bytes of every tensor whose name starts with one
    /// of `prefixes` (sorted by name): identifies the weights independently of file layout.
    pub fn digest_tensors(&self, prefixes: &[&str]) -> blake3::Hash {
        let names: BTreeSet<&String> =
            self.index.keys().filter(|n| prefixes.iter().any(|p| n.starts_with(p))).collect();
        let mut h = blake3::Hasher::new();
        for name in names {
            if let Some(view) = self.tensor(name) {
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
    ///
    /// # Errors
    /// The key is present but does not parse as `T`.
    pub fn sub_config<T: serde::de::DeserializeOwned>(
        &self,
        key: &str,
    ) -> Result<Option<T>, CheckpointError> {
        match self.config.get(key) {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(v) => serde_json::from_value(v.clone())
                .map(Some)
                .map_err(|e| CheckpointError::config("config.json", format!("{key}: {e}"))),
        }
    }
}

pub(crate) fn parse_json(name: &str, bytes: &[u8]) -> Result<serde_json::Value, CheckpointError> {
    serde_json::from_slice(bytes).map_err(|e| CheckpointError::config(name, e.to_string()))
}

/// The safetensors files of a directory: the shards of the index if there is one, else
/// `model.safetensors`, else the only `*.safetensors` file.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let index_path = dir.join("model.safetensors.index.json");
    if index_path.exists() {
        let text = std::fs::read(&index_path).map_err(|e| CheckpointError::io(&index_path, e))?;
        let index: SafetensorsIndex = serde_json::from_slice(&text).map_err(|e| {
            CheckpointError::config(index_path.display().to_string(), e.to_string())
        })?;
        let shards: BTreeSet<&String> = index.weight_map.values().collect();
        let files: Vec<PathBuf> = shards.into_iter().map(|s| dir.join(s)).collect();
        if let Some(missing) = files.iter().find(|f| !f.exists()) {
            return Err(CheckpointError::config(
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
        .map_err(|e| CheckpointError::io(dir, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    found.sort();
    match found.len() {
        1 => Ok(found),
        0 => Err(CheckpointError::config(
            dir.display().to_string(),
            "no model.safetensors or model.safetensors.index.json",
        )),
        n => Err(CheckpointError::config(
            dir.display().to_string(),
            format!(
                "{n} safetensors files but no model.safetensors.index.json saying how they fit \
                 together"
            ),
        )),
    }
}
