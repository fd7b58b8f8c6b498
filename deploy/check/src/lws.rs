//! LeaderWorkerSet (`leaderworkerset.x-k8s.io/v1`): the JSON schema check and the typed form.
//!
//! `kubernetes-validate` knows no CRDs, and `k8s-openapi` has no LeaderWorkerSet type. So an
//! LWS object is validated twice: the envelope against the schema this project keeps in
//! `deploy/schemas/leaderworkerset.v1.schema.json` (unknown fields refused), and its pod
//! templates, typed here as `k8s-openapi` [`PodTemplateSpec`]s, by the same invariants and the
//! same strict validation as every Deployment's ([`crate::tools::lws_pod_templates`]).

use std::path::{Path, PathBuf};

use k8s_openapi::api::core::v1::PodTemplateSpec;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use serde::Deserialize;
use serde_json::Value;

/// The API version of every LeaderWorkerSet we deploy.
pub const API_VERSION: &str = "leaderworkerset.x-k8s.io/v1";

/// Pod label: the LeaderWorkerSet a pod belongs to (set by the LWS controller).
pub const LABEL_NAME: &str = "leaderworkerset.sigs.k8s.io/name";
/// Pod label: the group (replica) index of a pod.
pub const LABEL_GROUP_INDEX: &str = "leaderworkerset.sigs.k8s.io/group-index";
/// Pod label: the index of a pod inside its group (0 is the leader).
pub const LABEL_WORKER_INDEX: &str = "leaderworkerset.sigs.k8s.io/worker-index";

/// A LeaderWorkerSet, as far as dsvl uses it.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderWorkerSet {
    /// Name, labels, annotations.
    pub metadata: ObjectMeta,
    /// The desired state.
    pub spec: LwsSpec,
}

/// `spec` of a LeaderWorkerSet.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LwsSpec {
    /// Number of groups (default 1).
    pub replicas: Option<i32>,
    /// `LeaderCreated` or `LeaderReady`.
    pub startup_policy: Option<String>,
    /// Group template.
    pub leader_worker_template: LeaderWorkerTemplate,
}

/// `spec.leaderWorkerTemplate`.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LeaderWorkerTemplate {
    /// Pods per group (default 1).
    pub size: Option<i32>,
    /// What a pod failure does to its group.
    pub restart_policy: Option<String>,
    /// The leader pod (defaults to the worker template).
    pub leader_template: Option<PodTemplateSpec>,
    /// The worker pods.
    pub worker_template: PodTemplateSpec,
}

impl LeaderWorkerSet {
    /// `metadata.name`.
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }

    /// Pods per group.
    pub fn size(&self) -> i32 {
        self.spec.leader_worker_template.size.unwrap_or(1)
    }

    /// The leader's template (the worker template when none is given).
    pub fn leader_template(&self) -> &PodTemplateSpec {
        let t = &self.spec.leader_worker_template;
        t.leader_template.as_ref().unwrap_or(&t.worker_template)
    }
}

/// The schema could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum SchemaError {
    /// The file is missing or unreadable.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The schema file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The file is not JSON.
    #[error("{path} is not JSON: {source}")]
    Json {
        /// The schema file.
        path: PathBuf,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The file is not a valid JSON schema.
    #[error("{path} is not a valid JSON schema: {message}")]
    Invalid {
        /// The schema file.
        path: PathBuf,
        /// The validator's complaint.
        message: String,
    },
}

/// The compiled LeaderWorkerSet schema.
pub struct LwsSchema {
    validator: jsonschema::Validator,
}

impl std::fmt::Debug for LwsSchema {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("LwsSchema")
    }
}

impl LwsSchema {
    /// The schema kept in `deploy/schemas/`.
    ///
    /// # Errors
    /// [`SchemaError`] when the file is missing or not a valid schema.
    pub fn load_default() -> Result<Self, SchemaError> {
        Self::load(&crate::deploy_dir().join("schemas/leaderworkerset.v1.schema.json"))
    }

    /// A schema from a file.
    ///
    /// # Errors
    /// [`SchemaError`] when the file is missing or not a valid schema.
    pub fn load(path: &Path) -> Result<Self, SchemaError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| SchemaError::Read { path: path.into(), source })?;
        let schema: Value = serde_json::from_str(&text)
            .map_err(|source| SchemaError::Json { path: path.into(), source })?;
        let validator = jsonschema::validator_for(&schema)
            .map_err(|e| SchemaError::Invalid { path: path.into(), message: e.to_string() })?;
        Ok(Self { validator })
    }

    /// Every schema violation of `object`, as `instance path: message`; empty when it conforms.
    pub fn errors(&self, object: &Value) -> Vec<String> {
        self.validator.iter_errors(object).map(|e| format!("{}: {e}", e.instance_path())).collect()
    }
}
