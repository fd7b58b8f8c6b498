//! `dsvl up`, `dsvl chat` and `dsvl demo` as a user runs them: the local cluster as real
//! processes, the streaming client giving exactly `dsvl generate`'s JSON, and Ctrl-C leaving
//! no process behind.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use dsvl_testkit::{child_pids, free_port, golden_dir, pid_alive};
use serde_json::Value;

fn dsvl() -> Command {
    Command::new(env!("CARGO_BIN_EXE_dsvl"))
}

fn golden_chat(dir: &Path, case: &str) -> Result<PathBuf> {
    let chat: Value = serde_json::from_slice(&std::fs::read(golden_dir().join("chat.json"))?)?;
    let case = chat["cases"]
        .as_array()
        .context("cases")?
        .iter()
        .find(|c| c["name"] == case)
        .context("case")?;
    let mut conv = case["conversation"].clone();
    for m in conv.as_array_mut().context("conversation")? {
        if let Some(images) = m.get_mut("images").and_then(|i| i.as_array_mut()) {
            for img in images {
                *img = Value::String(
                    golden_dir().join(img.as_str().unwrap_or_default()).display().to_string(),
                );
            }
        }
    }
    let path = dir.join("chat.json");
    std::fs::write(&path, serde_json::to_vec(&conv)?)?;
    Ok(path)
}

fn descendants(pid: u32) -> Vec<u32> {
    let mut all = Vec::new();
    let mut frontier = vec![pid];
    while let Some(p) = frontier.pop() {
        for c in child_pids(p) {
            all.push(c);
            frontier.push(c);
        }
    }
    all
}

/// The pid of `up`'s descendant running `binary` (the first).
fn process_running(up: u32, binary: &str) -> Option<u32> {
    descendants(up).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0).next().is_some_and(|a| a.ends_with(binary.as_bytes()))
        })
    })
}

fn json_of(out: &std::process::Output) -> Result<Value> {
    anyhow::ensure!(out.status.success(), "failed: {}", String::from_utf8_lossy(&out.stderr));
    Ok(serde_json::from_str(String::from_utf8(out.stdout.clone())?.trim())?)
}

/// The lines of `stdout`, as they come, on a channel.
fn line_channel(stdout: std::process::ChildStdout) -> std::sync::mpsc::Receiver<String> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    rx
}

/// The rows of `dsvl up`'s table (`  what  where`), read until "Ctrl-C stops everything.".
fn read_up_table(rx: &std::sync::mpsc::Receiver<String>) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut table = Vec::new();
    let mut up = false;
    loop {
        let line = rx
            .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            .context("`dsvl up` never said it is up")?;
        if line.starts_with("Ctrl-C stops everything") {
            anyhow::ensure!(up, "the table comes after `dsvl is up`");
            return Ok(table);
        }
        up |= line.starts_with("dsvl is up");
        if up {
            table.push(line);
        }
    }
}

