//! Progress of long work (loading a checkpoint, encoding a folder of images) where a person or
//! a log collector can see it.
//!
//! On a terminal, a progress bar ([`indicatif`]) on stderr. Otherwise (a file, a pipe, a
//! container log) an INFO log line when the work starts, one at most every
//! [`LOG_EVERY`] while it runs, and one when it ends, each with the amount done, the rate and
//! the caller's detail (tensors and shard for a checkpoint). `DSVL_PROGRESS=log` asks for the
//! log lines even on a terminal (`dsvl up` sets it for the processes it starts, which share
//! one terminal and would draw over each other's bars).

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use dsvl_core::progress::{LoadProgress, LoadProgressFn};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a log line reports running work when stderr is not a terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(5);

/// The environment variable that, set to `log`, turns bars into log lines.
pub const PROGRESS_ENV: &str = "DSVL_PROGRESS";

/// Whether this process draws progress bars: stderr is a terminal and bars are not turned off.
fn bars_allowed() -> bool {
    std::io::stderr().is_terminal() && std::env::var(PROGRESS_ENV).map_or(true, |v| v != "log")
}

/// What is counted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unit {
    /// Bytes, shown in GB and MB/s.
    Bytes,
    /// Items of the named kind (`images`).
    Items(&'static str),
}

impl Unit {
    fn amount(self, n: u64) -> String {
        match self {
            Self::Bytes if n >= 1_000_000_000 => format!("{:.2} GB", n as f64 / 1e9),
            Self::Bytes => format!("{:.1} MB", n as f64 / 1e6),
            Self::Items(what) => format!("{n} {what}"),
        }
    }

    fn rate(self, per_second: f64) -> String {
        match self {
            Self::Bytes => format!("{:.0} MB/s", per_second / 1e6),
            Self::Items(what) => format!("{per_second:.1} {what}/s"),
        }
    }
}

struct LogState {
    /// When the last line was written (`None`: no line yet, not even the start line).
    last: Option<Instant>,
    done: u64,
    total: u64,
}

/// One piece of long work being reported; see the module docs.
pub struct Progress {
    what: String,
    unit: Unit,
    started: Instant,
    every: Duration,
    bar: Option<ProgressBar>,
    log: Mutex<LogState>,
}

impl Progress {
    /// Starts reporting `what` (`loading language model`): a bar when stderr is a terminal,
    /// log lines otherwise.
    pub fn new(what: impl Into<String>, unit: Unit) -> Self {
        let bar = bars_allowed().then(|| {
            let template = match unit {
                Unit::Bytes => {
                    "{msg} [{bar:24}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {prefix}"
                }
                Unit::Items(_) => "{msg} [{bar:24}] {pos}/{len} {per_sec} eta {eta} {prefix}",
            };
            // At most 8 redraws a second, however often the loader reports.
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(8));
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar
        });
        Self::with(what.into(), unit, bar, LOG_EVERY)
    }

    /// Log lines only, every `every` (tests; callers that own the terminal).
    pub fn logging_every(what: impl Into<String>, unit: Unit, every: Duration) -> Self {
        Self::with(what.into(), unit, None, every)
    }

    fn with(what: String, unit: Unit, bar: Option<ProgressBar>, every: Duration) -> Self {
        if let Some(b) = &bar {
            b.set_message(what.clone());
        }
        Self {
            what,
            unit,
            started: Instant::now(),
            every,
            bar,
            log: Mutex::new(LogState { last: None, done: 0, total: 0 }),
        }
    }

    /// `done` of `total` units are done; `detail` says where (`tensors 120/273, shard ...`).
    pub fn update(&self, done: u64, total: u64, detail: &str) {
        if let Some(bar) = &self.bar {
            if bar.length() != Some(total) {
                bar.set_length(total);
            }
            bar.set_position(done);
            bar.set_prefix(detail.to_string());
            return;
        }
        let mut log = self.log.lock().expect("progress lock");
        log.done = done;
        log.total = total;
        let Some(last) = log.last else {
            log.last = Some(Instant::now());
            tracing::info!(total, "{}: starting, {}", self.what, self.unit.amount(total));
            return;
        };
        if last.elapsed() < self.every || done >= total {
            return;
        }
        log.last = Some(Instant::now());
        let seconds = self.started.elapsed().as_secs_f64();
        tracing::info!(
            done,
            total,
            "{}: {:.0}% ({} of {}, {}){}",
            self.what,
            100.0 * done as f64 / total.max(1) as f64,
            self.unit.amount(done),
            self.unit.amount(total),
            self.unit.rate(done as f64 / seconds.max(1e-9)),
            if detail.is_empty() { String::new() } else { format!(", {detail}") }
        );
    }

    /// The work is done: the bar closes, and one last line gives the total time and rate.
    pub fn finish(&self) {
        let seconds = self.started.elapsed().as_secs_f64();
        let done = match &self.bar {
            Some(bar) => {
                bar.finish_and_clear();
                bar.position()
            }
            None => self.log.lock().expect("progress lock").done,
        };
        tracing::info!(
            done,
            seconds,
            "{}: done, {} in {seconds:.1} s ({})",
            self.what,
            self.unit.amount(done),
            self.unit.rate(done as f64 / seconds.max(1e-9))
        );
    }
}

