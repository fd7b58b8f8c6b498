//! Flags shared by every command that loads a model.

use std::path::PathBuf;

use anyhow::{Context, Result};
use clap::Args;
use dsvl_core::{DeviceSpec, WeightDType};
use dsvl_models::checkpoint::{Checkpoint, ModelSource};

/// `--model`, `--dtype`, `--device`.
#[derive(Args, Debug, Clone)]
pub struct ModelArgs {
    /// Hugging Face checkpoint directory in the original layout (e.g. deepseek-vl-7b-chat).
    /// Without it, the bundled tiny random-weight model is used.
    #[arg(long, env = "DSVL_MODEL")]
    pub model: Option<PathBuf>,
    /// Weight and activation dtype: f32, bf16 or f16.
    #[arg(long, default_value = "f32", env = "DSVL_DTYPE")]
    pub dtype: WeightDType,
    /// Device: cpu or cuda:N.
    #[arg(long, default_value = "cpu", env = "DSVL_DEVICE")]
    pub device: DeviceSpec,
}

impl ModelArgs {
    /// The checkpoint to open, announcing the bundled fallback on stderr.
    pub fn source(&self) -> ModelSource {
        match &self.model {
            Some(dir) => ModelSource::Dir(dir.clone()),
            None => {
                if std::env::var_os("DSVL_QUIET_BUNDLED").is_none() {
                    eprintln!("note: no --model given; using the bundled tiny-dsvl model (random weights, outputs are meaningless)");
                }
                ModelSource::Bundled
            }
        }
    }

    /// Opens the checkpoint.
    pub fn open(&self) -> Result<Checkpoint> {
        let source = self.source();
        Checkpoint::open(&source).with_context(|| format!("cannot open model {source}"))
    }
}
