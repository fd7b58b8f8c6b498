//! A candle `VarBuilder` backend over a checkpoint's safetensors (memory-mapped files or
//! embedded bytes) that
//! names the tensor and both shapes on a mismatch, converts dtypes on load, and reports
//! progress in bytes.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use safetensors::tensor::TensorView;

use dsvl_checkpoint::Checkpoint;

use crate::ModelError;

/// Called after each tensor is loaded ([`dsvl_core::progress::LoadProgress`]).
pub type ProgressFn = dsvl_core::progress::LoadProgressFn;

/// The first weight problem hit while building a model; candle's error type cannot carry a
/// typed payload, so the backend parks it here and the loader reports it after construction.
#[derive(Default)]
pub(crate) struct FirstError(Mutex<Option<ModelError>>);

impl FirstError {
    fn record(&self, e: ModelError) -> candle_core::Error {
        let msg = e.to_string();
        let mut slot = self.0.lock().expect("weight error slot poisoned. This is a bug.");
        if slot.is_none() {
            *slot = Some(e);
        }
        candle_core::Error::Msg(msg)
    }

    /// The recorded error, or the candle error if none was recorded.
    pub(crate) fn take_or(&self, fallback: candle_core::Error) -> ModelError {
        self.0
            .lock()
            .expect("weight error slot poisoned. This is a bug.")
            .take()
            .unwrap_or(ModelError::Candle(fallback))
    }
}

/// `SimpleBackend` implementation; see the module docs.
pub(crate) struct WeightBackend<'a> {
    source: &'a Checkpoint,
    errors: Arc<FirstError>,
    loaded: AtomicU64,
    total: u64,
    tensors_loaded: AtomicU64,
    tensors_total: usize,
    progress: Option<ProgressFn>,
}

impl<'a> WeightBackend<'a> {
    /// `prefixes` select the tensors the progress total counts (e.g. the vision tower only).
    pub(crate) fn new(
        source: &'a Checkpoint,
        prefixes: &[&str],
        progress: Option<ProgressFn>,
        errors: Arc<FirstError>,
    ) -> Self {
        let selected: Vec<u64> = source
            .tensor_sizes()
            .into_iter()
            .filter(|(n, _)| prefixes.iter().any(|p| n.starts_with(p)))
            .map(|(_, s)| s)
            .collect();
        Self {
            source,
            errors,
            loaded: AtomicU64::new(0),
            total: selected.iter().sum(),
            tensors_loaded: AtomicU64::new(0),
            tensors_total: selected.len(),
            progress,
        }
    }

    fn load(
        &self,
        name: &str,
        view: &TensorView<'_>,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let t = view.load(dev)?.to_dtype(dtype)?;
        let bytes = view.data().len() as u64;
        let done = self.loaded.fetch_add(bytes, Ordering::Relaxed) + bytes;
        let tensors = self.tensors_loaded.fetch_add(1, Ordering::Relaxed) as usize + 1;
        if let Some(p) = &self.progress {
            let (shard, shard_index, shards) = self.source.shard_of(name).unwrap_or(("", 0, 0));
            p(&dsvl_core::progress::LoadProgress {
                tensors_done: tensors,
                tensors_total: self.tensors_total.max(tensors),
                bytes_done: done,
                bytes_total: self.total.max(done),
                shard,
                shard_index,
                shards,
            });
        }
        Ok(t)
    }
}

impl SimpleBackend for WeightBackend<'_> {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let Some(view) = self.source.tensor(name) else {
            return Err(self.errors.record(ModelError::MissingTensor {
                name: name.into(),
                expected: s.dims().to_vec(),
            }));
        };
        if view.shape() != s.dims() {
            return Err(self.errors.record(ModelError::ShapeMismatch {
                name: name.into(),
                found: view.shape().to_vec(),
                expected: s.dims().to_vec(),
            }));
        }
        self.load(name, &view, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        match self.source.tensor(name) {
            Some(view) => self.load(name, &view, dtype, dev),
            None => Err(self
                .errors
                .record(ModelError::MissingTensor { name: name.into(), expected: vec![] })),
        }
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.source.tensor(name).is_some()
    }
}
