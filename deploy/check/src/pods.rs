//! One view over every pod template that will run: Deployments, StatefulSets, and the leader
//! and worker templates of each LeaderWorkerSet.
//!
//! The LWS controller adds labels and environment variables to its pods; a [`PodView`] adds
//! them too ([`PodView::labels`], [`PodView::env`]), so Service selectors, NetworkPolicies and
//! `$(LWS_…)` references in container arguments are checked against what the pods will
//! really carry. Worker templates of groups of size 1 are left out: they create no pods.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::api::core::v1::{Container, PodSpec, PodTemplateSpec};

use crate::lws::{LABEL_GROUP_INDEX, LABEL_NAME, LABEL_WORKER_INDEX};
use crate::objects::{ManifestSet, ObjectRef, Typed};

/// Which template of its owner a pod comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// A Deployment's template.
    Deployment,
    /// A StatefulSet's template.
    StatefulSet,
    /// A LeaderWorkerSet's leader template (worker index 0).
    Leader,
    /// A LeaderWorkerSet's worker template (worker index 1 and up).
    Worker,
}

/// A pod template and its owner, as reported in violations.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    /// The owning object.
    pub owner: ObjectRef,
    /// Which of its templates.
    pub role: Role,
}

impl PodRef {
    /// A reference from its parts.
    pub fn new(kind: &str, name: &str, role: Role) -> Self {
        Self { owner: ObjectRef::new(kind, name), role }
    }
}

impl fmt::Display for PodRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.role {
            Role::Leader => write!(f, "{} (leader)", self.owner),
            Role::Worker => write!(f, "{} (worker)", self.owner),
            Role::Deployment | Role::StatefulSet => write!(f, "{}", self.owner),
        }
    }
}

/// The group a LeaderWorkerSet pod belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LwsGroup {
    /// The LeaderWorkerSet's name.
    pub name: String,
    /// Pods per group.
    pub size: i32,
    /// Namespace (for the leader address).
    pub namespace: String,
}

/// A pod template that will run.
#[derive(Debug, Clone)]
pub struct PodView<'a> {
    /// Owner and role.
    pub id: PodRef,
    /// The template.
    pub template: &'a PodTemplateSpec,
    /// The LeaderWorkerSet group, for LWS pods.
    pub lws: Option<LwsGroup>,
    /// The namespace its pods run in.
    pub namespace: String,
}

impl<'a> PodView<'a> {
    /// The pod spec (`None` only for a template without one, which validation refuses).
    pub fn spec(&self) -> Option<&'a PodSpec> {
        self.template.spec.as_ref()
    }

    /// The containers (init containers are not checked: the services never run as one).
    pub fn containers(&self) -> &'a [Container] {
        self.spec().map_or(&[], |s| s.containers.as_slice())
    }

    /// The labels a pod of this template carries, LWS labels included (`group` is the
    /// group index to assume for LWS pods).
    pub fn labels(&self, group: usize) -> BTreeMap<String, String> {
        let mut labels =
            self.template.metadata.as_ref().and_then(|m| m.labels.clone()).unwrap_or_default();
        if let Some(g) = &self.lws {
            labels.insert(LABEL_NAME.into(), g.name.clone());
            labels.insert(LABEL_GROUP_INDEX.into(), group.to_string());
            let worker = if self.id.role == Role::Leader { "0" } else { "1" };
            labels.insert(LABEL_WORKER_INDEX.into(), worker.into());
        }
        labels
    }

    /// The environment `$(VAR)` references in `container`'s command and args expand from:
    /// its literal `env` values, a placeholder for values from Secrets or ConfigMaps, and the
    /// variables the LWS controller injects.
    pub fn env(&self, container: &Container) -> BTreeMap<String, String> {
        let mut env = BTreeMap::new();
        if let Some(g) = &self.lws {
            env.insert("LWS_GROUP_SIZE".into(), g.size.to_string());
            env.insert(
                "LWS_WORKER_INDEX".into(),
                if self.id.role == Role::Leader { "0" } else { "1" }.into(),
            );
            env.insert("LWS_LEADER_ADDRESS".into(), format!("{0}-0.{0}.{1}", g.name, g.namespace));
        }
        for var in container.env.iter().flatten() {
            let value = match (&var.value, &var.value_from) {
                (Some(v), _) => v.clone(),
                (None, Some(_)) => PLACEHOLDER.into(),
                (None, None) => String::new(),
            };
            env.insert(var.name.clone(), value);
        }
        env
    }
}

/// What a value read from a Secret or ConfigMap expands to in the checks.
pub const PLACEHOLDER: &str = "from-reference";

/// Every pod template of `set` that will run.
pub fn pod_views(set: &ManifestSet) -> Vec<PodView<'_>> {
    let mut views = Vec::new();
    for o in &set.objects {
        let namespace = o.raw["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
        match &o.typed {
            Typed::Deployment(d) => {
                if let Some(s) = &d.spec {
                    views.push(PodView {
                        id: PodRef { owner: o.id.clone(), role: Role::Deployment },
                        template: &s.template,
                        lws: None,
                        namespace: namespace.clone(),
                    });
                }
            }
            Typed::StatefulSet(d) => {
                if let Some(s) = &d.spec {
                    views.push(PodView {
                        id: PodRef { owner: o.id.clone(), role: Role::StatefulSet },
                        template: &s.template,
                        lws: None,
                        namespace: namespace.clone(),
                    });
                }
            }
            Typed::Lws(l) => {
                let group = LwsGroup {
                    name: l.name().to_string(),
                    size: l.size(),
                    namespace: namespace.clone(),
                };
                let leader = PodRef { owner: o.id.clone(), role: Role::Leader };
                views.push(PodView {
                    id: leader,
                    template: l.leader_template(),
                    lws: Some(group.clone()),
                    namespace: namespace.clone(),
                });
                if l.size() > 1 {
                    let worker = PodRef { owner: o.id.clone(), role: Role::Worker };
                    views.push(PodView {
                        id: worker,
                        template: &l.spec.leader_worker_template.worker_template,
                        lws: Some(group),
                        namespace,
                    });
                }
            }
            _ => {}
        }
    }
    views
}

/// Expands `$(VAR)` references the way the kubelet does: defined variables are substituted,
/// `$$` escapes a `$`, and undefined references stay as written.
pub fn expand(text: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("$$") {
            out.push('$');
            rest = after;
        } else if let Some((name, after)) = tail.strip_prefix("$(").and_then(|t| t.split_once(')'))
        {
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&tail[..name.len() + 3]),
            }
            rest = after;
        } else {
            out.push('$');
            rest = &tail[1..];
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expansion_follows_the_kubelet() {
        let env = BTreeMap::from([("A".to_string(), "1".to_string())]);
        assert_eq!(expand("--x=$(A)", &env), "--x=1");
        assert_eq!(expand("--x=$(B)", &env), "--x=$(B)");
        assert_eq!(expand("--x=$$(A)", &env), "--x=$(A)");
        assert_eq!(expand("a$b", &env), "a$b");
    }
}
