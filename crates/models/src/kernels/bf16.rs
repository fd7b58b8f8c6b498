//! bf16 weights on the CPU: which instructions multiply them ([`Bf16Path`]), and widening a
//! bf16 to f32 where they are not multiplied as bf16.

use half::bf16;

use super::packed::has_amx;
use crate::isa::Isa;

/// A weight element: f32, or bf16 widened to f32 on the fly (a 16-bit shift; exact).
pub(crate) trait Weight: Copy + Send + Sync {
    /// The value as f32.
    fn widen(self) -> f32;
}

impl Weight for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Weight for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
}

/// How bf16 weights are multiplied.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Path {
    /// Widen each weight to f32 and use f32 FMAs of this width.
    Widen(Isa),
    /// AVX512_BF16 `vdpbf16ps`: 32 bf16 products per instruction.
    Avx512Bf16,
    /// AMX `tdpbf16ps` for blocks of 16 rows or more (8192 products per instruction), and
    /// `vdpbf16ps` below.
    Amx,
}

impl Bf16Path {
    /// The fastest path for `isa` (lowered to the processor) on this processor.
    pub fn for_isa(isa: Isa) -> Self {
        if isa.usable() == Isa::Avx512 && has_amx() {
            Self::Amx
        } else if isa.usable() == Isa::Avx512 && has_avx512_bf16() {
            Self::Avx512Bf16
        } else {
            Self::Widen(isa.usable())
        }
    }

    /// Every path this processor can run: what the tests go through.
    pub fn supported() -> Vec<Self> {
        let mut paths: Vec<Self> = Isa::supported().into_iter().map(Self::Widen).collect();
        if has_avx512_bf16() && Isa::best() == Isa::Avx512 {
            paths.push(Self::Avx512Bf16);
        }
        if has_amx() && Isa::best() == Isa::Avx512 {
            paths.push(Self::Amx);
        }
        paths
    }

    /// A short name for logs and benchmark output.
    pub fn name(self) -> String {
        match self {
            Self::Widen(isa) => format!("{}-widen", isa.name()),
            Self::Avx512Bf16 => "avx512-bf16".into(),
            Self::Amx => "amx".into(),
        }
    }
}

/// Whether the processor has AVX512_BF16 (`vdpbf16ps`).
pub(crate) fn has_avx512_bf16() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx512bf16")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bf16_path_follows_the_processor() {
        assert_eq!(Bf16Path::for_isa(Isa::Scalar), Bf16Path::Widen(Isa::Scalar));
        let best = Bf16Path::for_isa(Isa::best());
        assert!(Bf16Path::supported().contains(&best));
        let avx512 = Isa::best() == Isa::Avx512;
        assert_eq!(best == Bf16Path::Amx, has_amx() && avx512);
        assert_eq!(best == Bf16Path::Avx512Bf16, !has_amx() && has_avx512_bf16() && avx512);
        eprintln!("best bf16 path here: {}", best.name());
    }
}
