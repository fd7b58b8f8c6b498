//! Rules for one container of one pod template.
//!
//! Every container: non-root and hardened (read-only root filesystem, no privilege escalation,
//! every capability dropped, RuntimeDefault seccomp, no service-account token), no floating image (pinned in prod), no secret in env values or
//! arguments, readiness and liveness probes. Service containers, with their flags as the
//! binary parses them: all three probes, `grpc:` on the gRPC port with the health service names
//! the services report for them (`startup`, `""` or the API service for readiness, `liveness`,
//! which never follows a drain or another tier), a preStop hook, a grace period covering preStop + drain, GPU limits equal to
//! the devices the ranks open, `/dev/shm` in memory for the decoder, no unknown `DSVL_*`
//! variables, and secret files read from Secret volumes; no link in plain text, and with TLS on
//! the gRPC port a plain-text health port (`--health-listen`) that the probes use (kubelet's
//! gRPC probes speak no TLS). Decoder worker ranks serve nothing, so they need no probes and
//! drain nothing.

use k8s_openapi::api::core::v1::{Container, PodSpec, Probe as K8sProbe};

use crate::flags::{Binary, Settings};
use crate::images::ImageRef;
use crate::invariants::Profile;
use crate::pods::PodView;
use crate::violation::Probe;
use crate::Violation;

/// Seconds a pod needs beyond preStop + drain to exit after the drain deadline.
pub const EXIT_MARGIN_SECS: i64 = 5;

/// The kubelet's default `terminationGracePeriodSeconds`.
const DEFAULT_GRACE_SECS: i64 = 30;

/// Substrings of environment variable names that hold secrets.
const SECRET_NAMES: [&str; 9] = [
    "PASSWORD",
    "PASSWD",
    "TOKEN",
    "SECRET",
    "API_KEY",
    "APIKEY",
    "CREDENTIAL",
    "PRIVATE_KEY",
    "ACCESS_KEY",
];

pub(crate) fn check(
    profile: Profile,
    view: &PodView<'_>,
    c: &Container,
    settings: Option<&Settings>,
    out: &mut Vec<Violation>,
) {
    let pod = || view.id.clone();
    let name = || c.name.clone();
    let Some(spec) = view.spec() else { return };
    if !runs_as_non_root(spec, c) {
        out.push(Violation::RunsAsRoot { pod: pod(), container: name() });
    }
    for missing in hardening_gaps(spec, c) {
        out.push(Violation::NotHardened { pod: pod(), container: name(), missing });
    }
    check_image(profile, view, c, out);
    check_literal_secrets(view, c, out);
    let Some(s) = settings else {
        // Not a dsvl service (Redis): it still has to report readiness and liveness.
        for (probe, p) in
            [(Probe::Readiness, &c.readiness_probe), (Probe::Liveness, &c.liveness_probe)]
        {
            if p.is_none() {
                out.push(Violation::MissingProbe { pod: pod(), container: name(), probe });
            }
        }
        return;
    };
    let binary = s.binary;
    for link in &s.tls.plain {
        out.push(Violation::PlainTextLink { pod: pod(), container: name(), link });
    }
    if binary != Binary::Gateway
        && s.serves
        && s.tls.serves.is_some()
        && s.tls.client_names.is_empty()
    {
        out.push(Violation::AnyClientAccepted { pod: pod(), container: name() });
    }
    if s.serves && s.tls.serves.is_some() && s.health_port.is_none() {
        out.push(Violation::NoHealthPort { pod: pod(), container: name() });
    }
    // Kubelet's gRPC probes speak plain text: they go to the health port when there is one.
    let probe_port = s.health_port.unwrap_or(s.grpc_port);
    if s.serves {
        let probes = [
            (Probe::Startup, &c.startup_probe),
            (Probe::Readiness, &c.readiness_probe),
            (Probe::Liveness, &c.liveness_probe),
        ];
        for (probe, p) in probes {
            let Some(p) = p else {
                out.push(Violation::MissingProbe { pod: pod(), container: name(), probe });
                continue;
            };
            if !is_grpc_on(p, probe_port) {
                out.push(Violation::ProbeNotGrpc {
                    pod: pod(),
                    container: name(),
                    probe,
                    listen: probe_port,
                });
                continue;
            }
            let found = p.grpc.as_ref().and_then(|g| g.service.clone()).unwrap_or_default();
            let expected: &[&str] = match probe {
                Probe::Startup => &["startup"],
                Probe::Liveness => &["liveness"],
                Probe::Readiness => &["", binary.api_service()],
            };
            if !expected.contains(&found.as_str()) {
                let expected =
                    expected.iter().map(|e| format!("{e:?}")).collect::<Vec<_>>().join(" or ");
                out.push(Violation::ProbeWrongService {
                    pod: pod(),
                    container: name(),
                    probe,
                    found,
                    expected,
                });
            }
        }
        if c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()).is_none() {
            out.push(Violation::MissingPreStop { pod: pod(), container: name() });
        }
    }
    let grace = spec.termination_grace_period_seconds.unwrap_or(DEFAULT_GRACE_SECS);
    let needed = pre_stop_secs(c) + s.drain_secs as i64 + EXIT_MARGIN_SECS;
    if grace < needed {
        out.push(Violation::GraceTooShort { pod: pod(), grace, needed });
    }
    let found = gpu_limit(c);
    match (s.gpus, found) {
        (0, 0) => {}
        (_, 0) => out.push(Violation::GpuMissing {
            pod: pod(),
            container: name(),
            device: s.device.clone(),
        }),
        (expected, found) if expected != found => {
            out.push(Violation::GpuCountMismatch { pod: pod(), container: name(), expected, found })
        }
        _ => {}
    }
    if binary == Binary::Decoder && !has_memory_shm(spec, c) {
        out.push(Violation::ShmMissing { pod: pod(), container: name() });
    }
    if let Some(key) = redis_secret_key(c) {
        let expected = binary.redis_user_key();
        if key != format!("dsvl-redis/{expected}") {
            out.push(Violation::SharedRedisUser { pod: pod(), container: name(), key, expected });
        }
    }
    let known = binary.env_names();
    for var in
        c.env.iter().flatten().filter(|v| v.name.starts_with("DSVL_") && !known.contains(&v.name))
    {
        out.push(Violation::UnknownEnv { pod: pod(), container: name(), name: var.name.clone() });
    }
    for path in &s.secret_files {
        if !on_secret_volume(spec, c, &path.to_string_lossy()) {
            out.push(Violation::SecretFileNotMounted {
                pod: pod(),
                container: name(),
                path: path.display().to_string(),
            });
        }
    }
}

