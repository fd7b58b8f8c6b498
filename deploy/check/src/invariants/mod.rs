//! The deployment invariants, checked on one rendered overlay.
//!
//! [`check`] parses the documents, builds a [`PodView`] per running template, reads each
//! service container's flags with the service's own parser, and runs three groups of rules:
//! per container ([`containers`]: probes, preStop and grace, images, GPUs, `/dev/shm`,
//! non-root, secrets in env and args), per object (this file: LeaderWorkerSet semantics, HPA
//! targets and metrics, Secrets and ConfigMaps, Service selectors), and across pods
//! ([`paths`]: gateway upstreams, NetworkPolicy paths, rendezvous isolation; [`certs`]: every
//! TLS file issued by a Certificate with the right usages and names).

mod certs;
mod containers;
mod paths;

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::Container;
use serde_json::Value;

use crate::flags::{self, Binary, Settings};
use crate::lws::LwsSchema;
use crate::network::map_matches;
use crate::objects::{api_group, ManifestSet, ObjectRef, Typed};
use crate::pods::{pod_views, PodRef, PodView, Role};
use crate::Violation;

/// How strict image pinning is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// No `:latest`, no untagged images.
    Dev,
    /// Also: every image is a digest or an exact `X.Y.Z` version tag.
    Prod,
}

impl Profile {
    /// The profile of an overlay, by name: `prod*` overlays are Prod.
    pub fn of_overlay(name: &str) -> Self {
        if name.starts_with("prod") {
            Self::Prod
        } else {
            Self::Dev
        }
    }
}

/// What the checks compare the manifests against.
#[derive(Debug)]
pub struct CheckContext {
    /// Image pinning rules.
    pub profile: Profile,
    /// The LeaderWorkerSet schema.
    pub schema: LwsSchema,
    /// Custom metrics prometheus-adapter serves.
    pub adapter_metrics: BTreeSet<String>,
}

/// Settings of every service container, by pod and container name.
pub(crate) type SettingsMap = BTreeMap<(PodRef, String), Settings>;

/// Every violation in one rendered overlay, sorted and deduplicated. When an object does not
/// parse (or has an unknown kind), only the parse errors are reported.
pub fn check(docs: &[Value], ctx: &CheckContext) -> Vec<Violation> {
    let (set, mut out) = ManifestSet::parse(docs, &ctx.schema);
    if out
        .iter()
        .any(|v| matches!(v, Violation::InvalidObject { .. } | Violation::UnknownKind { .. }))
    {
        // Objects are missing from the set: every rule that looks for them would report a
        // consequence of the parse error instead of its cause.
        out.sort();
        return out;
    }
    let views = pod_views(&set);
    let mut settings = SettingsMap::new();
    for view in &views {
        for c in view.containers() {
            if let Some(s) = service_settings(view, c, &mut out) {
                settings.insert((view.id.clone(), c.name.clone()), s);
            }
            containers::check(
                ctx.profile,
                view,
                c,
                settings.get(&(view.id.clone(), c.name.clone())),
                &mut out,
            );
        }
    }
    check_lws(&set, &settings, &mut out);
    check_hpas(&set, ctx, &mut out);
    check_stored_secrets(&set, &mut out);
    check_service_selectors(&set, &views, &mut out);
    paths::check(&set, &views, &settings, &mut out);
    certs::check(&set, &views, &settings, &mut out);
    certs::check_redis(&set, &views, &mut out);
    out.sort();
    out.dedup();
    out
}

fn service_settings(
    view: &PodView<'_>,
    c: &Container,
    out: &mut Vec<Violation>,
) -> Option<Settings> {
    let binary = Binary::of(c)?;
    match flags::parse(binary, &flags::argv(view, c, binary)) {
        Ok(s) => Some(s),
        Err(error) => {
            out.push(Violation::BadFlags {
                pod: view.id.clone(),
                container: c.name.clone(),
                error: error.trim().to_string(),
            });
            None
        }
    }
}

