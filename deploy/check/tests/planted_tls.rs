//! The TLS rules, each shown failing on a planted mistake: plain-text links, probes that cannot
//! reach a TLS port, and certificates that nothing issues, that lack a usage or a name, or whose
//! issuer is missing.

use dsvl_deploy_check::pods::Role;
use dsvl_deploy_check::{ObjectRef, Violation};
use serde_json::{json, Value};

use crate::support::{at, object, planted, pod, POD};

fn gateway() -> dsvl_deploy_check::pods::PodRef {
    pod("Deployment", "dsvl-gateway", Role::Deployment)
}

fn vision() -> dsvl_deploy_check::pods::PodRef {
    pod("Deployment", "dsvl-vision", Role::Deployment)
}

/// Removes the environment variables `names` from the first container of Deployment `name`.
fn drop_env(docs: &mut [Value], name: &str, names: &[&str]) {
    let env = at(docs, "Deployment", name, &format!("{POD}/containers/0/env"))
        .as_array_mut()
        .expect("env is a list");
    let before = env.len();
    env.retain(|v| !names.contains(&v["name"].as_str().unwrap_or("")));
    assert_eq!(before - env.len(), names.len(), "{names:?} not all in {name}'s env");
}

fn certificate<'a>(docs: &'a mut [Value], name: &str) -> &'a mut Value {
    object(docs, "Certificate", name)
}

#[test]
fn links_left_in_plain_text() {
    let v = planted("dev", |d| {
        drop_env(
            d,
            "dsvl-vision",
            &[
                "DSVL_TLS_CERT_FILE",
                "DSVL_TLS_KEY_FILE",
                "DSVL_TLS_CLIENT_CA_FILE",
                "DSVL_TLS_CLIENT_NAMES",
            ],
        )
    });
    let plain = |pod, container: &str, link| Violation::PlainTextLink {
        pod,
        container: container.into(),
        link,
    };
    assert_eq!(v, [plain(vision(), "vision", "gRPC listener")]);
    let v = planted("dev", |d| {
        drop_env(d, "dsvl-vision", &["DSVL_REDIS_CERT_FILE", "DSVL_REDIS_KEY_FILE"])
    });
    assert_eq!(v, [plain(vision(), "vision", "Redis")]);
    let v = planted("dev", |d| {
        drop_env(
            d,
            "dsvl-gateway",
            &["DSVL_UPSTREAM_CA_FILE", "DSVL_UPSTREAM_CERT_FILE", "DSVL_UPSTREAM_KEY_FILE"],
        )
    });
    assert_eq!(v, [plain(gateway(), "gateway", "vision and decoder tiers")]);
    let v = planted("dev", |d| {
        drop_env(d, "dsvl-gateway", &["DSVL_TLS_CERT_FILE", "DSVL_TLS_KEY_FILE"])
    });
    assert_eq!(v, [plain(gateway(), "gateway", "public listeners")]);
    // `--insecure` is refused outright on the gateway too.
    let v = planted("dev", |d| {
        at(d, "Deployment", "dsvl-gateway", &format!("{POD}/containers/0/args"))
            .as_array_mut()
            .expect("args")
            .push(json!("--insecure"))
    });
    assert!(
        matches!(&v[..], [Violation::BadFlags { error, .. }] if error.contains("--insecure")),
        "{v:?}"
    );
}

#[test]
fn a_tls_port_without_a_health_port() {
    let v = planted("dev", |d| {
        drop_env(d, "dsvl-vision", &["DSVL_VISION_HEALTH_LISTEN"]);
        for probe in ["startupProbe", "readinessProbe", "livenessProbe"] {
            *at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/{probe}/grpc/port")) =
                json!(50061);
        }
    });
    assert_eq!(v, [Violation::NoHealthPort { pod: vision(), container: "vision".into() }]);
}

