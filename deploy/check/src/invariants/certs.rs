//! Rules on certificates: every TLS file a service reads comes from a Secret that a
//! cert-manager `Certificate` of the overlay issues (so something creates and renews it), that
//! Certificate has the key usage its use needs, its Issuer is in the overlay, and the
//! certificate each gateway upstream serves carries the name the gateway dials (the gateway
//! verifies the name it was configured with, not the address it resolved).

use std::collections::BTreeMap;

use crate::certs::Certificate;
use crate::invariants::containers::secret_of;
use crate::invariants::SettingsMap;
use crate::network::map_matches;
use crate::objects::{ManifestSet, ObjectRef, Typed};
use crate::pods::PodView;
use crate::Violation;

fn usage_ok(cert: &Certificate, needed: &str) -> bool {
    // No usages: cert-manager leaves the extended key usage out, which allows any use.
    cert.spec.usages.is_empty() || cert.spec.usages.iter().any(|u| u == needed)
}

pub(crate) fn check(
    set: &ManifestSet,
    views: &[PodView<'_>],
    settings: &SettingsMap,
    out: &mut Vec<Violation>,
) {
    let certificates: BTreeMap<&str, (&ObjectRef, &Certificate)> = set
        .iter(|t| if let Typed::Certificate(c) = t { Some(c) } else { None })
        .map(|(id, c)| (c.spec.secret_name.as_str(), (id, c)))
        .collect();
    for (id, cert) in set.iter(|t| if let Typed::Certificate(c) = t { Some(c) } else { None }) {
        let r = &cert.spec.issuer_ref;
        let cluster_wide = r.kind.as_deref() == Some("ClusterIssuer");
        if !cluster_wide && !set.contains("cert-manager.io", "Issuer", &r.name) {
            out.push(Violation::DanglingIssuer { certificate: id.clone(), issuer: r.name.clone() });
        }
    }
    // The Certificate behind each serving container's listener, by pod and container.
    let mut served: BTreeMap<(crate::pods::PodRef, String), (&ObjectRef, &Certificate)> =
        BTreeMap::new();
    for view in views {
        let Some(spec) = view.spec() else { continue };
        for c in view.containers() {
            let Some(s) = settings.get(&(view.id.clone(), c.name.clone())) else { continue };
            let uses = s
                .tls
                .serves
                .iter()
                .map(|p| ("its listener", p, "server auth"))
                .chain(s.tls.presents.iter().map(|(link, p)| (*link, p, "client auth")));
            for (link, path, needed) in uses {
                let Some(secret) = secret_of(spec, c, &path.to_string_lossy()) else {
                    continue; // reported as SecretFileNotMounted
                };
                let Some(&(cid, cert)) = certificates.get(secret.as_str()) else {
                    out.push(Violation::UnissuedCertificate {
                        pod: view.id.clone(),
                        container: c.name.clone(),
                        link,
                        secret,
                    });
                    continue;
                };
                if !usage_ok(cert, needed) {
                    out.push(Violation::CertificateUsage {
                        certificate: cid.clone(),
                        link,
                        needed,
                    });
                }
                if needed == "server auth" {
                    served.insert((view.id.clone(), c.name.clone()), (cid, cert));
                }
            }
        }
    }
    // Each gateway upstream's pods serve a certificate for the upstream's host.
    for client in views {
        for c in client.containers() {
            let Some(s) = settings.get(&(client.id.clone(), c.name.clone())) else { continue };
            for up in &s.upstreams {
                let selector = set
                    .iter(|t| if let Typed::Service(s) = t { Some(s) } else { None })
                    .find(|(id, _)| id.name == up.host)
                    .and_then(|(_, svc)| svc.spec.as_ref()?.selector.clone());
                let Some(selector) = selector else { continue }; // DanglingUpstream
                for server in views.iter().filter(|v| map_matches(&selector, &v.labels(0))) {
                    for sc in server.containers() {
                        let key = (server.id.clone(), sc.name.clone());
                        let Some(&(cid, cert)) = served.get(&key) else { continue };
                        if !cert.spec.dns_names.iter().any(|n| n == &up.host) {
                            out.push(Violation::CertificateNameMismatch {
                                pod: client.id.clone(),
                                host: up.host.clone(),
                                certificate: cid.clone(),
                            });
                        }
                    }
                }
            }
        }
    }
}
