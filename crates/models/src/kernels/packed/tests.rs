use half::bf16;

use super::*;
use crate::kernels::tests::{paths, values};

/// Row counts below, at and above each kernel's `MR` (and AMX's 16-row threshold and 32-row
/// tile); columns with partial panels of every `NR`; `k` odd, below and across `KC` (and `KC`
/// pairs) and AMX's 32-value tiles.
const SHAPES: [(usize, usize, usize); 9] = [
    (1, 1, 1),
    (1, 70, 37),
    (5, 33, 300),
    (13, 31, 1031),
    (30, 96, 64),
    (7, 17, 2),
    (25, 65, 513),
    (16, 32, 32),
    (40, 45, 1100),
];

fn naive(x: &[f32], w: impl Fn(usize) -> f64, (m, n, k): (usize, usize, usize)) -> Vec<f64> {
    let mut y = vec![0f64; m * n];
    for i in 0..m {
        for j in 0..n {
            y[i * n + j] = (0..k).map(|t| f64::from(x[i * k + t]) * w(j * k + t)).sum();
        }
    }
    y
}

fn check(label: &str, got: &[f32], want: &[f64], k: usize) {
    assert_eq!(got.len(), want.len(), "{label}: output size");
    for (idx, (&g, &w)) in got.iter().zip(want).enumerate() {
        assert!((f64::from(g) - w).abs() < 1e-5 * k as f64, "{label} at {idx}: {g} vs {w}");
    }
}

#[test]
fn f32_matches_the_naive_product_on_every_path() {
    for (m, n, k) in SHAPES {
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let want = naive(&x, |i| f64::from(w[i]), (m, n, k));
        for isa in paths() {
            let packed = PackedWeight::pack_f32(&w, n, k, isa);
            assert_eq!(packed.dims(), (n, k));
            check(
                &format!("{} {m}x{n}x{k}", packed.path().name()),
                &packed.matmul(&x, m),
                &want,
                k,
            );
        }
    }
}

/// The in-place product of attention ([`PackedWeight::matmul_into`], the rows read where they
/// lie, on the calling thread) on every path: rows `ldx` apart with junk between them, the
/// output `ldc` apart with its padding columns zero and the values beyond untouched; weights
/// packed by rows (on this thread) and from `vᵀ` ([`PackedWeight::pack_f32_transposed`]).
#[test]
fn in_place_products_match_the_naive_product_on_every_path() {
    for (m, n, k) in SHAPES {
        let (ldx, ldc) = (k + 3, n.div_ceil(32) * 32 + 5);
        let x = values(m * ldx, 10);
        let dense: Vec<f32> = x.chunks(ldx).flat_map(|r| r[..k].to_vec()).collect();
        let w = values(n * k, 11);
        let want = naive(&dense, |i| f64::from(w[i]), (m, n, k));
        // `vᵀ`: `v` is `[k, n]` with `v[t][j] = w[j][t]`.
        let v: Vec<f32> =
            (0..k).flat_map(|t| (0..n).map(|j| w[j * k + t]).collect::<Vec<_>>()).collect();
        for isa in paths() {
            for packed in [
                PackedWeight::pack_f32_on_this_thread(&w, n, k, isa),
                PackedWeight::pack_f32_transposed(&v, k, n, isa),
            ] {
                let pn = packed.padded_n();
                assert!(pn >= n && pn % PackPath::F32(isa).panel_width() == 0);
                let mut out = vec![f32::NAN; m * ldc];
                packed.matmul_into(&x, ldx, m, &mut out, ldc);
                let label = format!("{} {m}x{n}x{k} in place", packed.path().name());
                let got: Vec<f32> = out.chunks(ldc).flat_map(|r| r[..n].to_vec()).collect();
                check(&label, &got, &want, k);
                for row in out.chunks(ldc) {
                    assert!(row[n..pn].iter().all(|&p| p == 0.0), "{label}: padding not zero");
                    assert!(row[pn..].iter().all(|p| p.is_nan()), "{label}: wrote past the panels");
                }
            }
        }
    }
}

