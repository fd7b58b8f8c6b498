//! Rules across pods: can each tier reach what it needs, and nothing more for the rendezvous.
//!
//! * Every gateway upstream (`--vision`, `--decoder`) names a Service port of the overlay,
//!   and the NetworkPolicies let the gateway reach the pods behind it on the target port.
//! * Every service with a Redis URL can reach the Redis pods.
//! * For LeaderWorkerSets of more than one pod, for every group the HPA may create: the pods
//!   of the group reach each other (the rendezvous port on the leader, and an ephemeral port
//!   both ways for NCCL's sockets), and no policy opens the rendezvous port to anything else.

use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::invariants::SettingsMap;
use crate::network::map_matches;
use crate::network::{Endpoint, Policies, Port};
use crate::objects::{ManifestSet, Typed};
use crate::pods::{PodView, Role};
use crate::Violation;

/// A port NCCL may pick for its own sockets between the pods of a group.
const NCCL_PROBE_PORT: u16 = 45_000;

fn endpoint(view: &PodView<'_>, group: usize) -> Endpoint {
    Endpoint { labels: view.labels(group), namespace: view.namespace.clone() }
}

/// The container port of `view` a Service `targetPort` designates.
fn target_port<'v>(view: &'v PodView<'_>, target: &IntOrString) -> Option<Port<'v>> {
    let ports = view.containers().iter().flat_map(|c| c.ports.iter().flatten());
    match target {
        IntOrString::Int(n) => {
            let name =
                ports.clone().find(|p| p.container_port == *n).and_then(|p| p.name.as_deref());
            u16::try_from(*n).ok().map(|number| Port { number, name })
        }
        IntOrString::String(s) => {
            let p = ports.clone().find(|p| p.name.as_deref() == Some(s.as_str()))?;
            Some(Port { number: u16::try_from(p.container_port).ok()?, name: p.name.as_deref() })
        }
    }
}

pub(crate) fn check(
    set: &ManifestSet,
    views: &[PodView<'_>],
    settings: &SettingsMap,
    out: &mut Vec<Violation>,
) {
    let policies = Policies::of(set);
    for ((pod, _), s) in settings {
        let Some(client) = views.iter().find(|v| &v.id == pod) else { continue };
        for up in &s.upstreams {
            check_upstream(set, views, &policies, client, up.flag, &up.host, up.port, out);
        }
        if s.redis {
            for server in views.iter().filter(|v| v.id != client.id) {
                let redis_port = server
                    .containers()
                    .iter()
                    .flat_map(|c| c.ports.iter().flatten())
                    .find(|p| p.name.as_deref() == Some("redis"));
                let Some(p) = redis_port else { continue };
                let port = Port { number: p.container_port as u16, name: p.name.as_deref() };
                if !policies.allows(&endpoint(client, 0), &endpoint(server, 0), port) {
                    out.push(Violation::FlowBlocked {
                        from: client.id.clone(),
                        to: server.id.clone(),
                        port: port.number,
                    });
                }
            }
        }
    }
    check_groups(set, views, settings, &policies, out);
}

#[allow(clippy::too_many_arguments)]
fn check_upstream(
    set: &ManifestSet,
    views: &[PodView<'_>],
    policies: &Policies<'_>,
    client: &PodView<'_>,
    flag: &'static str,
    host: &str,
    port: u16,
    out: &mut Vec<Violation>,
) {
    let service = set
        .iter(|t| if let Typed::Service(s) = t { Some(s) } else { None })
        .find(|(id, _)| id.name == host)
        .map(|(_, s)| s);
    let service_port = service.and_then(|s| s.spec.as_ref()).and_then(|spec| {
        spec.ports.iter().flatten().find(|p| p.port == i32::from(port)).map(|p| (spec, p))
    });
    let Some((spec, sp)) = service_port else {
        out.push(Violation::DanglingUpstream {
            pod: client.id.clone(),
            flag,
            endpoint: format!("{host}:{port}"),
        });
        return;
    };
    let selector = spec.selector.clone().unwrap_or_default();
    let target = sp.target_port.clone().unwrap_or(IntOrString::Int(sp.port));
    for server in views.iter().filter(|v| map_matches(&selector, &v.labels(0))) {
        let Some(tp) = target_port(server, &target) else {
            out.push(Violation::DanglingUpstream {
                pod: client.id.clone(),
                flag,
                endpoint: format!("{host}:{port}"),
            });
            continue;
        };
        if !policies.allows(&endpoint(client, 0), &endpoint(server, 0), tp) {
            out.push(Violation::FlowBlocked {
                from: client.id.clone(),
                to: server.id.clone(),
                port: tp.number,
            });
        }
    }
}

/// Groups the HPA (or, without one, `spec.replicas`) may create for LeaderWorkerSet `name`.
fn max_groups(set: &ManifestSet, name: &str, replicas: Option<i32>) -> usize {
    let hpa = set
        .iter(|t| if let Typed::Hpa(h) = t { Some(h) } else { None })
        .filter_map(|(_, h)| h.spec.as_ref())
        .find(|s| s.scale_target_ref.kind == "LeaderWorkerSet" && s.scale_target_ref.name == name);
    hpa.map_or(replicas.unwrap_or(1), |s| s.max_replicas).max(0) as usize
}

fn check_groups(
    set: &ManifestSet,
    views: &[PodView<'_>],
    settings: &SettingsMap,
    policies: &Policies<'_>,
    out: &mut Vec<Violation>,
) {
    for (id, lws) in set.iter(|t| if let Typed::Lws(l) = t { Some(l) } else { None }) {
        if lws.size() < 2 {
            continue; // the ranks of a one-pod group talk over loopback and /dev/shm
        }
        let members: Vec<&PodView<'_>> = views.iter().filter(|v| &v.id.owner == id).collect();
        let (Some(leader), Some(worker)) = (
            members.iter().find(|v| v.id.role == Role::Leader),
            members.iter().find(|v| v.id.role == Role::Worker),
        ) else {
            continue;
        };
        let rendezvous = settings
            .iter()
            .find(|((pod, _), _)| pod == &leader.id)
            .and_then(|(_, s)| s.group.as_ref())
            .map_or(29_500, |g| g.rendezvous_port);
        let rdv = Port { number: rendezvous, name: Some("rendezvous") };
        let nccl = Port { number: NCCL_PROBE_PORT, name: None };
        for group in 0..max_groups(set, lws.name(), lws.spec.replicas) {
            let (l, w) = (endpoint(leader, group), endpoint(worker, group));
            let joined = policies.allows(&w, &l, rdv)
                && policies.allows(&w, &l, nccl)
                && policies.allows(&l, &w, nccl);
            if !joined {
                out.push(Violation::GroupPolicyMissing { lws: id.clone(), group });
            }
            for member in &members {
                for policy in policies.exposing(&endpoint(member, group), rdv, lws.name(), group) {
                    out.push(Violation::RendezvousExposed {
                        policy: policy.clone(),
                        pod: member.id.clone(),
                        port: rendezvous,
                    });
                }
            }
        }
    }
}
