//! Everything the manifest checks can find wrong, one variant per rule.
//!
//! Variants carry the object, container and values involved, so a test can assert the exact
//! violation a planted mistake causes, and CI prints a message that says what to fix.

use crate::objects::ObjectRef;
use crate::pods::PodRef;

/// Which probe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Probe {
    /// `startupProbe`.
    Startup,
    /// `readinessProbe`.
    Readiness,
    /// `livenessProbe`.
    Liveness,
}

/// A broken rule in a rendered overlay.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, thiserror::Error)]
pub enum Violation {
    /// A LeaderWorkerSet does not conform to `deploy/schemas/leaderworkerset.v1.schema.json`.
    #[error("{object}: not a valid LeaderWorkerSet: {}", errors.join("; "))]
    LwsSchema {
        /// The object.
        object: ObjectRef,
        /// `instance path: message` per schema error.
        errors: Vec<String>,
    },
    /// An object does not deserialise into its Kubernetes type (wrong type, missing field).
    #[error("{object}: {error}")]
    InvalidObject {
        /// The object.
        object: ObjectRef,
        /// The deserialiser's message.
        error: String,
    },
    /// A kind this project does not deploy.
    #[error("{object}: unexpected kind (apiVersion {api_version:?})")]
    UnknownKind {
        /// `apiVersion`.
        api_version: String,
        /// The object.
        object: ObjectRef,
    },
    /// A service container lacks a probe.
    #[error("{pod}: container {container} has no {probe:?} probe")]
    MissingProbe {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The probe.
        probe: Probe,
    },
    /// A probe asks grpc.health.v1 about the wrong service name: `startup` for the startup
    /// probe, `liveness` for liveness (never `""`, which turns NOT_SERVING during a drain and
    /// would get a draining pod killed), `""` or the API service for readiness.
    #[error("{pod}: container {container}'s {probe:?} probe asks for health service {found:?}, expected {expected}")]
    ProbeWrongService {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The probe.
        probe: Probe,
        /// What the probe asks for.
        found: String,
        /// What it should ask for.
        expected: String,
    },
    /// A probe that must call grpc.health.v1 on the service's gRPC port does not.
    #[error("{pod}: container {container}'s {probe:?} probe must be `grpc:` on port {listen}")]
    ProbeNotGrpc {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The probe.
        probe: Probe,
        /// The port the service listens on.
        listen: u16,
    },
    /// A serving container has no preStop hook.
    #[error("{pod}: container {container} has no preStop hook")]
    MissingPreStop {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// `terminationGracePeriodSeconds` does not cover the preStop hook plus the drain.
    #[error(
        "{pod}: terminationGracePeriodSeconds {grace} < {needed} (preStop + drain + 5 s to exit)"
    )]
    GraceTooShort {
        /// The pod template.
        pod: PodRef,
        /// The grace period.
        grace: i64,
        /// What it must be at least.
        needed: i64,
    },
    /// A LeaderWorkerSet whose group is not recreated as a unit.
    #[error("{object}: restartPolicy {found:?}, must be RecreateGroupOnPodRestart")]
    LwsRestartPolicy {
        /// The object.
        object: ObjectRef,
        /// The policy found.
        found: Option<String>,
    },
    /// `startupPolicy: LeaderReady` on a multi-pod group: the leader only turns ready once its
    /// workers have joined, and they would never start.
    #[error(
        "{object}: startupPolicy LeaderReady deadlocks a group of {size} pods; use LeaderCreated"
    )]
    LwsStartupPolicy {
        /// The object.
        object: ObjectRef,
        /// Pods per group.
        size: i32,
    },
    /// Leader and worker disagree on a flag every rank must share.
    #[error("{object}: the ranks disagree on --{flag}")]
    GroupArgsMismatch {
        /// The object.
        object: ObjectRef,
        /// The flag.
        flag: &'static str,
    },
    /// An image without a tag or tagged `latest`.
    #[error("{pod}: container {container} image {image} floats (no tag, or :latest)")]
    FloatingImage {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The image.
        image: String,
    },
    /// A prod image that is neither a digest nor an exact `X.Y.Z` version tag.
    #[error("{pod}: container {container} image {image} is not pinned (digest or X.Y.Z tag)")]
    UnpinnedImage {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The image.
        image: String,
    },
    /// A secret value written into the manifests.
    #[error("{object}: literal secret in {location}")]
    LiteralSecret {
        /// The object.
        object: ObjectRef,
        /// Where (`data`, `container X env Y`, ...).
        location: String,
    },
    /// A secret file a service reads is not on a Secret volume.
    #[error("{pod}: container {container} reads {path} from outside any Secret volume")]
    SecretFileNotMounted {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The file.
        path: String,
    },
    /// An HPA scales an object that is not in the overlay.
    #[error("{hpa}: scaleTargetRef {target} does not exist")]
    DanglingScaleTarget {
        /// The HPA.
        hpa: ObjectRef,
        /// `group/Kind/name` of the target.
        target: String,
    },
    /// An HPA asks for a custom metric no prometheus-adapter rule provides.
    #[error("{hpa}: metric {metric} has no prometheus-adapter rule")]
    UnknownMetric {
        /// The HPA.
        hpa: ObjectRef,
        /// The metric.
        metric: String,
    },
    /// A container that opens a GPU requests none.
    #[error("{pod}: container {container} runs on {device} but requests no nvidia.com/gpu")]
    GpuMissing {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// Its device.
        device: String,
    },
    /// A container's GPU limit differs from the GPUs its ranks open.
    #[error(
        "{pod}: container {container} limits nvidia.com/gpu to {found}, its ranks use {expected}"
    )]
    GpuCountMismatch {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// GPUs the process opens.
        expected: u32,
        /// The limit.
        found: u32,
    },
    /// A decoder container without a memory-backed `/dev/shm` (NCCL needs it).
    #[error("{pod}: container {container} has no emptyDir (medium: Memory) at /dev/shm")]
    ShmMissing {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// The binary refuses the container's arguments.
    #[error("{pod}: container {container}: {error}")]
    BadFlags {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The parser's message.
        error: String,
    },
    /// A `DSVL_*` variable the binary does not read (a typo goes unnoticed otherwise).
    #[error("{pod}: container {container} sets {name}, which the binary does not read")]
    UnknownEnv {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The variable.
        name: String,
    },
    /// A container that may run as root.
    #[error("{pod}: container {container} may run as root (runAsNonRoot unset or runAsUser 0)")]
    RunsAsRoot {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// A container without one of the hardening settings every dsvl container has.
    #[error("{pod}: container {container} is not hardened: {missing}")]
    NotHardened {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The setting that is missing.
        missing: &'static str,
    },
    /// A tier logs in to Redis with another tier's credentials (or a shared one): each has its
    /// own least-privilege ACL user, under its own key of the `dsvl-redis` Secret.
    #[error("{pod}: container {container} takes DSVL_REDIS_URL from {key:?}, expected key {expected:?} of Secret dsvl-redis")]
    SharedRedisUser {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// Where it takes the URL from: `secret/key`.
        key: String,
        /// Its own key.
        expected: &'static str,
    },
    /// A Service that selects no pod of the overlay.
    #[error("{service}: selector matches no pod")]
    ServiceSelectsNothing {
        /// The Service.
        service: ObjectRef,
    },
    /// A gateway upstream that names no Service port of the overlay.
    #[error("{pod}: --{flag} {endpoint} is not a Service port of this overlay")]
    DanglingUpstream {
        /// The pod template.
        pod: PodRef,
        /// The flag.
        flag: &'static str,
        /// `host:port`.
        endpoint: String,
    },
    /// The NetworkPolicies block a path the services need.
    #[error("{from} cannot reach {to} on port {port}: no NetworkPolicy allows it")]
    FlowBlocked {
        /// The client pod.
        from: PodRef,
        /// The server pod.
        to: PodRef,
        /// The port.
        port: u16,
    },
    /// A multi-pod group's rendezvous port is open to pods outside the group.
    #[error("{policy} opens port {port} of {pod} to pods outside its group")]
    RendezvousExposed {
        /// The NetworkPolicy.
        policy: ObjectRef,
        /// The decoder pod template.
        pod: PodRef,
        /// The rendezvous port.
        port: u16,
    },
    /// No NetworkPolicy lets the pods of one group reach each other (rendezvous and NCCL).
    #[error("{lws}: no NetworkPolicy opens group {group}'s pods to each other")]
    GroupPolicyMissing {
        /// The LeaderWorkerSet.
        lws: ObjectRef,
        /// The group index.
        group: usize,
    },
    /// An internal or public link of a service runs in plain text.
    #[error("{pod}: container {container}'s {link} would be plain text: give it its TLS files (deploy/README.md, \"Certificates\")")]
    PlainTextLink {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// Which link.
        link: &'static str,
    },
    /// A service serves TLS on its gRPC port but has no plain-text health port for kubelet's
    /// gRPC probes (which speak no TLS).
    #[error("{pod}: container {container} serves TLS on its gRPC port: give it --health-listen and probe that port")]
    NoHealthPort {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// A TLS file comes from a Secret no cert-manager Certificate of the overlay issues (so
    /// nothing creates or renews it).
    #[error("{pod}: container {container} reads its {link} certificate from Secret {secret:?}, which no Certificate issues")]
    UnissuedCertificate {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// Which link.
        link: &'static str,
        /// The Secret.
        secret: String,
    },
    /// A Certificate lacks the key usage its use needs (`server auth` to serve, `client auth`
    /// to present to a peer that verifies clients).
    #[error("{certificate}: used for {link}, needs usage {needed:?}")]
    CertificateUsage {
        /// The Certificate.
        certificate: ObjectRef,
        /// Which link.
        link: &'static str,
        /// The missing usage.
        needed: &'static str,
    },
    /// A Certificate's issuer is not in the overlay.
    #[error("{certificate}: issuer {issuer:?} is not an Issuer of this overlay")]
    DanglingIssuer {
        /// The Certificate.
        certificate: ObjectRef,
        /// The issuer it names.
        issuer: String,
    },
    /// Redis's configuration leaves a plain-text port open or client certificates off.
    #[error("{pod}: container {container}'s Redis configuration lacks `{missing}` (TLS only, with client certificates)")]
    RedisNotTls {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
        /// The setting that is missing or wrong.
        missing: &'static str,
    },
    /// An internal tier accepts any client certificate of the authority (no
    /// `--tls-client-names`), so every other tier's certificate could call it.
    #[error("{pod}: container {container} accepts any client of the authority: give it --tls-client-names (DSVL_TLS_CLIENT_NAMES=dsvl-gateway)")]
    AnyClientAccepted {
        /// The pod template.
        pod: PodRef,
        /// The container.
        container: String,
    },
    /// The certificate the gateway presents to an upstream carries none of the names that
    /// upstream accepts from clients, so it would refuse the gateway.
    #[error("{pod}: accepts clients named {names:?}, but the gateway presents {certificate}")]
    ClientNameMismatch {
        /// The upstream pod template.
        pod: PodRef,
        /// The gateway's client Certificate.
        certificate: ObjectRef,
        /// The names the upstream accepts.
        names: Vec<String>,
    },
    /// The certificate an upstream's pods serve does not carry the name the gateway dials, so
    /// the gateway's verification would refuse it.
    #[error("{pod}: upstream {host} serves {certificate}, whose dnsNames lack {host:?}")]
    CertificateNameMismatch {
        /// The gateway pod template.
        pod: PodRef,
        /// The upstream host.
        host: String,
        /// The Certificate the upstream serves.
        certificate: ObjectRef,
    },
}
