//! Label selectors and NetworkPolicy evaluation: which pods a selector picks, and which
//! ingress the policies of an overlay allow.
//!
//! Selectors match as the API server matches them: `matchLabels` and `matchExpressions`
//! (`In`, `NotIn`, `Exists`, `DoesNotExist`) must all hold; an empty selector matches
//! everything, a Service without a selector nothing.
//!
//! Kubernetes semantics: a pod is isolated for ingress once any policy with an Ingress type
//! selects it; then a connection is allowed when some selecting policy has a rule whose
//! ports include the port (no ports: all) and whose peers include the client (no peers: all).
//! Peers with only a `podSelector` mean pods of the policy's own namespace; a
//! `namespaceSelector` is matched against the namespace's `kubernetes.io/metadata.name`
//! label; `ipBlock` peers match no pod here (their reach is judged where it matters, for the
//! rendezvous port, as exposure).

use std::collections::BTreeMap;

use k8s_openapi::api::networking::v1::{
    NetworkPolicy, NetworkPolicyIngressRule, NetworkPolicyPeer,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::lws::{LABEL_GROUP_INDEX, LABEL_NAME};
use crate::objects::{ManifestSet, ObjectRef, Typed};

/// Whether `selector` selects an object with `labels`.
pub fn matches(selector: &LabelSelector, labels: &BTreeMap<String, String>) -> bool {
    let by_labels = selector.match_labels.iter().flatten().all(|(k, v)| labels.get(k) == Some(v));
    let by_expressions = selector.match_expressions.iter().flatten().all(|e| {
        let values = e.values.as_deref().unwrap_or(&[]);
        let value = labels.get(&e.key);
        match e.operator.as_str() {
            "In" => value.is_some_and(|v| values.contains(v)),
            "NotIn" => value.is_none_or(|v| !values.contains(v)),
            "Exists" => value.is_some(),
            "DoesNotExist" => value.is_none(),
            _ => false, // the API server refuses other operators
        }
    });
    by_labels && by_expressions
}

/// Whether a Service-style selector (a plain map) selects `labels`. A Service without a
/// selector selects nothing (its endpoints are managed by hand).
pub fn map_matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// Whether `selector` requires `key` to equal `value` (in `matchLabels`, or an `In` with that
/// one value): a pod it selects is then sure to carry that label.
pub fn requires(selector: &LabelSelector, key: &str, value: &str) -> bool {
    selector.match_labels.as_ref().and_then(|m| m.get(key)).is_some_and(|v| v == value)
        || selector.match_expressions.iter().flatten().any(|e| {
            e.key == key
                && e.operator == "In"
                && e.values.as_deref() == Some(&[value.to_string()][..])
        })
}

/// A pod as the policies see it.
#[derive(Debug, Clone)]
pub struct Endpoint {
    /// Its labels (LWS labels included).
    pub labels: BTreeMap<String, String>,
    /// Its namespace.
    pub namespace: String,
}

/// A port of a server pod: the number, and the container port's name if it has one.
#[derive(Debug, Clone, Copy)]
pub struct Port<'a> {
    /// Number.
    pub number: u16,
    /// Name.
    pub name: Option<&'a str>,
}

/// The ingress policies of one overlay.
#[derive(Debug)]
pub struct Policies<'a> {
    policies: Vec<(&'a ObjectRef, String, &'a NetworkPolicy)>,
}

fn governs_ingress(p: &NetworkPolicy) -> bool {
    let spec = p.spec.as_ref();
    match spec.and_then(|s| s.policy_types.as_ref()) {
        Some(types) => types.iter().any(|t| t == "Ingress"),
        None => true, // without policyTypes, every policy governs ingress
    }
}

fn rule_ports_include(rule: &NetworkPolicyIngressRule, port: Port<'_>) -> bool {
    match &rule.ports {
        None => true,
        Some(ports) if ports.is_empty() => true,
        Some(ports) => ports.iter().any(|p| {
            if p.protocol.as_deref().is_some_and(|proto| proto != "TCP") {
                return false;
            }
            match &p.port {
                None => true,
                Some(IntOrString::Int(n)) => {
                    let end = p.end_port.unwrap_or(*n);
                    (*n..=end).contains(&i32::from(port.number))
                }
                Some(IntOrString::String(name)) => port.name == Some(name.as_str()),
            }
        }),
    }
}

