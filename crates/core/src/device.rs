//! Device and dtype selection, parsed from the same strings on every command line.

use std::fmt;
use std::str::FromStr;

/// A flag value that could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {what} `{value}`: expected {expected}")]
pub struct ParseError {
    /// What was being parsed ("device", "dtype").
    pub what: &'static str,
    /// The rejected input.
    pub value: String,
    /// The accepted forms.
    pub expected: &'static str,
}

/// Where a model runs: `cpu`, or `cuda:N` (`cuda` alone means `cuda:0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum DeviceSpec {
    /// Host CPU (candle's gemm, multi-threaded through rayon).
    #[default]
    Cpu,
    /// CUDA device by ordinal.
    Cuda(usize),
}

impl FromStr for DeviceSpec {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err =
            || ParseError { what: "device", value: s.to_string(), expected: "cpu, cuda or cuda:N" };
        match s.trim().to_ascii_lowercase().as_str() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::Cuda(0)),
            other => match other.strip_prefix("cuda:") {
                Some(n) => n.parse().map(Self::Cuda).map_err(|_| err()),
                None => Err(err()),
            },
        }
    }
}

impl fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Cpu => f.write_str("cpu"),
            Self::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// Floating-point type the weights and activations are held in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum WeightDType {
    /// 32-bit float: the parity reference on CPU.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16: what the reference runs in on GPUs.
    BF16,
}

impl WeightDType {
    /// The canonical lower-case name (`f32`, `f16`, `bf16`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::BF16 => "bf16",
        }
    }

    /// Bytes per element.
    pub fn size_in_bytes(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 | Self::BF16 => 2,
        }
    }
}

impl FromStr for WeightDType {
    type Err = ParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" | "fp32" => Ok(Self::F32),
            "f16" | "float16" | "fp16" | "half" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::BF16),
            _ => Err(ParseError {
                what: "dtype",
                value: s.to_string(),
                expected: "f32, f16 or bf16",
            }),
        }
    }
}

impl fmt::Display for WeightDType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_devices() {
        assert_eq!("cpu".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cpu);
        assert_eq!("cuda".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(0));
        assert_eq!("cuda:3".parse::<DeviceSpec>().unwrap(), DeviceSpec::Cuda(3));
        assert!("cuda:x".parse::<DeviceSpec>().is_err());
        assert!("tpu".parse::<DeviceSpec>().is_err());
        assert_eq!(DeviceSpec::Cuda(2).to_string(), "cuda:2");
    }

    #[test]
    fn parses_dtypes() {
        assert_eq!("bf16".parse::<WeightDType>().unwrap(), WeightDType::BF16);
        assert_eq!("F32".parse::<WeightDType>().unwrap(), WeightDType::F32);
        let err = "f8".parse::<WeightDType>().unwrap_err();
        assert!(err.to_string().contains("f8"), "{err}");
    }
}