fn runs_as_non_root(spec: &PodSpec, c: &Container) -> bool {
    let pod = spec.security_context.as_ref();
    let own = c.security_context.as_ref();
    let non_root = own.and_then(|s| s.run_as_non_root).or(pod.and_then(|s| s.run_as_non_root));
    let user = own.and_then(|s| s.run_as_user).or(pod.and_then(|s| s.run_as_user));
    non_root == Some(true) && user != Some(0)
}

/// What a container lacks of: a read-only root filesystem, no privilege escalation, every
/// capability dropped, the RuntimeDefault (or a Localhost) seccomp profile, and no
/// service-account token mounted (nothing in dsvl talks to the Kubernetes API).
fn hardening_gaps(spec: &PodSpec, c: &Container) -> Vec<&'static str> {
    let own = c.security_context.as_ref();
    let mut gaps = Vec::new();
    if own.and_then(|s| s.read_only_root_filesystem) != Some(true) {
        gaps.push("readOnlyRootFilesystem: true");
    }
    if own.and_then(|s| s.allow_privilege_escalation) != Some(false) {
        gaps.push("allowPrivilegeEscalation: false");
    }
    let drops_all = own
        .and_then(|s| s.capabilities.as_ref())
        .and_then(|c| c.drop.as_ref())
        .is_some_and(|d| d.iter().any(|x| x == "ALL"));
    if !drops_all {
        gaps.push("capabilities.drop: [ALL]");
    }
    let profile = own
        .and_then(|s| s.seccomp_profile.as_ref())
        .or(spec.security_context.as_ref().and_then(|s| s.seccomp_profile.as_ref()))
        .map(|p| p.type_.as_str());
    if !matches!(profile, Some("RuntimeDefault" | "Localhost")) {
        gaps.push("seccompProfile: RuntimeDefault");
    }
    if spec.automount_service_account_token != Some(false) {
        gaps.push("automountServiceAccountToken: false");
    }
    gaps
}

/// The Secret and key the container's `DSVL_REDIS_URL` comes from, as `secret/key`
/// (`dsvl-redis/vision-url`). A URL written into the manifest is the literal-secret rule's.
fn redis_secret_key(c: &Container) -> Option<String> {
    let var = c.env.iter().flatten().find(|v| v.name == "DSVL_REDIS_URL")?;
    let r = var.value_from.as_ref()?.secret_key_ref.as_ref()?;
    Some(format!("{}/{}", r.name, r.key))
}

fn is_grpc_on(p: &K8sProbe, port: u16) -> bool {
    p.grpc.as_ref().is_some_and(|g| g.port == i32::from(port))
}

/// Seconds a preStop hook holds the container before SIGTERM (a `sleep` action or an exec
/// of `sleep N`; other hooks count as 0).
fn pre_stop_secs(c: &Container) -> i64 {
    let Some(hook) = c.lifecycle.as_ref().and_then(|l| l.pre_stop.as_ref()) else { return 0 };
    if let Some(s) = &hook.sleep {
        return s.seconds;
    }
    let words = hook.exec.as_ref().and_then(|e| e.command.as_deref()).unwrap_or(&[]);
    match words {
        [cmd, secs] if cmd.rsplit('/').next() == Some("sleep") => {
            secs.parse::<f64>().map_or(0, |s| s.ceil() as i64)
        }
        _ => 0,
    }
}