fn peer_matches(peer: &NetworkPolicyPeer, policy_namespace: &str, client: &Endpoint) -> bool {
    if peer.ip_block.is_some() {
        return false;
    }
    let namespace_ok = match &peer.namespace_selector {
        None => client.namespace == policy_namespace,
        Some(sel) => {
            let ns_labels = BTreeMap::from([(
                "kubernetes.io/metadata.name".to_string(),
                client.namespace.clone(),
            )]);
            matches(sel, &ns_labels)
        }
    };
    namespace_ok && peer.pod_selector.as_ref().is_none_or(|sel| matches(sel, &client.labels))
}

impl<'a> Policies<'a> {
    /// The NetworkPolicies of `set`.
    pub fn of(set: &'a ManifestSet) -> Self {
        let policies = set
            .objects
            .iter()
            .filter_map(|o| match &o.typed {
                Typed::NetworkPolicy(p) if governs_ingress(p) => {
                    let ns =
                        o.raw["metadata"]["namespace"].as_str().unwrap_or("default").to_string();
                    Some((&o.id, ns, p))
                }
                _ => None,
            })
            .collect();
        Self { policies }
    }

    /// Policies (reference, rules) that select `server`.
    pub fn selecting<'s>(
        &'s self,
        server: &'s Endpoint,
    ) -> impl Iterator<Item = (&'a ObjectRef, &'a [NetworkPolicyIngressRule])> + 's {
        self.policies.iter().filter_map(move |(id, ns, p)| {
            let spec = p.spec.as_ref()?;
            let selected = *ns == server.namespace
                && spec.pod_selector.as_ref().is_none_or(|s| matches(s, &server.labels));
            selected.then(|| (*id, spec.ingress.as_deref().unwrap_or(&[])))
        })
    }

    /// Whether `client` may open a connection to `server` on `port`.
    pub fn allows(&self, client: &Endpoint, server: &Endpoint, port: Port<'_>) -> bool {
        let mut isolated = false;
        for (id, rules) in self.selecting(server) {
            isolated = true;
            let ns = self.namespace_of(id);
            let allowed = rules.iter().any(|r| {
                rule_ports_include(r, port)
                    && r.from.as_ref().is_none_or(|peers| {
                        peers.is_empty() || peers.iter().any(|p| peer_matches(p, ns, client))
                    })
            });
            if allowed {
                return true;
            }
        }
        !isolated
    }

    fn namespace_of(&self, id: &ObjectRef) -> &str {
        self.policies.iter().find(|(i, _, _)| *i == id).map_or("default", |(_, ns, _)| ns.as_str())
    }

    /// Policies that open `port` of `server` (a pod of LeaderWorkerSet `lws`, group `group`)
    /// to anything beyond the pods of that same group.
    pub fn exposing(
        &self,
        server: &Endpoint,
        port: Port<'_>,
        lws: &str,
        group: usize,
    ) -> Vec<&'a ObjectRef> {
        let group = group.to_string();
        let own_group_only = |peer: &NetworkPolicyPeer| {
            peer.ip_block.is_none()
                && peer.namespace_selector.is_none()
                && peer.pod_selector.as_ref().is_some_and(|s| {
                    requires(s, LABEL_NAME, lws) && requires(s, LABEL_GROUP_INDEX, &group)
                })
        };
        self.selecting(server)
            .filter(|(_, rules)| {
                rules.iter().any(|r| {
                    rule_ports_include(r, port)
                        && r.from.as_ref().is_none_or(|peers| {
                            peers.is_empty() || !peers.iter().all(own_group_only)
                        })
                })
            })
            .map(|(id, _)| id)
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn selectors_match_like_the_api_server() {
        let pod = labels(&[("app", "x"), ("tier", "a")]);
        assert!(matches(&LabelSelector::default(), &pod));
        let sel =
            LabelSelector { match_labels: Some(labels(&[("app", "x")])), ..Default::default() };
        assert!(matches(&sel, &pod));
        let not_in = LabelSelectorRequirement {
            key: "tier".into(),
            operator: "NotIn".into(),
            values: Some(vec!["a".into()]),
        };
        let sel = LabelSelector { match_expressions: Some(vec![not_in]), ..Default::default() };
        assert!(!matches(&sel, &pod));
        assert!(!map_matches(&BTreeMap::new(), &pod));
        assert!(map_matches(&labels(&[("tier", "a")]), &pod));
    }
}
