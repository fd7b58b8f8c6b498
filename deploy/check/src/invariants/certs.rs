//! Rules on certificates: every TLS file a service reads comes from a Secret that a
//! cert-manager `Certificate` of the overlay issues (so something creates and renews it), that
//! Certificate has the key usage its use needs, its Issuer is in the overlay, and the
//! certificate each gateway upstream serves carries the name the gateway dials (the gateway
//! verifies the name it was configured with, not the address it resolved); each internal tier
//! names the clients it accepts and the gateway's certificate carries one of those names;
//! Redis is TLS only, with client certificates, its certificate issued too.

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
    // The Certificate behind each serving container's listener, and the one the gateway
    // presents to the tiers, by pod and container.
    let mut served: BTreeMap<(crate::pods::PodRef, String), (&ObjectRef, &Certificate)> =
        BTreeMap::new();
    let mut presented: BTreeMap<(crate::pods::PodRef, String), (&ObjectRef, &Certificate)> =
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
                } else if link == crate::flags::UPSTREAM_LINK {
                    presented.insert((view.id.clone(), c.name.clone()), (cid, cert));
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
                let client_cert = presented.get(&(client.id.clone(), c.name.clone()));
                for server in views.iter().filter(|v| map_matches(&selector, &v.labels(0))) {
                    for sc in server.containers() {
                        let key = (server.id.clone(), sc.name.clone());
                        let accepts = settings.get(&key).map(|s| &s.tls.client_names);
                        if let (Some(names), Some(&(gid, gcert))) = (accepts, client_cert) {
                            let carried = gcert.spec.dns_names.iter().any(|n| names.contains(n));
                            if !names.is_empty() && !carried {
                                out.push(Violation::ClientNameMismatch {
                                    pod: server.id.clone(),
                                    certificate: gid.clone(),
                                    names: names.clone(),
                                });
                            }
                        }
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

/// Redis speaks TLS only: its configuration (a file from a ConfigMap volume) turns the plain
/// port off (`port 0`), opens `tls-port`, keeps `tls-auth-clients` on, and reads its
/// certificate from a Secret that a Certificate issues.
pub(crate) fn check_redis(set: &ManifestSet, views: &[PodView<'_>], out: &mut Vec<Violation>) {
    for view in views {
        let Some(spec) = view.spec() else { continue };
        for c in view.containers() {
            let words: Vec<&String> =
                c.command.iter().flatten().chain(c.args.iter().flatten()).collect();
            if !words.iter().any(|w| w.rsplit('/').next() == Some("redis-server")) {
                continue;
            }
            let Some(conf_path) = words.iter().find(|w| w.ends_with(".conf")) else { continue };
            let Some(conf) = config_file(set, spec, c, conf_path) else { continue };
            let setting = |key: &str| {
                conf.lines()
                    .map(str::trim)
                    .filter(|l| !l.starts_with('#'))
                    .filter_map(|l| l.split_once(char::is_whitespace))
                    .filter(|(k, _)| k.eq_ignore_ascii_case(key))
                    .map(|(_, v)| v.trim().to_string())
                    .next_back()
            };
            let mut plain = |missing: &'static str| {
                out.push(Violation::RedisNotTls {
                    pod: view.id.clone(),
                    container: c.name.clone(),
                    missing,
                })
            };
            if setting("port").as_deref() != Some("0") {
                plain("port 0");
            }
            if setting("tls-port").is_none() {
                plain("tls-port");
            }
            if setting("tls-auth-clients").is_some_and(|v| !v.eq_ignore_ascii_case("yes")) {
                plain("tls-auth-clients yes");
            }
            let Some(cert) = setting("tls-cert-file") else {
                plain("tls-cert-file");
                continue;
            };
            let issued = secret_of(spec, c, &cert).is_some_and(|secret| {
                set.iter(|t| if let Typed::Certificate(c) = t { Some(c) } else { None })
                    .any(|(_, cert)| cert.spec.secret_name == secret)
            });
            if !issued {
                out.push(Violation::UnissuedCertificate {
                    pod: view.id.clone(),
                    container: c.name.clone(),
                    link: "its listener",
                    secret: secret_of(spec, c, &cert).unwrap_or_default(),
                });
            }
        }
    }
}

/// The text of `path` when it comes from a ConfigMap volume of the overlay.
fn config_file(
    set: &ManifestSet,
    spec: &k8s_openapi::api::core::v1::PodSpec,
    c: &k8s_openapi::api::core::v1::Container,
    path: &str,
) -> Option<String> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))?;
    let file = path.strip_prefix(&format!("{}/", mount.mount_path.trim_end_matches('/')))?;
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name)?;
    let name = &volume.config_map.as_ref()?.name;
    set.iter(|t| if let Typed::ConfigMap(c) = t { Some(c) } else { None })
        .find(|(id, _)| &id.name == name)
        .and_then(|(_, cm)| cm.data.as_ref()?.get(file).cloned())
}