/// Both blockings of [`Gemm::blocking`]: a cache-sized weight (row sub-chunks of 6 blocks,
/// one panel at a time) and one over [`SMALL_WEIGHT`] (whole chunks of rows by groups of
/// panels), each with more rows than one sub-chunk or chunk holds (700 rows on two threads
/// make at least two chunks with L2 up to 4 MiB), so the sub-chunk and group offsets into `y`
/// are exercised (bf16 on the first, on every bf16 path).
#[test]
fn both_blockings_match_the_naive_product() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let big_n = SMALL_WEIGHT / (4 * 1024) + 70;
    for (m, n, k) in [(150, 70, 300), (700, big_n, 1024)] {
        let x = values(m * k, 5);
        let w = values(n * k, 6);
        let want = naive(&x, |i| f64::from(w[i]), (m, n, k));
        for isa in paths() {
            let packed = PackedWeight::pack_f32(&w, n, k, isa);
            let y = pool.install(|| packed.matmul(&x, m));
            check(&format!("{} {m}x{n}x{k}", packed.path().name()), &y, &want, k);
        }
    }
    let (m, n, k) = (150, 70, 300);
    let xb: Vec<bf16> = values(m * k, 7).iter().map(|&v| bf16::from_f32(v)).collect();
    let x: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let w: Vec<bf16> = values(n * k, 8).iter().map(|&v| bf16::from_f32(v)).collect();
    let want = naive(&x, |i| f64::from(w[i].to_f32()), (m, n, k));
    for path in Bf16Path::supported() {
        let packed = PackedWeight::pack_bf16(&w, n, k, path);
        check(&format!("{} {m}x{n}x{k}", packed.path().name()), &packed.matmul(&xb, m), &want, k);
    }
}

#[test]
fn bf16_matches_the_naive_product_on_every_path() {
    let paths = Bf16Path::supported();
    eprintln!("bf16 paths run here: {paths:?}");
    for (m, n, k) in SHAPES {
        let xb: Vec<bf16> = values(m * k, 3).iter().map(|&v| bf16::from_f32(v)).collect();
        let x: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let w: Vec<bf16> = values(n * k, 4).iter().map(|&v| bf16::from_f32(v)).collect();
        let want = naive(&x, |i| f64::from(w[i].to_f32()), (m, n, k));
        for &path in &paths {
            let packed = PackedWeight::pack_bf16(&w, n, k, path);
            let label = format!("{} {m}x{n}x{k}", packed.path().name());
            // The activations of a bf16 model as bf16, and the same values carried as f32.
            check(&label, &packed.matmul(&xb, m), &want, k);
            check(&label, &packed.matmul(&x, m), &want, k);
        }
    }
}

/// A few rows (a decode step) read several panels at once: 1 to 7 rows (7 past every
/// kernel's limit, so the tile path too), with enough panels for each task to hold a full group
/// and a partial one (on two threads), a padded last panel and `k` over three `KC` blocks, on
/// every f32 and bf16 path. The rows are also bit-identical to the same rows inside a product
/// of 13 (which the tiles compute), so a sequence's logits do not depend on what it is
/// batched with.
#[test]
fn few_rows_match_the_naive_product_and_the_same_rows_among_others() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    let (n, k) = (32 * 45 + 5, 1100);
    let x = values(13 * k, 8);
    let w = values(n * k, 9);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
    let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
    let f32s: Vec<_> =
        paths().into_iter().map(|isa| PackedWeight::pack_f32(&w, n, k, isa)).collect();
    let bf16s: Vec<_> =
        Bf16Path::supported().into_iter().map(|p| PackedWeight::pack_bf16(&wb, n, k, p)).collect();
    pool.install(|| {
        let all: Vec<_> = f32s.iter().map(|p| p.matmul(&x, 13)).collect();
        let all_bf16: Vec<_> = bf16s.iter().map(|p| p.matmul(&xb, 13)).collect();
        for m in 1..=7 {
            let want = naive(&x[..m * k], |i| f64::from(w[i]), (m, n, k));
            for (p, all) in f32s.iter().zip(&all) {
                let label = format!("{} {m}x{n}x{k}", p.path().name());
                let few = p.matmul(&x[..m * k], m);
                check(&label, &few, &want, k);
                assert_eq!(bits(&few), bits(&all[..m * n]), "{label}: rows among 13");
            }
            let want = naive(&xbf[..m * k], |i| f64::from(wb[i].to_f32()), (m, n, k));
            for (p, all) in bf16s.iter().zip(&all_bf16) {
                let label = format!("{} {m}x{n}x{k}", p.path().name());
                let few = p.matmul(&xb[..m * k], m);
                check(&label, &few, &want, k);
                assert_eq!(bits(&few), bits(&all[..m * n]), "{label}: rows among 13");
            }
        }
    });
}

