//! What the CPU benchmarks ran on, printed next to every figure: the processor model, the
//! vector instructions dsvl's kernels used, and the memory bandwidth a STREAM-like triad
//! reaches on the same machine in the same run, against which the bandwidth-bound batch-1
//! decode is judged (issue 18: ≥ 80 % of the triad).

use std::time::Instant;

use dsvl_models::isa::Isa;
use dsvl_models::kernels::PackPath;
use rayon::prelude::*;

/// The processor model, as `/proc/cpuinfo` names it.
pub fn processor_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| model_of(&info))
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}

/// `model name` of the first processor in `/proc/cpuinfo` text, with its family and model
/// numbers (VMs often report a bare "AMD EPYC" or "Intel(R) Xeon(R) Processor": the numbers tell
/// the generation, e.g. AMD family 25 is Zen 3/4 and 26 is Zen 5).
fn model_of(info: &str) -> Option<String> {
    let field = |key: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|k| k.trim() == key))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name")?;
    Some(match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f} model {m})"),
        _ => name,
    })
}

/// One line naming the processor, the path dsvl's kernels took and the extensions that decide
/// the matrix-multiply and bf16 paths.
pub fn describe() -> String {
    let mut extras = Vec::new();
    #[cfg(target_arch = "x86_64")]
    {
        if std::is_x86_feature_detected!("avx512f") {
            extras.push("avx512f");
        }
        if std::is_x86_feature_detected!("avx512bf16") {
            extras.push("avx512_bf16");
        }
        if std::fs::read_to_string("/proc/cpuinfo").is_ok_and(|i| i.contains(" amx_tile")) {
            extras.push("amx");
        }
    }
    format!(
        "processor: {} ({} threads available); dsvl kernels: {} (best {}), packed linears: {} \
         and {}; extensions: {}",
        processor_model(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        Isa::current().name(),
        Isa::best().name(),
        PackPath::current(false).name(),
        PackPath::current(true).name(),
        if extras.is_empty() { "none beyond the baseline".into() } else { extras.join(", ") }
    )
}

#[inline(always)]
fn triad_impl(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    for ((a, &b), &c) in a.iter_mut().zip(b).zip(c) {
        *a = b + s * c;
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx2,fma")]
unsafe fn triad_avx512(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    triad_impl(a, b, c, s)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn triad_avx2(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    triad_impl(a, b, c, s)
}

fn triad(a: &mut [f32], b: &[f32], c: &[f32], s: f32) {
    match Isa::best() {
        // SAFETY: `best` only names instructions the processor has.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx512 => unsafe { triad_avx512(a, b, c, s) },
        // SAFETY: as above.
        #[cfg(target_arch = "x86_64")]
        Isa::Avx2 => unsafe { triad_avx2(a, b, c, s) },
        _ => triad_impl(a, b, c, s),
    }
}

/// STREAM's triad `a = b + s c` in f32 on the rayon pool (the threads the model uses), over
/// arrays of at least 4x the last-level cache (STREAM's rule) and 256 MiB; the best of
/// `reps` passes, counting 12 bytes per element as STREAM does. Bytes per second.
pub fn triad_bandwidth(reps: usize) -> f64 {
    let per_array = (4 * dsvl_models::cpu_caches::last_level_bytes()).max(256 << 20);
    let n = per_array / 4;
    let chunk = 1 << 16;
    // First touch in parallel, so pages are spread as the timed passes will use them.
    let mut a = vec![0f32; n];
    let mut b = vec![0f32; n];
    let mut c = vec![0f32; n];
    a.par_chunks_mut(chunk).for_each(|x| x.fill(1.0));
    b.par_chunks_mut(chunk).for_each(|x| x.fill(2.0));
    c.par_chunks_mut(chunk).for_each(|x| x.fill(0.5));
    let mut best = f64::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        a.par_chunks_mut(chunk)
            .zip(b.par_chunks(chunk))
            .zip(c.par_chunks(chunk))
            .for_each(|((a, b), c)| triad(a, b, c, 3.0));
        best = best.min(t.elapsed().as_secs_f64());
    }
    assert!(a[n / 2] == 3.5, "triad computed {}, not 3.5", a[n / 2]);
    (12 * n) as f64 / best
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn family_and_model_follow_the_name() {
        let info = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 26\nmodel\t\t: 2\n\
                    model name\t: AMD EPYC\nstepping\t: 1\n";
        assert_eq!(model_of(info).as_deref(), Some("AMD EPYC (family 26 model 2)"));
        assert_eq!(model_of("model name\t: X\n").as_deref(), Some("X"));
        assert_eq!(model_of("vendor_id\t: Y\n"), None);
    }

    #[test]
    fn the_machine_is_described() {
        let d = describe();
        assert!(d.contains("processor: ") && d.contains("dsvl kernels: "), "{d}");
        assert!(!processor_model().is_empty());
    }
}