fn gpu_limit(c: &Container) -> u32 {
    let r = c.resources.as_ref();
    let q = r
        .and_then(|r| r.limits.as_ref())
        .and_then(|l| l.get("nvidia.com/gpu"))
        .or_else(|| r.and_then(|r| r.requests.as_ref()).and_then(|l| l.get("nvidia.com/gpu")));
    q.and_then(|q| q.0.parse().ok()).unwrap_or(0)
}

fn has_memory_shm(spec: &PodSpec, c: &Container) -> bool {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| m.mount_path.trim_end_matches('/') == "/dev/shm")
        .any(|m| {
            spec.volumes.iter().flatten().any(|v| {
                v.name == m.name
                    && v.empty_dir.as_ref().is_some_and(|e| e.medium.as_deref() == Some("Memory"))
            })
        })
}

/// The Secret a file at `path` of container `c` comes from (a `secret` volume, or the first
/// Secret of a projected one).
pub(crate) fn secret_of(spec: &PodSpec, c: &Container, path: &str) -> Option<String> {
    let mount = c
        .volume_mounts
        .iter()
        .flatten()
        .find(|m| path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))?;
    let volume = spec.volumes.iter().flatten().find(|v| v.name == mount.name)?;
    if let Some(s) = &volume.secret {
        return s.secret_name.clone();
    }
    volume
        .projected
        .as_ref()?
        .sources
        .iter()
        .flatten()
        .find_map(|s| s.secret.as_ref().map(|s| s.name.clone()))
}

fn on_secret_volume(spec: &PodSpec, c: &Container, path: &str) -> bool {
    c.volume_mounts
        .iter()
        .flatten()
        .filter(|m| path.starts_with(&format!("{}/", m.mount_path.trim_end_matches('/'))))
        .any(|m| {
            spec.volumes.iter().flatten().any(|v| {
                v.name == m.name
                    && (v.secret.is_some()
                        || v.projected.as_ref().is_some_and(|p| {
                            p.sources.iter().flatten().any(|s| s.secret.is_some())
                        }))
            })
        })
}

fn check_image(profile: Profile, view: &PodView<'_>, c: &Container, out: &mut Vec<Violation>) {
    let image = c.image.clone().unwrap_or_default();
    let r = ImageRef::parse(&image);
    if r.floats() {
        out.push(Violation::FloatingImage {
            pod: view.id.clone(),
            container: c.name.clone(),
            image,
        });
    } else if profile == Profile::Prod && !r.pinned() {
        out.push(Violation::UnpinnedImage {
            pod: view.id.clone(),
            container: c.name.clone(),
            image,
        });
    }
}

/// Whether text holds a URL with a password in it (`scheme://user:password@host`), other
/// than a `$(VAR)` reference to the environment.
pub(crate) fn url_with_password(text: &str) -> bool {
    text.match_indices("://").any(|(i, _)| {
        let authority = text[i + 3..].split('/').next().unwrap_or("");
        authority
            .rsplit_once('@')
            .and_then(|(userinfo, _)| userinfo.split_once(':'))
            .is_some_and(|(_, pw)| !pw.is_empty() && !pw.starts_with("$("))
    })
}

fn check_literal_secrets(view: &PodView<'_>, c: &Container, out: &mut Vec<Violation>) {
    let object = || view.id.owner.clone();
    for var in c.env.iter().flatten() {
        let Some(value) = var.value.as_deref().filter(|v| !v.is_empty()) else { continue };
        let upper = var.name.to_ascii_uppercase();
        // `*_FILE` holding an absolute path names where a secret is mounted, not the secret.
        let names_a_file = upper.ends_with("_FILE") && value.starts_with('/');
        if (SECRET_NAMES.iter().any(|s| upper.contains(s)) && !names_a_file)
            || url_with_password(value)
            || value.contains("PRIVATE KEY-----")
        {
            out.push(Violation::LiteralSecret {
                object: object(),
                location: format!("container {} env {}", c.name, var.name),
            });
        }
    }
    let words = c.command.iter().flatten().chain(c.args.iter().flatten());
    for word in words {
        let flag = word.split('=').next().unwrap_or(word);
        if url_with_password(word)
            || matches!(
                flag,
                "--api-keys" | "--requirepass" | "--masterauth" | "--password" | "--token"
            )
        {
            out.push(Violation::LiteralSecret {
                object: object(),
                location: format!("container {} args", c.name),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_with_passwords() {
        assert!(url_with_password("redis://:hunter2@dsvl-redis:6379"));
        assert!(!url_with_password("redis://:$(REDIS_PASSWORD)@dsvl-redis:6379"));
        assert!(
            !url_with_password("redis://dsvl-redis:6379")
                && !url_with_password("http://user@host/")
        );
    }
}
