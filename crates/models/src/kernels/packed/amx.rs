//! The AMX tile for bf16 weights (Intel Sapphire Rapids and later): `tdpbf16ps` multiplies a
//! 16 x 32 bf16 tile by a 32 x 16 one into a 16 x 16 f32 tile, 8192 products per instruction,
//! against 32 per AVX-512 `vdpbf16ps`. Prefill and the vision towers run here; a block of fewer
//! rows than a tile (decode) would waste it, and stays on `vdpbf16ps`.
//!
//! The weight layout is the `vdpbf16ps` one (`[k/2][32][2]` per panel): read 64 bytes per pair
//! row with a 128-byte stride it is exactly the "VNNI" `B` tile of 16 columns, so one packing
//! serves both kernels (`k` padded to whole tiles of 32). The rows of `x` are bf16 in blocks of
//! 32 (zero-padded), laid out tile after tile: per 32 values of `k`, two contiguous 16 x 32 `A`
//! tiles.
//!
//! Rust has no stable AMX intrinsics; the instructions are written as inline assembly, the tile
//! registers named in it (the compiler never allocates them, so they live across the blocks of
//! one call). Linux hands out AMX state only on request (`arch_prctl(ARCH_REQ_XCOMP_PERM)`),
//! made once by [`has_amx`] before any kernel runs.

use std::arch::asm;
use std::sync::OnceLock;

use half::bf16;

/// Rows and columns of the tile one call computes (two by two `tdpbf16ps` tiles).
pub(super) const ROWS: usize = 32;

/// Pairs of `k` per `A`/`B` tile (64 bytes of bf16 per tile row).
pub(super) const PAIRS: usize = 16;

/// Values of `x` per block of rows and step of `k`: two 16 x 32 `A` tiles, contiguous (rows
/// `lda` apart in `x` would, at power-of-two `k`, all fall in one set of the L1 cache).
pub(super) const STEP: usize = ROWS * 2 * PAIRS;

/// The tile configuration: palette 1, eight 16-row x 64-byte tiles (`tmm0`-`tmm3` the f32
/// accumulators, `tmm4`-`tmm5` two 16-row blocks of `x`, `tmm6`-`tmm7` two 16-column halves of
/// the panel).
#[repr(C, align(64))]
struct Config([u8; 64]);

static CONFIG: Config = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64; // bytes per row (u16, little-endian)
        c[48 + t] = 16; // rows
        t += 1;
    }
    Config(c)
};

/// Whether AMX bf16 runs here: the processor has AMX-TILE and AMX-BF16 (and AVX512_BF16 for the
/// small blocks), the kernel granted this process the tile state, and `DSVL_CPU_AMX` is not
/// `off` (for comparing paths on one machine).
pub(crate) fn has_amx() -> bool {
    static AMX: OnceLock<bool> = OnceLock::new();
    *AMX.get_or_init(|| {
        if std::env::var("DSVL_CPU_AMX").is_ok_and(|v| matches!(v.trim(), "off" | "0")) {
            return false;
        }
        let leaf7 = std::arch::x86_64::__cpuid_count(7, 0);
        let (amx_bf16, amx_tile) = (leaf7.edx >> 22 & 1 == 1, leaf7.edx >> 24 & 1 == 1);
        amx_bf16 && amx_tile && super::has_avx512_bf16() && request_tile_state()
    })
}

/// `arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)`: asks Linux for the tile data state
/// (process-wide, threads included); false where the kernel refuses or predates it.
fn request_tile_state() -> bool {
    #[cfg(target_os = "linux")]
    {
        const SYS_ARCH_PRCTL: i64 = 158;
        const ARCH_REQ_XCOMP_PERM: i64 = 0x1023;
        const XFEATURE_XTILEDATA: i64 = 18;
        let ret: i64;
        // SAFETY: a system call that only changes this process's permitted xsave features.
        unsafe {
            asm!(
                "syscall",
                inlateout("rax") SYS_ARCH_PRCTL => ret,
                in("rdi") ARCH_REQ_XCOMP_PERM,
                in("rsi") XFEATURE_XTILEDATA,
                lateout("rcx") _,
                lateout("r11") _,
                options(nostack),
            );
        }
        if ret != 0 {
            tracing::info!("AMX present but not granted by the kernel (arch_prctl: {ret})");
        }
        ret == 0
    }
    #[cfg(not(target_os = "linux"))]
    {
        false
    }
}

/// Loads [`CONFIG`] on this thread, once: every AMX call here uses the same tiles, and only
/// this module uses AMX, so the configuration stays (a thread's tile state is saved and
/// restored with it by the kernel).
#[inline(always)]
unsafe fn configure() {
    thread_local!(static CONFIGURED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) });
    CONFIGURED.with(|done| {
        if !done.get() {
            asm!("ldtilecfg [{}]", in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
            done.set(true);
        }
    });
}

/// `c[32 x 32] (+)= a · b` over `kc` pairs of `k` (a multiple of [`PAIRS`]): `a` the rows'
/// [`STEP`]-value blocks, one after the other per step of `2 PAIRS` values of `k` (rows 0-15's
/// tile, then rows 16-31's, each row 64 bytes); `b` `kc` pair rows of a panel (`[kc][32][2]`);
/// `c` f32 rows `ldc` values apart.
///
/// # Safety
/// [`has_amx`] returned true; `a` holds `kc / PAIRS * STEP` values, `b` `64 * kc`, `c`
/// `31 * ldc + 32`.
pub(super) unsafe fn tile(
    kc: usize,
    a: *const bf16,
    b: *const bf16,
    c: *mut f32,
    ldc: usize,
    accumulate: bool,
) {
    debug_assert!(kc.is_multiple_of(PAIRS));
    let (lda_b, ldc_b, ldb_b) = (64usize, ldc * 4, 128usize);
    let c_lo = c.add(16 * ldc);
    configure();
    if accumulate {
        asm!(
            "tileloadd tmm0, [{c0} + {s}*1]",
            "tileloadd tmm1, [{c1} + {s}*1]",
            "tileloadd tmm2, [{c2} + {s}*1]",
            "tileloadd tmm3, [{c3} + {s}*1]",
            c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c_lo, c3 = in(reg) c_lo.add(16),
            s = in(reg) ldc_b,
            options(nostack, readonly),
        );
    } else {
        asm!("tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3", options(nostack));
    }
    for step in (0..kc).step_by(PAIRS) {
        let a0 = a.add(step / PAIRS * STEP);
        let (a1, b0) = (a0.add(STEP / 2), b.add(64 * step));
        asm!(
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {sb}*1]",
            "tileloadd tmm7, [{b1} + {sb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            a0 = in(reg) a0, a1 = in(reg) a1, b0 = in(reg) b0, b1 = in(reg) b0.add(32),
            sa = in(reg) lda_b, sb = in(reg) ldb_b,
            options(nostack, readonly),
        );
    }
    asm!(
        "tilestored [{c0} + {s}*1], tmm0",
        "tilestored [{c1} + {s}*1], tmm1",
        "tilestored [{c2} + {s}*1], tmm2",
        "tilestored [{c3} + {s}*1], tmm3",
        c0 = in(reg) c, c1 = in(reg) c.add(16), c2 = in(reg) c_lo, c3 = in(reg) c_lo.add(16),
        s = in(reg) ldc_b,
        options(nostack),
    );
}
