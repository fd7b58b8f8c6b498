//! Rendered manifests as typed objects.
//!
//! A rendered overlay is a YAML stream; [`split_yaml`] turns it into one JSON value per
//! document (the form the planted-mistake tests edit), and [`ManifestSet::parse`] turns those
//! into `k8s-openapi` types. Kinds this project does not deploy are refused: an unexpected
//! object in the output is itself a mistake (a stray file in a kustomization, a typo in
//! `kind`). Deserialisation problems and LeaderWorkerSet schema errors become [`Violation`]s,
//! so one broken object does not hide the checks on the others.

use std::fmt;

use k8s_openapi::api::apps::v1::{Deployment, StatefulSet};
use k8s_openapi::api::autoscaling::v2::HorizontalPodAutoscaler;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Secret, Service};
use k8s_openapi::api::networking::v1::NetworkPolicy;
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use serde::Deserialize;
use serde_json::Value;

use crate::lws::{LeaderWorkerSet, LwsSchema};
use crate::Violation;

/// `Kind/name` of an object, as reported in violations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectRef {
    /// `kind`.
    pub kind: String,
    /// `metadata.name`.
    pub name: String,
}

impl ObjectRef {
    /// A reference from its parts.
    pub fn new(kind: &str, name: &str) -> Self {
        Self { kind: kind.to_string(), name: name.to_string() }
    }

    /// The reference of a raw object (empty strings where fields are missing).
    pub fn of(raw: &Value) -> Self {
        Self::new(
            raw["kind"].as_str().unwrap_or(""),
            raw["metadata"]["name"].as_str().unwrap_or(""),
        )
    }
}

impl fmt::Display for ObjectRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.kind, self.name)
    }
}

/// One object in its `k8s-openapi` (or, for LeaderWorkerSet, [`crate::lws`]) type.
#[derive(Debug, Clone)]
#[allow(clippy::large_enum_variant)] // a few dozen objects per overlay
pub enum Typed {
    /// `v1/Namespace`.
    Namespace(Namespace),
    /// `v1/ConfigMap`.
    ConfigMap(ConfigMap),
    /// `v1/Secret`.
    Secret(Secret),
    /// `v1/Service`.
    Service(Service),
    /// `apps/v1/Deployment`.
    Deployment(Deployment),
    /// `apps/v1/StatefulSet`.
    StatefulSet(StatefulSet),
    /// `autoscaling/v2/HorizontalPodAutoscaler`.
    Hpa(HorizontalPodAutoscaler),
    /// `policy/v1/PodDisruptionBudget`.
    Pdb(PodDisruptionBudget),
    /// `networking.k8s.io/v1/NetworkPolicy`.
    NetworkPolicy(NetworkPolicy),
    /// `leaderworkerset.x-k8s.io/v1/LeaderWorkerSet`.
    Lws(LeaderWorkerSet),
    /// `cert-manager.io/v1/Certificate`.
    Certificate(crate::certs::Certificate),
    /// `cert-manager.io/v1/Issuer`.
    Issuer(crate::certs::Issuer),
}

/// A parsed object: where it came from, its raw form and its typed form.
#[derive(Debug, Clone)]
pub struct Object {
    /// `Kind/name`.
    pub id: ObjectRef,
    /// `apiVersion`.
    pub api_version: String,
    /// The raw document.
    pub raw: Value,
    /// The typed document.
    pub typed: Typed,
}

/// Every object of one rendered overlay that parsed.
#[derive(Debug, Clone, Default)]
pub struct ManifestSet {
    /// Objects in document order.
    pub objects: Vec<Object>,
}

/// The YAML stream could not be read at all.
#[derive(Debug, thiserror::Error)]
#[error("document {index} of the rendered YAML: {source}")]
pub struct YamlError {
    /// 0-based document index.
    pub index: usize,
    /// The parser's error.
    #[source]
    pub source: serde_norway::Error,
}