/// A checkpoint loader's progress callback reporting to `progress` (in bytes), with tensors
/// and shard as the detail.
pub fn checkpoint_progress(progress: std::sync::Arc<Progress>) -> LoadProgressFn {
    std::sync::Arc::new(move |p: &LoadProgress<'_>| {
        progress.update(
            p.bytes_done,
            p.bytes_total,
            &format!(
                "tensors {}/{}, shard {}/{} {}",
                p.tensors_done, p.tensors_total, p.shard_index, p.shards, p.shard
            ),
        );
    })
}

/// Runs `load` with a progress callback reporting `what` ([`Progress::new`]), and reports the
/// end when it succeeds.
///
/// # Errors
/// Whatever `load` returns.
pub fn loading<T, E>(
    what: &str,
    load: impl FnOnce(LoadProgressFn) -> Result<T, E>,
) -> Result<T, E> {
    report(Progress::new(what, Unit::Bytes), load)
}

/// [`loading`] with log lines even on a terminal: for processes that share a terminal with
/// another one drawing a bar (a decoder's worker ranks).
///
/// # Errors
/// Whatever `load` returns.
pub fn loading_logged<T, E>(
    what: &str,
    load: impl FnOnce(LoadProgressFn) -> Result<T, E>,
) -> Result<T, E> {
    report(Progress::logging_every(what, Unit::Bytes, LOG_EVERY), load)
}

fn report<T, E>(
    progress: Progress,
    load: impl FnOnce(LoadProgressFn) -> Result<T, E>,
) -> Result<T, E> {
    let progress = std::sync::Arc::new(progress);
    let loaded = load(checkpoint_progress(progress.clone()))?;
    progress.finish();
    Ok(loaded)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use dsvl_testkit::CapturedLog;

    use super::*;

    #[test]
    fn off_a_terminal_progress_is_a_start_line_a_line_per_interval_and_an_end_line() {
        let out = CapturedLog::default();
        let sink = out.clone();
        let subscriber =
            tracing_subscriber::fmt().with_ansi(false).with_writer(move || sink.clone()).finish();
        tracing::subscriber::with_default(subscriber, || {
            let p = Arc::new(Progress::logging_every(
                "loading language model",
                Unit::Bytes,
                Duration::from_millis(100),
            ));
            let report = checkpoint_progress(p.clone());
            for i in 1..=8u64 {
                // Eight tensors of 0.5 GB over two shards, 40 ms apart: about three
                // intervals of 100 ms, so two or three progress lines, never eight.
                std::thread::sleep(Duration::from_millis(40));
                report(&LoadProgress {
                    tensors_done: i as usize,
                    tensors_total: 8,
                    bytes_done: i * 500_000_000,
                    bytes_total: 4_000_000_000,
                    shard: if i <= 4 {
                        "model-00001-of-00002.safetensors"
                    } else {
                        "model-00002-of-00002.safetensors"
                    },
                    shard_index: if i <= 4 { 1 } else { 2 },
                    shards: 2,
                });
            }
            p.finish();
        });
        let text = out.text();
        let lines: Vec<&str> = text.lines().collect();
        assert!(lines[0].contains("loading language model: starting, 4.00 GB"), "{text}");
        let running: Vec<&&str> = lines.iter().filter(|l| l.contains("% (")).collect();
        assert!((1..=4).contains(&running.len()), "one line per interval, not per tensor: {text}");
        for l in &running {
            assert!(l.contains("MB/s") && l.contains("tensors ") && l.contains("shard "), "{l}");
            assert!(l.contains("-of-00002.safetensors"), "{l}");
        }
        let last = lines.last().unwrap();
        assert!(last.contains("done, 4.00 GB in") && last.contains("MB/s"), "{text}");
    }

    #[test]
    fn items_are_counted_by_name() {
        assert_eq!(Unit::Items("images").amount(7), "7 images");
        assert_eq!(Unit::Items("images").rate(2.5), "2.5 images/s");
        assert_eq!(Unit::Bytes.amount(1_500_000_000), "1.50 GB");
        assert_eq!(Unit::Bytes.amount(3_264_000), "3.3 MB");
    }
}
