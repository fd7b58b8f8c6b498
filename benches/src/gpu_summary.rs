//! `dsvl-bench gpu-check-summary`: the last step of `scripts/gpu-check`. Reads what the steps
//! left in the output folder (`steps.tsv`: name, exit status, seconds; `NAME.jsonl`: the JSON
//! lines each step printed), writes `summary.json` and prints the figures. Kept in the binary
//! rather than the script so that the GPU host needs neither jq nor python to summarise.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use clap::Args;
use serde_json::{json, Value};

/// Arguments of `dsvl-bench gpu-check-summary` (the script passes them).
#[derive(Args)]
pub struct SummaryArgs {
    /// The script's output folder.
    #[arg(long)]
    out: PathBuf,
    /// The device the steps ran on.
    #[arg(long)]
    device: String,
    /// 1 when the script ran with --small.
    #[arg(long, default_value_t = 0)]
    small: u8,
    /// Seconds the steps took in all.
    #[arg(long)]
    elapsed: u64,
    /// What the host is (GPU name, driver, memory).
    #[arg(long, default_value = "")]
    host: String,
    /// Where the binaries came from.
    #[arg(long, default_value = "")]
    bin: String,
}

fn json_lines(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter(Value::is_object)
        .collect()
}

fn steps(out: &Path) -> Result<Vec<Value>> {
    let tsv = std::fs::read_to_string(out.join("steps.tsv")).context("steps.tsv")?;
    Ok(tsv
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            let (name, rc, secs) = (*f.first()?, *f.get(1)?, f.get(2)?.parse::<u64>().ok()?);
            let status = match rc {
                "0" => "ok",
                "skipped" => "skipped (budget spent)",
                "omitted" => "not asked for (--steps)",
                "124" | "137" => "timed out",
                _ => "failed",
            };
            Some(json!({"name": name, "rc": rc, "seconds": secs, "status": status}))
        })
        .collect())
}

fn parity(out: &Path, name: &str) -> Value {
    let lines = json_lines(&out.join(format!("{name}.jsonl")));
    let summary = lines.iter().find(|l| l.get("summary").is_some()).cloned();
    let checks: Vec<Value> = lines.into_iter().filter(|l| l.get("check").is_some()).collect();
    let passed = summary.as_ref().is_some_and(|s| s["passed"] == true) && !checks.is_empty();
    json!({"passed": passed, "checks": checks, "failed": summary.map(|s| s["failed"].clone())})
}

fn pct(v: &Value) -> String {
    v.as_f64().map_or_else(|| "-".into(), |x| format!("{:.1} %", 100.0 * x))
}

