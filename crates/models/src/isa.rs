//! Which x86 vector instructions the CPU kernels run: chosen once at run time from what the
//! processor has, so one binary is fast on AVX2 machines (AMD EPYC before Zen 4) and on AVX-512
//! ones (Intel Xeon, Zen 4) without a `-C target-cpu` build.
//!
//! `DSVL_CPU_ISA=scalar|avx2|avx512` lowers the choice (never above what the processor has):
//! for comparing paths on one machine, and as a way out should a path misbehave on some CPU.
//! The linears' packed GEMM (`kernels::PackedWeight`) and the vision towers' fused attention
//! follow the same choice (the AMX bf16 path, on AVX-512 processors that have AMX, can be
//! turned off alone with `DSVL_CPU_AMX=off`); the remaining matrix multiplies (SAM's patch
//! convolution and relative-position products, the neck's convolutions, through candle and the
//! `gemm` crate) dispatch on their own, to AVX-512 where present (its `x86-v4` feature is on),
//! else AVX2 + FMA.

use std::sync::OnceLock;

/// A set of vector instructions a kernel is compiled for, narrowest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Isa {
    /// The baseline target (SSE2 on x86-64; whatever the target has elsewhere).
    Scalar,
    /// AVX2 + FMA, 8 f32 lanes.
    Avx2,
    /// AVX-512 F + VL (with AVX2 + FMA), 16 f32 lanes.
    Avx512,
}

impl Isa {
    /// The name `DSVL_CPU_ISA` uses.
    pub fn name(self) -> &'static str {
        match self {
            Self::Scalar => "scalar",
            Self::Avx2 => "avx2",
            Self::Avx512 => "avx512",
        }
    }

    /// Parses a name of [`Self::name`].
    pub fn parse(name: &str) -> Option<Self> {
        [Self::Scalar, Self::Avx2, Self::Avx512].into_iter().find(|i| i.name() == name)
    }

    /// The widest set this processor has.
    pub fn best() -> Self {
        static BEST: OnceLock<Isa> = OnceLock::new();
        *BEST.get_or_init(detect)
    }

    /// Every set this processor can run, narrowest first: what the kernel tests go through.
    pub fn supported() -> Vec<Self> {
        [Self::Scalar, Self::Avx2, Self::Avx512]
            .into_iter()
            .filter(|&i| i <= Self::best())
            .collect()
    }

    /// What the kernels use: [`Self::best`], lowered by `DSVL_CPU_ISA`.
    pub fn current() -> Self {
        static CURRENT: OnceLock<Isa> = OnceLock::new();
        *CURRENT.get_or_init(|| {
            let best = Self::best();
            match std::env::var("DSVL_CPU_ISA") {
                Ok(v) => match Self::parse(v.trim()) {
                    Some(asked) if asked <= best => asked,
                    Some(asked) => {
                        tracing::warn!(
                            "DSVL_CPU_ISA={} but this processor has {} at most",
                            asked.name(),
                            best.name()
                        );
                        best
                    }
                    None => {
                        tracing::warn!("DSVL_CPU_ISA={v} is not scalar, avx2 or avx512: ignored");
                        best
                    }
                },
                Err(_) => best,
            }
        })
    }

    /// `self`, lowered to what the processor has: running a kernel compiled for instructions
    /// the processor lacks would be undefined behaviour, so every dispatch goes through this.
    pub fn usable(self) -> Self {
        self.min(Self::best())
    }
}

fn detect() -> Isa {
    #[cfg(target_arch = "x86_64")]
    {
        let avx2 = std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma");
        let avx512 = avx2
            && std::is_x86_feature_detected!("avx512f")
            && std::is_x86_feature_detected!("avx512vl");
        if avx512 {
            return Isa::Avx512;
        }
        if avx2 {
            return Isa::Avx2;
        }
    }
    Isa::Scalar
}

/// Runs `$body` compiled for `$isa`'s instructions, with `$lanes` (a const generic in the body)
/// set to the width of its f32 vectors: 8 for the scalar and AVX2 builds, 16 for AVX-512. The
/// arguments are passed by name: each must be a variable of that name where the macro is used.
///
/// ```ignore
/// on_isa!(isa, <L> |row: &mut [f32]| -> () { softmax_row_impl::<L>(row) })
/// ```
macro_rules! on_isa {
    ($isa:expr, <$lanes:ident> |$($arg:ident : $ty:ty),*| -> $ret:ty $body:block) => {{
        #[inline(always)]
        fn portable<const $lanes: usize>($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx2,fma")]
        unsafe fn avx2<const $lanes: usize>($($arg: $ty),*) -> $ret $body
        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f,avx512vl,avx2,fma")]
        unsafe fn avx512<const $lanes: usize>($($arg: $ty),*) -> $ret $body
        match $crate::isa::Isa::usable($isa) {
            // SAFETY: `usable` never returns a set the processor lacks.
            #[cfg(target_arch = "x86_64")]
            $crate::isa::Isa::Avx512 => unsafe { avx512::<16>($($arg),*) },
            // SAFETY: as above.
            #[cfg(target_arch = "x86_64")]
            $crate::isa::Isa::Avx2 => unsafe { avx2::<8>($($arg),*) },
            _ => portable::<8>($($arg),*),
        }
    }};
}
pub(crate) use on_isa;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_stay_within_the_processor() {
        let supported = Isa::supported();
        assert_eq!(supported[0], Isa::Scalar);
        assert_eq!(*supported.last().unwrap(), Isa::best());
        assert!(Isa::current() <= Isa::best());
        for i in supported {
            assert_eq!(Isa::parse(i.name()), Some(i));
        }
        assert_eq!(Isa::parse("sse9"), None);
        eprintln!("this processor: {}", Isa::best().name());
    }

    #[test]
    fn the_lanes_follow_the_path() {
        fn lanes(isa: Isa, x: usize) -> usize {
            on_isa!(isa, <L> |x: usize| -> usize { x * L })
        }
        assert_eq!(lanes(Isa::Scalar, 1), 8);
        for isa in Isa::supported() {
            assert_eq!(lanes(isa, 2), if isa == Isa::Avx512 { 32 } else { 16 }, "{isa:?}");
        }
    }
}