#[test]
fn many_rows_split_by_rows_match_the_naive_product() {
    // On two threads, 600 rows are enough chunks of `MC` rows for the row-parallel scheme;
    // 33 columns leave a padded last panel to drop.
    let pool = rayon::ThreadPoolBuilder::new().num_threads(2).build().unwrap();
    for (m, n, k) in [(600, 33, 70), (1000, 64, 300)] {
        let x = values(m * k, 5);
        let w = values(n * k, 6);
        let want = naive(&x, |i| f64::from(w[i]), (m, n, k));
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let xbf: Vec<f32> = xb.iter().map(|v| v.to_f32()).collect();
        let want_bf16 = naive(&xbf, |i| f64::from(wb[i].to_f32()), (m, n, k));
        pool.install(|| {
            for isa in paths() {
                let p = PackedWeight::pack_f32(&w, n, k, isa);
                check(&format!("{} {m}x{n}x{k}", p.path().name()), &p.matmul(&x, m), &want, k);
            }
            for path in Bf16Path::supported() {
                let p = PackedWeight::pack_bf16(&wb, n, k, path);
                let label = format!("{} {m}x{n}x{k}", p.path().name());
                check(&label, &p.matmul(&xb, m), &want_bf16, k);
            }
        });
    }
}

/// Row chunks cover every block once, in order, none over `per_chunk`, in a multiple of the
/// thread count, their sizes at most one block apart.
#[test]
fn row_chunks_are_balanced_over_the_threads() {
    for (blocks, per_chunk, threads) in
        [(86, 16, 2), (342, 16, 2), (48, 16, 2), (7, 16, 4), (5, 2, 3)]
    {
        let chunks = balanced_chunks(blocks, per_chunk, threads);
        let label = format!("{blocks} blocks by {per_chunk} on {threads}");
        assert!(chunks.len().is_multiple_of(threads) || chunks.len() == blocks, "{label}");
        assert_eq!(chunks.first().unwrap().start, 0, "{label}");
        assert_eq!(chunks.last().unwrap().end, blocks, "{label}");
        assert!(chunks.windows(2).all(|w| w[0].end == w[1].start), "{label}");
        let sizes: Vec<usize> = chunks.iter().map(|c| c.len()).collect();
        let (lo, hi) = (*sizes.iter().min().unwrap(), *sizes.iter().max().unwrap());
        assert!(hi <= per_chunk && hi - lo <= 1, "{label}: {sizes:?}");
    }
    // 8 x 128 rows in blocks of 12: six chunks of 14-15 blocks, three per thread.
    assert_eq!(balanced_chunks(86, 16, 2).len(), 6);
}

#[test]
fn no_rows_give_no_output_and_wrong_sizes_are_refused() {
    let packed = PackedWeight::pack_f32(&values(6, 1), 2, 3, Isa::current());
    assert!(packed.matmul::<f32>(&[], 0).is_empty());
    let no_outputs = PackedWeight::pack_f32(&[], 0, 3, Isa::current());
    assert!(no_outputs.matmul(&[1f32; 6], 2).is_empty());
    let short = std::panic::catch_unwind(|| packed.matmul(&[1f32; 5], 2));
    assert!(short.is_err(), "x of the wrong size must not be read past its end");
}

#[test]
fn the_path_follows_the_processor() {
    let f32_path = PackPath::current(false);
    assert_eq!(f32_path, PackPath::F32(Isa::current()));
    let bf16_path = PackPath::current(true);
    assert_eq!(bf16_path, PackPath::Bf16(Bf16Path::for_isa(Isa::current())));
    // A path the processor lacks runs as one it has.
    for path in [PackPath::F32(Isa::Avx512), PackPath::Bf16(Bf16Path::Avx512Bf16)] {
        match path.kernel(1) {
            Kernel::Fma(isa) => assert!(isa <= Isa::best()),
            Kernel::Dp => assert!(has_avx512_bf16() && Isa::best() == Isa::Avx512),
            Kernel::Amx => panic!("AMX for one row"),
        }
    }
    // AMX takes blocks of 16 rows or more, where the processor has it.
    let amx = PackPath::Bf16(Bf16Path::Amx);
    let big = if has_amx() { Kernel::Amx } else { amx.kernel(1) };
    assert_eq!(amx.kernel(AMX_MIN_ROWS), big);
    assert_ne!(amx.kernel(AMX_MIN_ROWS - 1), Kernel::Amx);
    eprintln!("packed paths here: {} and {}", f32_path.name(), bf16_path.name());
}

