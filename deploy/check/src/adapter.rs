//! The custom metrics prometheus-adapter serves, read from the rules ConfigMap in
//! `deploy/k8s/addons/prometheus-adapter/rules.yaml`: every metric an HPA asks for must be
//! one of them, or the HPA silently never scales on it.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::ConfigMap;
use serde::Deserialize;

/// The rules file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Unreadable file.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a ConfigMap, or its `config.yaml` is not adapter configuration.
    #[error("{path}: {message}")]
    Format {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
}

#[derive(Deserialize)]
struct Config {
    rules: Vec<Rule>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Rule {
    series_query: String,
    metrics_query: String,
    name: Naming,
}

#[derive(Deserialize)]
struct Naming {
    #[serde(rename = "as")]
    as_: Option<String>,
    matches: Option<String>,
}

/// The rules file kept in `deploy/`.
pub fn default_rules_path() -> PathBuf {
    crate::deploy_dir().join("k8s/addons/prometheus-adapter/rules.yaml")
}

/// Names of the custom metrics the adapter rules in `path` serve.
///
/// # Errors
/// [`AdapterError`] when the file is unreadable, or a rule lacks a query or an `as` name
/// (without `as` the served name depends on a regex; this project always names its metrics).
pub fn served_metrics(path: &Path) -> Result<BTreeSet<String>, AdapterError> {
    let format = |message: String| AdapterError::Format { path: path.into(), message };
    let text = std::fs::read_to_string(path)
        .map_err(|source| AdapterError::Read { path: path.into(), source })?;
    let map: ConfigMap = serde_norway::from_str(&text).map_err(|e| format(e.to_string()))?;
    let config = map
        .data
        .as_ref()
        .and_then(|d| d.get("config.yaml"))
        .ok_or_else(|| format("no data key config.yaml".into()))?;
    let config: Config =
        serde_norway::from_str(config).map_err(|e| format(format!("config.yaml: {e}")))?;
    let mut names = BTreeSet::new();
    for rule in config.rules {
        if rule.series_query.trim().is_empty() || rule.metrics_query.trim().is_empty() {
            return Err(format("a rule has an empty seriesQuery or metricsQuery".into()));
        }
        match (rule.name.as_, rule.name.matches) {
            (Some(name), Some(_)) if !name.is_empty() => {
                names.insert(name);
            }
            _ => {
                return Err(format(format!(
                    "rule for {:?} needs name.matches and name.as",
                    rule.series_query
                )))
            }
        }
    }
    Ok(names)
}