fn check_lws(set: &ManifestSet, settings: &SettingsMap, out: &mut Vec<Violation>) {
    for (id, lws) in set.iter(|t| if let Typed::Lws(l) = t { Some(l) } else { None }) {
        let template = &lws.spec.leader_worker_template;
        if template.restart_policy.as_deref() != Some("RecreateGroupOnPodRestart") {
            out.push(Violation::LwsRestartPolicy {
                object: id.clone(),
                found: template.restart_policy.clone(),
            });
        }
        if lws.size() > 1 && lws.spec.startup_policy.as_deref() == Some("LeaderReady") {
            out.push(Violation::LwsStartupPolicy { object: id.clone(), size: lws.size() });
        }
        let group_of = |role| {
            settings
                .iter()
                .find(|((pod, _), s)| {
                    pod.owner == *id && pod.role == role && s.binary == Binary::Decoder
                })
                .and_then(|(_, s)| s.group.clone())
        };
        let Some(leader) = group_of(Role::Leader) else { continue };
        if leader.nodes != lws.size() as usize {
            out.push(Violation::GroupArgsMismatch { object: id.clone(), flag: "nodes" });
        }
        if let Some(worker) = group_of(Role::Worker) {
            let differs: [(&'static str, bool); 6] = [
                ("tp", leader.tp != worker.tp),
                ("nodes", leader.nodes != worker.nodes),
                ("model", leader.model != worker.model),
                ("dtype", leader.dtype != worker.dtype),
                ("device", leader.device != worker.device),
                ("rendezvous-port", leader.rendezvous_port != worker.rendezvous_port),
            ];
            for (flag, _) in differs.into_iter().filter(|(_, d)| *d) {
                out.push(Violation::GroupArgsMismatch { object: id.clone(), flag });
            }
        }
    }
}

fn check_hpas(set: &ManifestSet, ctx: &CheckContext, out: &mut Vec<Violation>) {
    for (id, hpa) in set.iter(|t| if let Typed::Hpa(h) = t { Some(h) } else { None }) {
        let Some(spec) = &hpa.spec else { continue };
        let target = &spec.scale_target_ref;
        let group = api_group(target.api_version.as_deref().unwrap_or(""));
        if !set.contains(group, &target.kind, &target.name) {
            out.push(Violation::DanglingScaleTarget {
                hpa: id.clone(),
                target: format!("{group}/{}/{}", target.kind, target.name),
            });
        }
        for m in spec.metrics.iter().flatten() {
            let name = match m.type_.as_str() {
                "Pods" => m.pods.as_ref().map(|p| &p.metric.name),
                "Object" => m.object.as_ref().map(|o| &o.metric.name),
                "External" => m.external.as_ref().map(|e| &e.metric.name),
                _ => None, // Resource and ContainerResource come from metrics-server
            };
            if let Some(name) = name.filter(|n| !ctx.adapter_metrics.contains(*n)) {
                out.push(Violation::UnknownMetric { hpa: id.clone(), metric: name.clone() });
            }
        }
    }
}

/// Whether a config line sets a password (Redis `requirepass`/`masterauth`, an ACL user with
/// a `>password`) or a `password:`/`token:` style key.
fn sets_password(line: &str) -> bool {
    let l = line.trim().to_ascii_lowercase();
    l.starts_with("requirepass ")
        || l.starts_with("masterauth ")
        || (l.starts_with("user ")
            && l.split_whitespace().any(|w| w.starts_with('>') && w.len() > 1))
        || ["password", "passwd", "token", "secret", "api_key", "apikey"].iter().any(|k| {
            l.strip_prefix(k).is_some_and(|rest| {
                let rest = rest.trim_start();
                (rest.starts_with(':') || rest.starts_with('=')) && !rest[1..].trim().is_empty()
            })
        })
}

fn check_stored_secrets(set: &ManifestSet, out: &mut Vec<Violation>) {
    for o in &set.objects {
        match &o.typed {
            Typed::Secret(s) => {
                if s.data.as_ref().is_some_and(|d| !d.is_empty()) {
                    out.push(Violation::LiteralSecret {
                        object: o.id.clone(),
                        location: "data".into(),
                    });
                }
                if s.string_data.as_ref().is_some_and(|d| !d.is_empty()) {
                    out.push(Violation::LiteralSecret {
                        object: o.id.clone(),
                        location: "stringData".into(),
                    });
                }
            }
            Typed::ConfigMap(m) => {
                for (key, value) in m.data.iter().flatten() {
                    if value.lines().any(sets_password) {
                        out.push(Violation::LiteralSecret {
                            object: o.id.clone(),
                            location: format!("data key {key}"),
                        });
                    }
                }
            }
            _ => {}
        }
    }
}

fn check_service_selectors(set: &ManifestSet, views: &[PodView<'_>], out: &mut Vec<Violation>) {
    for (id, svc) in set.iter(|t| if let Typed::Service(s) = t { Some(s) } else { None }) {
        let Some(sel) = svc.spec.as_ref().and_then(|s| s.selector.as_ref()) else { continue };
        let ns = set
            .objects
            .iter()
            .find(|o| &o.id == id)
            .and_then(|o| o.raw["metadata"]["namespace"].as_str())
            .unwrap_or("default");
        if !views.iter().any(|v| v.namespace == ns && map_matches(sel, &v.labels(0))) {
            out.push(Violation::ServiceSelectsNothing { service: ObjectRef::clone(id) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::sets_password;

    #[test]
    fn password_lines() {
        assert!(sets_password("requirepass hunter2"));
        assert!(sets_password("user default on >hunter2 ~* +@all"));
        assert!(sets_password("password: hunter2"));
        assert!(!sets_password("aclfile /etc/redis/acl/users.acl"));
        assert!(!sets_password("password:"));
        assert!(!sets_password("maxmemory-policy allkeys-lru"));
    }
}