/// Throughput of each path at prefill sizes (GFLOP/s) and at one row (GB/s of weights), with
/// candle's GEMM alongside:
/// `cargo nextest run -p dsvl-models --run-ignored only packed_throughput --no-capture`.
#[test]
#[ignore = "a measurement, not a check"]
fn packed_throughput() {
    use candle_core::{DType, Device, Tensor};
    // Best of 7 after a warm-up: the shared machines these run on are noisy.
    let time = |f: &dyn Fn()| {
        f();
        (0..7)
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min)
    };
    // DSVL_GEMM_M=<rows> runs only the shapes of that many rows, DSVL_GEMM_QUICK=1 only the
    // f32 path of the best ISA (for A/B runs of the tile loops).
    let quick = std::env::var("DSVL_GEMM_QUICK").is_ok();
    for (m, n, k) in [
        (128, 5632, 2048),
        (128, 2048, 5632),
        (1024, 5632, 2048),
        (1024, 2048, 5632),
        (1024, 2048, 2048),
        (576, 4096, 1024),
        (4096, 2304, 768),
    ] {
        if std::env::var("DSVL_GEMM_M").is_ok_and(|v| v != m.to_string()) {
            continue;
        }
        let x = values(m * k, 1);
        let w = values(n * k, 2);
        let flops = 2.0 * (m * n * k) as f64 / 1e9;
        for isa in paths() {
            if quick && isa != Isa::best() {
                continue;
            }
            let p = PackedWeight::pack_f32(&w, n, k, isa);
            let s = time(&|| drop(std::hint::black_box(p.matmul(&x, m))));
            eprintln!("{m}x{n}x{k} {}: {:.1} GFLOP/s", p.path().name(), flops / s);
        }
        if quick {
            continue;
        }
        let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        for path in Bf16Path::supported() {
            let p = PackedWeight::pack_bf16(&wb, n, k, path);
            let s = time(&|| drop(std::hint::black_box(p.matmul(&xb, m))));
            eprintln!("{m}x{n}x{k} {}: {:.1} GFLOP/s", p.path().name(), flops / s);
        }
        for dt in [DType::F32, DType::BF16] {
            let xt =
                Tensor::from_vec(x.clone(), (m, k), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let wt =
                Tensor::from_vec(w.clone(), (n, k), &Device::Cpu).unwrap().to_dtype(dt).unwrap();
            let s = time(&|| drop(xt.matmul(&wt.t().unwrap()).unwrap()));
            eprintln!("{m}x{n}x{k} candle {dt:?}: {:.1} GFLOP/s", flops / s);
        }
    }
    // A decode step's few rows against a 512 MiB f32 weight, in GB/s of weights: 1 and 4
    // rows, or the DSVL_GEMM_M rows alone when 12 or fewer (with DSVL_GEMM_QUICK=1, the f32
    // path of the best ISA alone).
    let few = match std::env::var("DSVL_GEMM_M").ok().and_then(|v| v.parse::<usize>().ok()) {
        Some(m) if m <= 12 => vec![m],
        Some(_) => return,
        None if quick => return,
        None => vec![1, 4],
    };
    let (n, k) = (65_536, 2048);
    let w = values(n * k, 2);
    let wb: Vec<bf16> = w.iter().map(|&v| bf16::from_f32(v)).collect();
    let gbs = |bytes: usize, s: f64| bytes as f64 / s / 1e9;
    if !quick {
        let t = std::time::Instant::now();
        let path = Bf16Path::for_isa(Isa::best());
        drop(std::hint::black_box(PackedWeight::pack_bf16(&wb, n, k, path)));
        let s = t.elapsed().as_secs_f64();
        eprintln!("packing at load: {:.1} GB/s of bf16", gbs(n * k * 2, s));
    }
    for m in few {
        let x = values(m * k, 1);
        let xb: Vec<bf16> = x.iter().map(|&v| bf16::from_f32(v)).collect();
        let rows = if m == 1 { "row" } else { "rows" };
        for isa in paths() {
            if quick && isa != Isa::best() {
                continue;
            }
            let p = PackedWeight::pack_f32(&w, n, k, isa);
            let s = time(&|| drop(std::hint::black_box(p.matmul(&x, m))));
            eprintln!("{m} {rows} {}: {:.1} GB/s", p.path().name(), gbs(n * k * 4, s));
        }
        if quick {
            continue;
        }
        for path in Bf16Path::supported() {
            let p = PackedWeight::pack_bf16(&wb, n, k, path);
            let s = time(&|| drop(std::hint::black_box(p.matmul(&xb, m))));
            eprintln!("{m} {rows} {}: {:.1} GB/s", p.path().name(), gbs(n * k * 2, s));
        }
    }
}
