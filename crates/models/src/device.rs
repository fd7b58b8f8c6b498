//! Mapping a [`DeviceSpec`] to a candle device, with a clear error instead of a panic when the
//! build or the machine has no CUDA.

use candle_core::Device;
use dsvl_core::{DeviceSpec, WeightDType};

use crate::ModelError;

/// Opens the device. CUDA needs a build with the `cuda` feature and a working driver.
///
/// # Errors
/// [`ModelError::Device`] when the device cannot be used.
pub fn open_device(spec: DeviceSpec) -> Result<Device, ModelError> {
    match spec {
        DeviceSpec::Cpu => Ok(Device::Cpu),
        DeviceSpec::Cuda(ordinal) => open_cuda(ordinal),
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    let error = |reason: String| ModelError::Device { device: format!("cuda:{ordinal}"), reason };
    // cudarc panics (rather than returning an error) when the driver library cannot be used;
    // a missing GPU must be a clear error, never a crash.
    match std::panic::catch_unwind(|| Device::new_cuda(ordinal)) {
        Ok(Ok(device)) => Ok(device),
        Ok(Err(e)) => Err(error(format!(
            "cannot open the CUDA device (is an NVIDIA driver installed and the GPU visible?): {e}"
        ))),
        Err(panic) => {
            let what = panic
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| panic.downcast_ref::<&str>().copied())
                .unwrap_or("unknown");
            Err(error(format!("the CUDA driver is not usable on this machine ({what})")))
        }
    }
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Device {
        device: format!("cuda:{ordinal}"),
        reason: "this binary was built without CUDA support (rebuild with `--features cuda`)"
            .into(),
    })
}

/// The candle dtype of a [`WeightDType`].
pub fn candle_dtype(dtype: WeightDType) -> candle_core::DType {
    match dtype {
        WeightDType::F32 => candle_core::DType::F32,
        WeightDType::F16 => candle_core::DType::F16,
        WeightDType::BF16 => candle_core::DType::BF16,
    }
}
