//! Random weights at real dimensions: a `VarBuilder` backend that invents every tensor the model
//! asks for (normal, std 0.02; norm weights 1), so benchmarks need no checkpoint; recorded, they
//! make one (`dsvl-bench random-checkpoint`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

/// Invents tensors; with `recorded`, keeps each (by name) for writing a checkpoint.
struct RandomWeights {
    recorded: Option<Recorded>,
}

/// Every tensor a recording [`recording_var_builder`] invented, by name.
pub type Recorded = Arc<Mutex<BTreeMap<String, Tensor>>>;

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let is_norm_weight =
            name.ends_with("weight") && (name.contains("norm") || name.contains("layernorm"));
        let t = if is_norm_weight {
            Tensor::ones(s, DType::F32, dev)?
        } else {
            Tensor::randn(0f32, 0.02, s, dev)?
        };
        let t = t.to_dtype(dtype)?;
        if let Some(recorded) = &self.recorded {
            let mut recorded = recorded.lock().expect("not poisoned");
            // A name asked for twice (a tied weight) is one tensor.
            return Ok(recorded.entry(name.to_string()).or_insert(t).clone());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// A `VarBuilder` producing random tensors of whatever shape is requested.
pub fn var_builder(dtype: DType, device: &Device) -> VarBuilder<'static> {
    VarBuilder::from_backend(Box::new(RandomWeights { recorded: None }), dtype, device.clone())
}

/// As [`var_builder`], keeping every tensor in `recorded`.
pub fn recording_var_builder(
    dtype: DType,
    device: &Device,
    recorded: Recorded,
) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomWeights { recorded: Some(recorded) }),
        dtype,
        device.clone(),
    )
}