/// The operator flags: every process serves metrics where the table says, and logs JSON lines
/// (the services' lines on `dsvl up`'s stderr, the load progress among them).
fn check_operator_flags(table: &[String], stderr: &std::sync::Mutex<Vec<String>>) -> Result<()> {
    let row = |what: &str| table.iter().find(|l| l.trim_start().starts_with(what)).cloned();
    for what in [
        "gateway HTTP",
        "gateway gRPC",
        "vision-encoder",
        "decoder group",
        "redis",
        "traces",
        "logs",
    ] {
        anyhow::ensure!(row(what).is_some(), "no `{what}` row in {table:#?}");
    }
    for process in ["gateway", "vision-encoder", "decoder"] {
        let line = row(&format!("metrics {process}")).with_context(|| format!("{table:#?}"))?;
        let url = line.split_whitespace().last().context("url")?;
        let addr = url.trim_start_matches("http://").trim_end_matches("/metrics");
        let text = dsvl_testkit::http_get(addr, "/metrics")?;
        anyhow::ensure!(text.contains("# TYPE dsvl_"), "{process} metrics at {addr}: {text}");
    }
    anyhow::ensure!(row("logs").is_some_and(|l| l.contains("json")));
    let lines = stderr.lock().unwrap().clone();
    let json: Vec<Value> = lines
        .iter()
        .filter(|l| l.starts_with('{'))
        .map(|l| serde_json::from_str(l).with_context(|| format!("not JSON: {l}")))
        .collect::<Result<_>>()?;
    anyhow::ensure!(
        json.iter().any(|l| l["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("loading vision tower: starting"))),
        "the vision-encoder's load progress as a JSON line: {lines:#?}"
    );
    Ok(())
}

#[test]
fn up_then_chat_matches_generate_and_ctrl_c_stops_everything() -> Result<()> {
    let (grpc, http) = (free_port(), free_port());
    let mut up = dsvl()
        .args([
            "up",
            "--tp",
            "2",
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
            "--metrics",
            "--log-format",
            "json",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let rx = line_channel(up.stdout.take().context("stdout")?);
    // Stderr is kept (and echoed, for a failing run's sake).
    let stderr_lines = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let stderr = up.stderr.take().context("stderr")?;
    let sink = stderr_lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            eprintln!("{line}");
            sink.lock().unwrap().push(line);
        }
    });
    let table = read_up_table(&rx)?;
    let processes = descendants(up.id());
    assert!(processes.len() >= 4, "gateway, vision, decoder and its worker rank: {processes:?}");

    let dir = tempfile::tempdir()?;
    for case in ["one_image", "text_only"] {
        let chat = golden_chat(dir.path(), case)?;
        let via_gateway = json_of(
            &dsvl()
                .args([
                    "chat",
                    "--json",
                    "--max-new-tokens",
                    "16",
                    "--gateway",
                    &format!("http://127.0.0.1:{grpc}"),
                    "--chat",
                ])
                .arg(&chat)
                .output()?,
        )?;
        let offline = json_of(
            &dsvl()
                .args(["generate", "--json", "--max-new-tokens", "16", "--chat"])
                .arg(&chat)
                .output()?,
        )?;
        assert_eq!(via_gateway, offline, "{case}: `dsvl chat` prints what `dsvl generate` prints");
    }
    // After traffic, every process has series to show.
    check_operator_flags(&table, &stderr_lines)?;

    // A failed vision-encoder and a failed decoder group are restarted, as Kubernetes would:
    // the cluster answers again with new processes.
    for binary in ["dsvl-vision", "dsvl-decoder"] {
        let old = process_running(up.id(), binary).context(binary)?;
        // SAFETY: kill(2) on a process this test's child started.
        unsafe { libc::kill(old as libc::pid_t, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let chat = golden_chat(dir.path(), "one_image")?;
            let out = dsvl()
                .args(["chat", "--json", "--max-new-tokens", "4", "--gateway"])
                .arg(format!("http://127.0.0.1:{grpc}"))
                .arg("--chat")
                .arg(&chat)
                .output()?;
            let fresh = process_running(up.id(), binary).is_some_and(|p| p != old);
            if out.status.success() && fresh {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "{binary} was not restarted within 60 s");
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    // Everything started, before and after the restarts, must be gone after Ctrl-C.
    let mut processes = processes;
    processes.extend(descendants(up.id()));

    // Ctrl-C: everything stops, nothing is left behind.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = up.try_wait()? {
            break s;
        }
        anyhow::ensure!(Instant::now() < deadline, "`dsvl up` did not stop on Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    let deadline = Instant::now() + Duration::from_secs(10);
    while processes.iter().any(|&p| pid_alive(p)) {
        anyhow::ensure!(
            Instant::now() < deadline,
            "left behind: {:?}",
            processes.iter().filter(|&&p| pid_alive(p)).collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// The README's main command: cluster up, one multimodal request twice (the second from the
/// cache), per-tier timing, clean exit.
#[test]
fn demo_runs_the_cluster_and_exits() -> Result<()> {
    let out = dsvl().args(["demo", "--max-new-tokens", "4"]).output()?;
    let text = String::from_utf8(out.stdout)?;
    assert!(out.status.success(), "{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("(encoded)") && text.contains("from the embedding cache"), "{text}");
    assert!(text.contains("decoder   prefill"), "{text}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("RANDOM weights"));
    Ok(())
}

#[test]
fn a_cuda_device_in_a_cpu_build_is_a_clear_error() -> Result<()> {
    // `--device` reaches the services; this build has no CUDA, so start-up must fail fast and
    // say why (never hang waiting for health, never panic), leaving no process behind.
    let t = Instant::now();
    let out = dsvl()
        .args([
            "up",
            "--device",
            "cuda:0",
            "--grpc-addr",
            &format!("127.0.0.1:{}", free_port()),
            "--http-addr",
            &format!("127.0.0.1:{}", free_port()),
        ])
        .env("DSVL_QUIET_BUNDLED", "1")
        .stdin(Stdio::null())
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    anyhow::ensure!(
        !out.status.success(),
        "dsvl up --device cuda:0 succeeded without CUDA: {stderr}"
    );
    anyhow::ensure!(stderr.contains("without CUDA support"), "the error says why: {stderr}");
    anyhow::ensure!(!stderr.contains("panicked"), "no panic: {stderr}");
    anyhow::ensure!(t.elapsed() < Duration::from_secs(60), "failed fast ({:?})", t.elapsed());
    Ok(())
}

/// `dsvl up` on free ports, with its stdout table read; returns the process and the gateway's
/// gRPC URL.
fn start_up(extra: &[&str]) -> Result<(std::process::Child, String)> {
    let grpc = free_port();
    let mut up = dsvl()
        .args(["up", "--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{}", free_port())])
        .args(extra)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let rx = line_channel(up.stdout.take().context("stdout")?);
    read_up_table(&rx)?;
    Ok((up, format!("http://127.0.0.1:{grpc}")))
}

/// Stops `dsvl up` as Ctrl-C would.
fn stop_up(mut up: std::process::Child) -> Result<()> {
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(up.id() as libc::pid_t, libc::SIGINT) };
    anyhow::ensure!(up.wait()?.success());
    Ok(())
}

/// An interactive `dsvl chat` reading stdin (no terminal): stdout collected as it arrives.
struct Repl {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    /// stdout's bytes so far (a chunk may end inside a UTF-8 character: decoded when read).
    out: std::sync::Arc<std::sync::Mutex<Vec<u8>>>,
    /// The thread reading stdout, done at end of file (after the child's last write).
    reader: std::thread::JoinHandle<()>,
}

impl Repl {
    fn start(gateway: &str, extra: &[&str]) -> Result<Self> {
        let mut child = dsvl()
            .args(["chat", "--gateway", gateway])
            .args(extra)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdin = child.stdin.take().context("stdin")?;
        let mut stdout = child.stdout.take().context("stdout")?;
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = out.clone();
        let reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = std::io::Read::read(&mut stdout, &mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Ok(Self { child, stdin, out, reader })
    }

    /// stdout so far.
    fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned()
    }

    fn say(&mut self, line: &str) -> Result<()> {
        use std::io::Write;
        writeln!(self.stdin, "{line}")?;
        Ok(self.stdin.flush()?)
    }

    /// Waits until stdout holds `needle` `times` times; returns all of stdout.
    fn wait_for(&self, needle: &str, times: usize) -> Result<String> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let out = self.stdout();
            if out.matches(needle).count() >= times {
                return Ok(out);
            }
            anyhow::ensure!(Instant::now() < deadline, "no {times}x `{needle}` in {out}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Closes stdin (end of the session), waits for a clean exit and returns all of stdout
    /// (read to its end: the child's last lines may still be in the pipe when it exits).
    fn finish(mut self) -> Result<String> {
        drop(self.stdin);
        anyhow::ensure!(self.child.wait()?.success(), "the chat exits 0 at end of input");
        self.reader.join().map_err(|_| anyhow::anyhow!("the stdout reader panicked"))?;
        Ok(String::from_utf8_lossy(&self.out.lock().unwrap()).into_owned())
    }
}

/// The interactive chat over stdin: an image attached with `/image` gives exactly the reply
/// that the same conversation as a file gives; the history grows turn by turn (`/stats`
/// shows the prompt growing) until `/reset`; Ctrl-C stops an answer and the session goes on.
#[test]
fn interactive_chat_keeps_history_attaches_images_and_survives_ctrl_c() -> Result<()> {
    let (up, gateway) = start_up(&[])?;
    let dir = tempfile::tempdir()?;
    let chat = golden_chat(dir.path(), "one_image")?;
    let from_file = json_of(
        &dsvl()
            .args(["chat", "--json", "--greedy", "--max-new-tokens", "8", "--gateway", &gateway])
            .arg("--chat")
            .arg(&chat)
            .output()?,
    )?;
    let expected = from_file["text"].as_str().context("text")?.to_string();

    let mut repl = Repl::start(&gateway, &["--greedy", "--max-new-tokens", "8"])?;
    repl.say(&format!("/image {}", golden_dir().join("rocket.jpg").display()))?;
    repl.say("Describe each stage of this image.")?;
    repl.say("/stats")?;
    repl.wait_for("last answer:", 1)?;
    repl.say("And the second stage?")?;
    repl.say("/stats")?;
    repl.wait_for("last answer:", 2)?;
    repl.say("/reset")?;
    repl.say("Hello")?;
    repl.say("/stats")?;
    repl.say("/nonsense")?;
    let out = repl.finish()?;
    assert!(out.contains("attached ") && out.contains("rocket.jpg"), "{out}");
    assert!(out.contains(&expected), "the first answer `{expected}` in {out}");
    assert!(out.contains("conversation cleared"), "{out}");
    let prompts: Vec<u32> = out
        .lines()
        .filter_map(|l| l.split("prompt ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(prompts.len(), 3, "{out}");
    assert!(prompts[0] > 576, "the image's 576 tokens are in the first prompt: {prompts:?}");
    // The second prompt holds the first (image included), its 8-token answer and the question.
    assert!(prompts[1] > prompts[0] + 8, "the second turn sends the first one: {prompts:?}");
    assert!(prompts[2] < 100, "after /reset the conversation starts again: {prompts:?}");
    assert!(out.contains("TTFT") && out.contains("tokens/s"), "{out}");

    // Ctrl-C mid-answer: the answer stops, the session goes on.
    let mut repl = Repl::start(&gateway, &["--max-new-tokens", "1024", "--ignore-eos"])?;
    repl.say("Tell me a very long story.")?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while repl.out.lock().unwrap().len() < 20 {
        anyhow::ensure!(Instant::now() < deadline, "no tokens streamed");
        std::thread::sleep(Duration::from_millis(10));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(repl.child.id() as libc::pid_t, libc::SIGINT) };
    repl.say("/stats")?;
    let out = repl.wait_for("last answer:", 1)?;
    assert!(out.contains("finish interrupted"), "{out}");
    assert!(repl.child.try_wait()?.is_none(), "still running after Ctrl-C");
    repl.say("Short answer now.")?;
    repl.say("/stats")?;
    repl.wait_for("last answer:", 2)?;
    repl.finish()?;
    stop_up(up)
}