/// Splits a multi-document YAML stream into JSON values, skipping empty documents.
///
/// # Errors
/// [`YamlError`] when a document is not valid YAML.
pub fn split_yaml(text: &str) -> Result<Vec<Value>, YamlError> {
    let mut docs = Vec::new();
    for (index, doc) in serde_norway::Deserializer::from_str(text).enumerate() {
        let value = Value::deserialize(doc).map_err(|source| YamlError { index, source })?;
        if !value.is_null() {
            docs.push(value);
        }
    }
    Ok(docs)
}

fn typed<T: serde::de::DeserializeOwned>(
    raw: &Value,
    wrap: fn(T) -> Typed,
) -> Result<Typed, String> {
    serde_json::from_value::<T>(raw.clone()).map(wrap).map_err(|e| e.to_string())
}

impl ManifestSet {
    /// Parses rendered documents. Objects that fail to deserialise or have an unknown kind are
    /// left out of the set; those and LeaderWorkerSet schema errors are reported as violations.
    pub fn parse(docs: &[Value], schema: &LwsSchema) -> (Self, Vec<Violation>) {
        let mut set = Self::default();
        let mut violations = Vec::new();
        for raw in docs {
            let id = ObjectRef::of(raw);
            let api_version = raw["apiVersion"].as_str().unwrap_or("").to_string();
            let parsed = match (api_version.as_str(), id.kind.as_str()) {
                ("v1", "Namespace") => typed(raw, Typed::Namespace),
                ("v1", "ConfigMap") => typed(raw, Typed::ConfigMap),
                ("v1", "Secret") => typed(raw, Typed::Secret),
                ("v1", "Service") => typed(raw, Typed::Service),
                ("apps/v1", "Deployment") => typed(raw, Typed::Deployment),
                ("apps/v1", "StatefulSet") => typed(raw, Typed::StatefulSet),
                ("autoscaling/v2", "HorizontalPodAutoscaler") => typed(raw, Typed::Hpa),
                ("policy/v1", "PodDisruptionBudget") => typed(raw, Typed::Pdb),
                ("networking.k8s.io/v1", "NetworkPolicy") => typed(raw, Typed::NetworkPolicy),
                (crate::lws::API_VERSION, "LeaderWorkerSet") => {
                    // A schema error is reported, and the object still joins the set when
                    // it deserialises, so the other checks do not cascade from it.
                    let errors = schema.errors(raw);
                    if !errors.is_empty() {
                        violations.push(Violation::LwsSchema { object: id.clone(), errors });
                    }
                    typed(raw, Typed::Lws)
                }
                (crate::certs::API_VERSION, "Certificate") => typed(raw, Typed::Certificate),
                (crate::certs::API_VERSION, "Issuer") => typed(raw, Typed::Issuer),
                _ => {
                    violations.push(Violation::UnknownKind { api_version, object: id });
                    continue;
                }
            };
            match parsed {
                Ok(typed) => set.objects.push(Object { id, api_version, raw: raw.clone(), typed }),
                Err(error) => violations.push(Violation::InvalidObject { object: id, error }),
            }
        }
        (set, violations)
    }

    /// The objects of one typed variant, with their references.
    pub fn iter<'a, T: 'a>(
        &'a self,
        pick: fn(&'a Typed) -> Option<&'a T>,
    ) -> impl Iterator<Item = (&'a ObjectRef, &'a T)> + 'a {
        self.objects.iter().filter_map(move |o| pick(&o.typed).map(|t| (&o.id, t)))
    }

    /// Whether an object of `kind` named `name` whose apiVersion's group is `group` exists.
    pub fn contains(&self, group: &str, kind: &str, name: &str) -> bool {
        self.objects
            .iter()
            .any(|o| o.id.kind == kind && o.id.name == name && api_group(&o.api_version) == group)
    }
}

/// The group of an apiVersion (`apps/v1` → `apps`, `v1` → ``).
pub fn api_group(api_version: &str) -> &str {
    api_version.rsplit_once('/').map_or("", |(g, _)| g)
}
