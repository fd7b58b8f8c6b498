//! Model weights from a checkpoint into candle: [`build_model`] gives a model
//! constructor a `VarBuilder` over the checkpoint's memory-mapped safetensors, naming the tensor
//! and both shapes on a mismatch and reporting progress.
//!
//! Opening the directory, its configs and side files is `dsvl_checkpoint`'s (no tensor
//! library); the types are re-exported here so model code has one import.

mod weights;

use std::sync::Arc;

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

pub use dsvl_checkpoint::{Checkpoint, ModelSource};
pub use weights::ProgressFn;
use weights::{FirstError, WeightBackend};

use crate::ModelError;

/// Builds a model from the weights of `ckpt`: `build` gets a `VarBuilder` rooted at the
/// checkpoint and converting to `dtype` on `device`. Missing or mis-shaped tensors come back as
/// [`ModelError::MissingTensor`] / [`ModelError::ShapeMismatch`]; progress (bytes of the tensors
/// under `prefixes`) goes to `progress`.
///
/// # Errors
/// The first weight problem, or the constructor's own error.
pub fn build_model<T>(
    ckpt: &Checkpoint,
    dtype: DType,
    device: &Device,
    prefixes: &[&str],
    progress: Option<ProgressFn>,
    build: impl FnOnce(VarBuilder<'_>) -> candle_core::Result<T>,
) -> Result<T, ModelError> {
    let errors = Arc::new(FirstError::default());
    let backend = WeightBackend::new(ckpt, prefixes, progress, errors.clone());
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    build(vb).map_err(|e| errors.take_or(e))
}