#[test]
fn certificates_that_do_not_fit() {
    // Nothing issues the vision tier's Secret: neither its listener nor its Redis identity.
    let v = planted("dev", |d| {
        d.retain(|o| !(o["kind"] == "Certificate" && o["metadata"]["name"] == "dsvl-vision"))
    });
    let unissued = |link| Violation::UnissuedCertificate {
        pod: vision(),
        container: "vision".into(),
        link,
        secret: "dsvl-vision-tls".into(),
    };
    assert_eq!(v, [unissued("Redis"), unissued("its listener")]);

    // The gateway dials `dsvl-vision`: a certificate without that name fails verification.
    let v = planted("dev", |d| {
        certificate(d, "dsvl-vision")["spec"]["dnsNames"] = json!(["dsvl-vision.dsvl.svc"]);
    });
    assert_eq!(
        v,
        [Violation::CertificateNameMismatch {
            pod: gateway(),
            host: "dsvl-vision".into(),
            certificate: ObjectRef::new("Certificate", "dsvl-vision"),
        }]
    );

    // A client identity without `client auth`.
    let v = planted("dev", |d| {
        certificate(d, "dsvl-gateway-internal")["spec"]["usages"] = json!(["server auth"]);
    });
    let usage = |link| Violation::CertificateUsage {
        certificate: ObjectRef::new("Certificate", "dsvl-gateway-internal"),
        link,
        needed: "client auth",
    };
    assert_eq!(v, [usage("Redis"), usage("vision and decoder tiers")]);

    // An issuer that is not there.
    let v = planted("dev", |d| {
        certificate(d, "dsvl-redis")["spec"]["issuerRef"]["name"] = json!("dsvl-missing");
    });
    assert_eq!(
        v,
        [Violation::DanglingIssuer {
            certificate: ObjectRef::new("Certificate", "dsvl-redis"),
            issuer: "dsvl-missing".into(),
        }]
    );

    // A misspelled field (cert-manager has no schema in the strict validator).
    let v = planted("dev", |d| {
        let spec = &mut certificate(d, "dsvl-redis")["spec"];
        let names = spec.as_object_mut().expect("map").remove("dnsNames").expect("dnsNames");
        spec["dnsName"] = names;
    });
    assert!(
        matches!(&v[..], [Violation::InvalidObject { object, error }]
            if *object == ObjectRef::new("Certificate", "dsvl-redis") && error.contains("dnsName")),
        "{v:?}"
    );
}

#[test]
fn internal_tiers_that_accept_any_client_or_not_the_gateway() {
    let v = planted("dev", |d| drop_env(d, "dsvl-vision", &["DSVL_TLS_CLIENT_NAMES"]));
    assert_eq!(v, [Violation::AnyClientAccepted { pod: vision(), container: "vision".into() }]);

    // The gateway's client certificate loses the name the tiers accept: both refuse it.
    let v = planted("dev", |d| {
        certificate(d, "dsvl-gateway-internal")["spec"]["dnsNames"] = json!(["dsvl-gw"]);
    });
    let mismatch = |pod| Violation::ClientNameMismatch {
        pod,
        certificate: ObjectRef::new("Certificate", "dsvl-gateway-internal"),
        names: vec!["dsvl-gateway".into()],
    };
    let mut expected = vec![mismatch(vision()), mismatch(crate::support::decoder_leader())];
    expected.sort();
    assert_eq!(v, expected);
}

#[test]
fn redis_left_in_plain_text_or_without_its_certificate() {
    let conf = |d: &mut Vec<Value>, from: &str, to: &str| {
        let text = at(d, "ConfigMap", "dsvl-redis-config", "/data/redis.conf");
        let replaced = text.as_str().expect("text").replace(from, to);
        assert_ne!(text.as_str(), Some(replaced.as_str()), "{from} not in redis.conf");
        *text = json!(replaced);
    };
    let redis = || pod("StatefulSet", "dsvl-redis", Role::StatefulSet);
    let not_tls =
        |missing| Violation::RedisNotTls { pod: redis(), container: "redis".into(), missing };
    assert_eq!(planted("dev", |d| conf(d, "port 0\n", "port 6380\n")), [not_tls("port 0")]);
    assert_eq!(
        planted("dev", |d| conf(d, "tls-auth-clients yes", "tls-auth-clients no")),
        [not_tls("tls-auth-clients yes")]
    );
    let v = planted("dev", |d| {
        d.retain(|o| !(o["kind"] == "Certificate" && o["metadata"]["name"] == "dsvl-redis"))
    });
    assert_eq!(
        v,
        [Violation::UnissuedCertificate {
            pod: redis(),
            container: "redis".into(),
            link: "its listener",
            secret: "dsvl-redis-tls".into(),
        }]
    );
}
