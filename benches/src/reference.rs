//! The PyTorch reference scripts under `benches/reference/`, run as a persistent child process
//! that answers one JSON command per line. Measurements alternate between dsvl and the
//! reference round by round, so slow drifts of a shared machine hit both sides alike.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use anyhow::{bail, Context, Result};
use serde_json::Value;

/// `benches/reference/.venv/bin/python` if it exists, else `python3` (override: DSVL_BENCH_PYTHON).
pub fn python() -> PathBuf {
    if let Ok(p) = std::env::var("DSVL_BENCH_PYTHON") {
        return PathBuf::from(p);
    }
    let venv = repo_root().join("benches/reference/.venv/bin/python");
    if venv.exists() {
        venv
    } else {
        PathBuf::from("python3")
    }
}

/// The repository root: the current folder when it holds `benches/reference` (a binary copied
/// to a GPU host runs in a working tree elsewhere than where it was built), else the tree this
/// binary was built from (benches/ is one level down).
pub fn repo_root() -> PathBuf {
    if let Ok(cwd) = std::env::current_dir() {
        if cwd.join("benches/reference").is_dir() {
            return cwd;
        }
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// A reference script in `--serve` mode.
pub struct Reference {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// What the script said when it became ready (versions, threads).
    pub hello: Value,
}

impl Reference {
    /// Starts `benches/reference/<script> --serve <args>` and waits for its ready line.
    pub fn start(script: &str, args: &[String]) -> Result<Self> {
        let path = repo_root().join("benches/reference").join(script);
        eprintln!(
            "starting reference: {} {} --serve {}",
            python().display(),
            path.display(),
            args.join(" ")
        );
        let mut child = Command::new(python())
            .arg(&path)
            .arg("--serve")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .with_context(|| format!("cannot start {}", python().display()))?;
        let stdin = child.stdin.take().context("stdin")?;
        let stdout = BufReader::new(child.stdout.take().context("stdout")?);
        let mut me = Self { child, stdin, stdout, hello: Value::Null };
        me.hello = me
            .read()
            .context("reference did not start; install benches/reference/requirements.txt")?;
        Ok(me)
    }

    /// As [`Reference::start`]; with `optional`, a reference that cannot start is reported on
    /// stderr and the benchmark goes on without it (`scripts/gpu-check` on a host whose PyTorch
    /// lacks what the script needs).
    pub fn start_optional(script: &str, args: &[String], optional: bool) -> Result<Option<Self>> {
        match Self::start(script, args) {
            Ok(r) => Ok(Some(r)),
            Err(e) if optional => {
                eprintln!("reference unavailable, going on without it: {e:#}");
                Ok(None)
            }
            Err(e) => Err(e),
        }
    }

    fn read(&mut self) -> Result<Value> {
        let mut line = String::new();
        if self.stdout.read_line(&mut line)? == 0 {
            bail!("reference exited");
        }
        serde_json::from_str(&line).with_context(|| format!("not JSON: {line}"))
    }

    /// Sends one command and returns the reply.
    pub fn call(&mut self, cmd: Value) -> Result<Value> {
        writeln!(self.stdin, "{cmd}")?;
        self.stdin.flush()?;
        self.read()
    }
}

/// Asks the reference (when there is one) for the number under `key` in its reply to `cmd`.
/// With `optional`, a reference that fails is dropped with a message on stderr, and later rounds
/// run without it, instead of failing the benchmark.
pub fn ask(
    reference: &mut Option<Reference>,
    cmd: Value,
    key: &str,
    optional: bool,
) -> Result<Option<f64>> {
    let Some(r) = reference else { return Ok(None) };
    match r.call(cmd).and_then(|reply| {
        reply[key].as_f64().with_context(|| format!("reference replied without {key}: {reply}"))
    }) {
        Ok(v) => Ok(Some(v)),
        Err(e) if optional => {
            eprintln!("reference failed, going on without it: {e:#}");
            *reference = None;
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Median of per-round ratios ours/theirs, when the reference answered every round.
pub fn ratio(row: &Row) -> Option<f64> {
    (!row.theirs.is_empty() && row.theirs.len() == row.ours.len())
        .then(|| median(row.ours.iter().zip(&row.theirs).map(|(a, b)| a / b).collect()))
}

impl Drop for Reference {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", serde_json::json!({"op": "quit"}));
        let _ = self.child.wait();
    }
}

/// Median of a non-empty list.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// One row of a results table: medians of both sides and the median of per-round ratios.
pub struct Row {
    /// What was measured, with unit.
    pub name: String,
    /// dsvl's per-round values.
    pub ours: Vec<f64>,
    /// The reference's per-round values (empty without a reference).
    pub theirs: Vec<f64>,
}

/// Prints rows as a table (higher is better for every row).
pub fn print_table(title: &str, rows: &[Row]) {
    println!("\n{title}");
    println!(
        "{:<34} {:>12} {:>12} {:>8}   rounds",
        "measure (median)", "dsvl", "reference", "ratio"
    );
    for r in rows {
        let ours = median(r.ours.clone());
        match ratio(r) {
            None => {
                println!("{:<34} {ours:>12.4} {:>12} {:>8}   {}", r.name, "-", "-", r.ours.len())
            }
            Some(ratio) => {
                let theirs = median(r.theirs.clone());
                println!(
                    "{:<34} {ours:>12.4} {theirs:>12.4} {ratio:>7.2}x   {}",
                    r.name,
                    r.ours.len()
                );
            }
        }
    }
}