fn num(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

/// Writes `summary.json`, prints it readably, and fails when the check did not pass.
pub fn run(args: SummaryArgs) -> Result<()> {
    let steps = steps(&args.out)?;
    let vision = json_lines(&args.out.join("vision.jsonl"));
    let decoder = json_lines(&args.out.join("decoder.jsonl"));
    let (f32p, bf16p) = (parity(&args.out, "parity-f32"), parity(&args.out, "parity-bf16"));
    let asked = |name: &str| steps.iter().any(|s| s["name"] == name && s["rc"] != "omitted");
    let mut problems: Vec<String> = steps
        .iter()
        .filter(|s| s["status"] != "ok" && s["rc"] != "omitted")
        .map(|s| {
            let (name, status) =
                (s["name"].as_str().unwrap_or("?"), s["status"].as_str().unwrap_or("?"));
            if status.starts_with("skipped") {
                format!("step {name}: {status}")
            } else {
                format!("step {name}: {status} (see {name}.log)")
            }
        })
        .collect();
    for (what, step, p) in
        [("parity f32", "parity-f32", &f32p), ("parity bf16", "parity-bf16", &bf16p)]
    {
        if asked(step) && p["passed"] != true {
            problems.push(format!("{what} did not pass"));
        }
    }
    let positive =
        |rows: &[Value], key: &str| !rows.is_empty() && rows.iter().all(|r| num(&r[key]) > 0.0);
    if asked("vision") && !positive(&vision, "images_per_s") {
        problems.push("no vision figures".into());
    }
    if asked("decoder")
        && (!positive(&decoder, "decode_tokens_per_s")
            || !positive(&decoder, "prefill_tokens_per_s"))
    {
        problems.push("no decoder figures".into());
    }
    let passed = problems.is_empty();
    let summary = json!({
        "tool": "scripts/gpu-check", "device": args.device, "small": args.small == 1,
        "host": args.host, "bin": args.bin, "elapsed_s": args.elapsed, "passed": passed,
        "problems": problems, "steps": steps,
        "parity": {"f32": f32p, "bf16": bf16p}, "vision": vision, "decoder": decoder,
    });
    let path = args.out.join("summary.json");
    std::fs::write(&path, serde_json::to_string_pretty(&summary)? + "\n")?;
    print(&summary);
    println!("summary: {}", path.display());
    if !passed {
        // The problems are printed above; a plain exit status keeps the output readable.
        std::process::exit(1);
    }
    Ok(())
}

/// ` vs PyTorch X (R x)` when the reference ran, else nothing.
fn versus(theirs: &Value, ratio: &Value) -> String {
    match (theirs.as_f64(), ratio.as_f64()) {
        (Some(t), Some(r)) => format!(" vs PyTorch {t:.2} ({r:.2}x)"),
        _ => String::new(),
    }
}

fn print(s: &Value) {
    let verdict = if s["passed"] == true { "PASSED" } else { "FAILED" };
    println!(
        "\ngpu-check on {} ({}){}: {verdict} in {} s",
        s["device"].as_str().unwrap_or("?"),
        s["host"].as_str().unwrap_or(""),
        if s["small"] == true { ", small dimensions" } else { "" },
        s["elapsed_s"]
    );
    for st in s["steps"].as_array().into_iter().flatten() {
        println!(
            "  {:<12} {} ({} s)",
            st["name"].as_str().unwrap_or("?"),
            st["status"].as_str().unwrap_or("?"),
            st["seconds"]
        );
    }
    for dtype in ["f32", "bf16"] {
        let p = &s["parity"][dtype];
        let checks = p["checks"].as_array().cloned().unwrap_or_default();
        let verdict = match (p["passed"] == true, checks.is_empty()) {
            (true, _) => "passed",
            (false, true) => "not run",
            (false, false) => "FAILED",
        };
        println!("parity {dtype}: {verdict} ({} checks)", checks.len());
        for c in &checks {
            let name = format!(
                "{} {}",
                c["source"].as_str().unwrap_or(""),
                c["check"].as_str().unwrap_or("")
            );
            let mark = if c["pass"] == true { "ok  " } else { "FAIL" };
            if c.get("max_abs_diff").is_some() {
                println!(
                    "  {mark} {name:<46} max |diff| {:.2e} (atol {}), cosine {:.6}",
                    num(&c["max_abs_diff"]),
                    c["atol"],
                    num(&c["cosine"])
                );
            } else if c.get("agree_prefix").is_some() {
                println!(
                    "  {mark} {name:<46} {}/{} ids agree{}",
                    c["agree_prefix"],
                    c["of"],
                    if c["required"] == true { "" } else { " (reported, not required)" }
                );
            } else {
                println!("  {mark} {name:<46} {}", c["detail"]);
            }
        }
    }
    for v in s["vision"].as_array().into_iter().flatten() {
        println!(
            "vision {} {} batch {:>3}: {:>9.3} images/s, {:>8.2} TFLOP/s, MFU {}{}",
            v["dims"].as_str().unwrap_or(""),
            v["dtype"].as_str().unwrap_or(""),
            v["batch"],
            num(&v["images_per_s"]),
            num(&v["achieved_tflops"]),
            pct(&v["mfu"]),
            versus(&v["reference_images_per_s"], &v["ratio"])
        );
    }
    for d in s["decoder"].as_array().into_iter().flatten() {
        println!(
            "decoder {} {} batch {:>3}: decode {:>9.2} tokens/s{} ({:.2} ms/step, {:.1} GB/s, HBM roofline {}), prefill {:>9.1} tokens/s{} (MFU {})",
            d["dims"].as_str().unwrap_or(""), d["dtype"].as_str().unwrap_or(""), d["batch"],
            num(&d["decode_tokens_per_s"]),
            versus(&d["reference_decode_tokens_per_s"], &d["decode_ratio"]),
            num(&d["decode_step_ms"]), num(&d["achieved_gb_per_s"]),
            pct(&d["hbm_roofline_share"]), num(&d["prefill_tokens_per_s"]),
            versus(&d["reference_prefill_tokens_per_s"], &d["prefill_ratio"]),
            pct(&d["prefill_mfu"])
        );
    }
    for p in s["problems"].as_array().into_iter().flatten() {
        println!("problem: {}", p.as_str().unwrap_or(""));
    }
}
