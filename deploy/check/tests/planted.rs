//! Each rule, shown failing: a mistake is planted in a rendered overlay, and the checks must
//! report exactly that mistake (and nothing else: no rule may cascade into others).

use dsvl_deploy_check::pods::Role;
use dsvl_deploy_check::Probe;
use dsvl_deploy_check::{ObjectRef, Violation};
use serde_json::{json, Value};

use crate::support::{args, at, decoder_leader, planted, pod, replace_arg, LEADER, POD, WORKER};

fn gateway() -> dsvl_deploy_check::pods::PodRef {
    pod("Deployment", "dsvl-gateway", Role::Deployment)
}

fn vision() -> dsvl_deploy_check::pods::PodRef {
    pod("Deployment", "dsvl-vision", Role::Deployment)
}

fn two_node(role: Role) -> dsvl_deploy_check::pods::PodRef {
    pod("LeaderWorkerSet", "dsvl-decoder-2node", role)
}

fn remove(v: &mut Value, key: &str) {
    v.as_object_mut().expect("a map").remove(key).unwrap_or_else(|| panic!("no {key} to remove"));
}

#[test]
fn a_removed_probe() {
    let v = planted("dev", |d| {
        remove(
            at(d, "LeaderWorkerSet", "dsvl-decoder", &format!("{LEADER}/containers/0")),
            "readinessProbe",
        )
    });
    assert_eq!(
        v,
        [Violation::MissingProbe {
            pod: decoder_leader(),
            container: "decoder".into(),
            probe: Probe::Readiness
        }]
    );
}

#[test]
fn a_probe_that_is_not_grpc_health() {
    let v = planted("dev", |d| {
        *at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/startupProbe")) =
            json!({"tcpSocket": {"port": 8081}});
    });
    assert_eq!(
        v,
        [Violation::ProbeNotGrpc {
            pod: vision(),
            container: "vision".into(),
            probe: Probe::Startup,
            listen: 8081
        }]
    );
    // A gRPC probe on the wrong port is as bad; the mutual-TLS gRPC port is a wrong port
    // (kubelet's probes speak plain text: they go to the health port).
    let v = planted("dev", |d| {
        *at(
            d,
            "Deployment",
            "dsvl-vision",
            &format!("{POD}/containers/0/livenessProbe/grpc/port"),
        ) = json!(50061)
    });
    assert_eq!(
        v,
        [Violation::ProbeNotGrpc {
            pod: vision(),
            container: "vision".into(),
            probe: Probe::Liveness,
            listen: 8081
        }]
    );
}

#[test]
fn a_probe_asking_for_the_wrong_health_service() {
    // Liveness on "" would fail during a drain and get the draining pod killed.
    let v = planted("dev", |d| {
        *at(
            d,
            "LeaderWorkerSet",
            "dsvl-decoder",
            &format!("{LEADER}/containers/0/livenessProbe/grpc/service"),
        ) = json!("")
    });
    assert_eq!(
        v,
        [Violation::ProbeWrongService {
            pod: decoder_leader(),
            container: "decoder".into(),
            probe: Probe::Liveness,
            found: "".into(),
            expected: "\"liveness\"".into()
        }]
    );
    let v = planted("dev", |d| {
        *at(
            d,
            "Deployment",
            "dsvl-gateway",
            &format!("{POD}/containers/0/startupProbe/grpc/service"),
        ) = json!("dsvl.v1.Chat")
    });
    assert_eq!(
        v,
        [Violation::ProbeWrongService {
            pod: gateway(),
            container: "gateway".into(),
            probe: Probe::Startup,
            found: "dsvl.v1.Chat".into(),
            expected: "\"startup\"".into()
        }]
    );
}

#[test]
fn a_missing_pre_stop_hook() {
    let v = planted("dev", |d| {
        remove(at(d, "Deployment", "dsvl-gateway", &format!("{POD}/containers/0")), "lifecycle")
    });
    assert_eq!(v, [Violation::MissingPreStop { pod: gateway(), container: "gateway".into() }]);
}

#[test]
fn a_grace_period_shorter_than_the_drain() {
    // Shorter grace: leader preStop 10 s + --drain-secs=120 + 5 s margin = 135.
    let v = planted("dev", |d| {
        *at(
            d,
            "LeaderWorkerSet",
            "dsvl-decoder",
            &format!("{LEADER}/terminationGracePeriodSeconds"),
        ) = json!(60)
    });
    assert_eq!(v, [Violation::GraceTooShort { pod: decoder_leader(), grace: 60, needed: 135 }]);
    // Longer drain, read from the flag as the binary reads it: 5 + 300 + 5 > 50.
    let v = planted("dev", |d| {
        replace_arg(args(d, "Deployment", "dsvl-vision", POD), "--drain-secs", "--drain-secs=300")
    });
    assert_eq!(v, [Violation::GraceTooShort { pod: vision(), grace: 50, needed: 310 }]);
}

#[test]
fn lws_restart_and_startup_policies() {
    let v = planted("dev", |d| {
        *at(d, "LeaderWorkerSet", "dsvl-decoder", "/spec/leaderWorkerTemplate/restartPolicy") =
            json!("None")
    });
    assert_eq!(
        v,
        [Violation::LwsRestartPolicy {
            object: ObjectRef::new("LeaderWorkerSet", "dsvl-decoder"),
            found: Some("None".into())
        }]
    );
    let v = planted("prod-67b", |d| {
        *at(d, "LeaderWorkerSet", "dsvl-decoder-2node", "/spec/startupPolicy") =
            json!("LeaderReady")
    });
    assert_eq!(
        v,
        [Violation::LwsStartupPolicy {
            object: ObjectRef::new("LeaderWorkerSet", "dsvl-decoder-2node"),
            size: 2
        }]
    );
}

#[test]
fn a_broken_lws_schema() {
    let v = planted("prod-67b", |d| {
        let t = at(d, "LeaderWorkerSet", "dsvl-decoder-2node", "/spec/leaderWorkerTemplate");
        t["sise"] = json!(2); // a misspelled field: typed parsing would ignore it
    });
    let [Violation::LwsSchema { object, errors }] = v.as_slice() else {
        panic!("expected one schema violation, got {v:?}")
    };
    assert_eq!(object, &ObjectRef::new("LeaderWorkerSet", "dsvl-decoder-2node"));
    assert!(errors.iter().any(|e| e.contains("sise")), "{errors:?}");
}

#[test]
fn ranks_of_a_group_that_disagree() {
    let v = planted("prod-67b", |d| {
        replace_arg(
            args(d, "LeaderWorkerSet", "dsvl-decoder-2node", WORKER),
            "--dtype",
            "--dtype=f32",
        )
    });
    assert_eq!(
        v,
        [Violation::GroupArgsMismatch {
            object: ObjectRef::new("LeaderWorkerSet", "dsvl-decoder-2node"),
            flag: "dtype"
        }]
    );
}

#[test]
fn latest_and_unpinned_images() {
    let v = planted("prod-7b", |d| {
        *at(d, "Deployment", "dsvl-gateway", &format!("{POD}/containers/0/image")) =
            json!("dsvl/gateway:latest")
    });
    assert_eq!(
        v,
        [Violation::FloatingImage {
            pod: gateway(),
            container: "gateway".into(),
            image: "dsvl/gateway:latest".into()
        }]
    );
    let floating_tag = |d: &mut Vec<Value>| {
        *at(d, "StatefulSet", "dsvl-redis", &format!("{POD}/containers/0/image")) =
            json!("redis:7.4-bookworm")
    };
    let redis = pod("StatefulSet", "dsvl-redis", Role::StatefulSet);
    assert_eq!(
        planted("prod-7b", floating_tag),
        [Violation::UnpinnedImage {
            pod: redis,
            container: "redis".into(),
            image: "redis:7.4-bookworm".into()
        }]
    );
    assert_eq!(planted("dev", floating_tag), [], "dev accepts minor-version tags");
}

#[test]
fn literal_secrets() {
    let secret = |d: &mut Vec<Value>| {
        d.push(json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "dsvl-redis", "namespace": "dsvl"}, "stringData": {"url": "redis://:hunter2@dsvl-redis:6379"}}))
    };
    assert_eq!(
        planted("dev", secret),
        [Violation::LiteralSecret {
            object: ObjectRef::new("Secret", "dsvl-redis"),
            location: "stringData".into()
        }]
    );

    let in_env = |d: &mut Vec<Value>| {
        *at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/env/0")) =
            json!({"name": "DSVL_REDIS_URL", "value": "rediss://:hunter2@dsvl-redis:6379"});
    };
    let location = "container vision env DSVL_REDIS_URL".to_string();
    assert_eq!(
        planted("dev", in_env),
        [Violation::LiteralSecret {
            object: ObjectRef::new("Deployment", "dsvl-vision"),
            location
        }]
    );

    let token = |d: &mut Vec<Value>| {
        let env = at(d, "LeaderWorkerSet", "dsvl-decoder", &format!("{LEADER}/containers/0/env"))
            .as_array_mut()
            .expect("list");
        env.push(json!({"name": "HF_TOKEN", "value": "hf_0123456789"}));
    };
    let location = "container decoder env HF_TOKEN".to_string();
    assert_eq!(
        planted("dev", token),
        [Violation::LiteralSecret {
            object: ObjectRef::new("LeaderWorkerSet", "dsvl-decoder"),
            location
        }]
    );

    let in_args = |d: &mut Vec<Value>| {
        args(d, "Deployment", "dsvl-gateway", POD).push(json!("--api-keys=sk-live-1234=acme"))
    };
    let location = "container gateway args".to_string();
    assert_eq!(
        planted("dev", in_args),
        [Violation::LiteralSecret {
            object: ObjectRef::new("Deployment", "dsvl-gateway"),
            location
        }]
    );

    let in_config = |d: &mut Vec<Value>| {
        let conf = at(d, "ConfigMap", "dsvl-redis-config", "/data/redis.conf");
        *conf = json!(format!("{}requirepass hunter2\n", conf.as_str().expect("text")));
    };
    let location = "data key redis.conf".to_string();
    assert_eq!(
        planted("dev", in_config),
        [Violation::LiteralSecret {
            object: ObjectRef::new("ConfigMap", "dsvl-redis-config"),
            location
        }]
    );
}

#[test]
fn a_secret_file_outside_a_secret_volume() {
    let v = planted("dev", |d| {
        replace_arg(
            args(d, "Deployment", "dsvl-gateway", POD),
            "--api-keys-file",
            "--api-keys-file=/etc/dsvl/keys",
        )
    });
    assert_eq!(
        v,
        [Violation::SecretFileNotMounted {
            pod: gateway(),
            container: "gateway".into(),
            path: "/etc/dsvl/keys".into()
        }]
    );
}

#[test]
fn a_dangling_hpa_target() {
    let v = planted("dev", |d| {
        *at(d, "HorizontalPodAutoscaler", "dsvl-vision", "/spec/scaleTargetRef/name") =
            json!("dsvl-visoin")
    });
    let hpa = ObjectRef::new("HorizontalPodAutoscaler", "dsvl-vision");
    assert_eq!(
        v,
        [Violation::DanglingScaleTarget { hpa, target: "apps/Deployment/dsvl-visoin".into() }]
    );
    // The right name in the wrong API group is no target either.
    let v = planted("dev", |d| {
        *at(d, "HorizontalPodAutoscaler", "dsvl-decoder", "/spec/scaleTargetRef/apiVersion") =
            json!("apps/v1")
    });
    let hpa = ObjectRef::new("HorizontalPodAutoscaler", "dsvl-decoder");
    assert_eq!(
        v,
        [Violation::DanglingScaleTarget {
            hpa,
            target: "apps/LeaderWorkerSet/dsvl-decoder".into()
        }]
    );
}

#[test]
fn an_hpa_metric_without_an_adapter_rule() {
    let v = planted("dev", |d| {
        *at(d, "HorizontalPodAutoscaler", "dsvl-decoder", "/spec/metrics/0/pods/metric/name") =
            json!("vllm:num_requests_waiting")
    });
    let hpa = ObjectRef::new("HorizontalPodAutoscaler", "dsvl-decoder");
    assert_eq!(v, [Violation::UnknownMetric { hpa, metric: "vllm:num_requests_waiting".into() }]);
}

#[test]
fn gpu_requests_on_gpu_pods() {
    let v = planted("prod-7b", |d| {
        let r = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/resources"));
        remove(&mut r["limits"], "nvidia.com/gpu");
        remove(&mut r["requests"], "nvidia.com/gpu");
    });
    assert_eq!(
        v,
        [Violation::GpuMissing {
            pod: vision(),
            container: "vision".into(),
            device: "cuda:0".into()
        }]
    );
    // TP 2 in one pod opens cuda:0 and cuda:1.
    let v = planted("prod-7b-tp2", |d| {
        *at(
            d,
            "LeaderWorkerSet",
            "dsvl-decoder",
            &format!("{LEADER}/containers/0/resources/limits/nvidia.com~1gpu"),
        ) = json!("1")
    });
    assert_eq!(
        v,
        [Violation::GpuCountMismatch {
            pod: decoder_leader(),
            container: "decoder".into(),
            expected: 2,
            found: 1
        }]
    );
}

#[test]
fn no_memory_backed_dev_shm_on_a_decoder() {
    let v = planted("dev", |d| {
        let mounts = at(
            d,
            "LeaderWorkerSet",
            "dsvl-decoder",
            &format!("{LEADER}/containers/0/volumeMounts"),
        )
        .as_array_mut()
        .expect("list");
        mounts.retain(|m| m["mountPath"] != "/dev/shm");
    });
    assert_eq!(v, [Violation::ShmMissing { pod: decoder_leader(), container: "decoder".into() }]);
}

#[test]
fn flags_and_variables_the_binary_refuses() {
    let v = planted("dev", |d| {
        replace_arg(
            args(d, "LeaderWorkerSet", "dsvl-decoder", LEADER),
            "--tp",
            "--tensor-parallel=1",
        )
    });
    let [Violation::BadFlags { pod: p, container, error }] = v.as_slice() else {
        panic!("expected one BadFlags, got {v:?}")
    };
    assert_eq!((p, container.as_str()), (&decoder_leader(), "decoder"));
    assert!(error.contains("--tensor-parallel"), "{error}");
    let v = planted("dev", |d| {
        let env = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/env"))
            .as_array_mut()
            .expect("list");
        env.push(json!({"name": "DSVL_MAX_BATCH_SIZE", "value": "16"}));
    });
    assert_eq!(
        v,
        [Violation::UnknownEnv {
            pod: vision(),
            container: "vision".into(),
            name: "DSVL_MAX_BATCH_SIZE".into()
        }]
    );
}

#[test]
fn a_container_that_may_run_as_root() {
    let v = planted("dev", |d| {
        *at(d, "Deployment", "dsvl-gateway", &format!("{POD}/securityContext/runAsUser")) = json!(0)
    });
    assert_eq!(v, [Violation::RunsAsRoot { pod: gateway(), container: "gateway".into() }]);
}

#[test]
fn objects_that_do_not_parse() {
    let v =
        planted("dev", |d| *at(d, "Deployment", "dsvl-gateway", "/spec/replicas") = json!("two"));
    let [Violation::InvalidObject { object, .. }] = v.as_slice() else {
        panic!("expected one InvalidObject, got {v:?}")
    };
    assert_eq!(object, &ObjectRef::new("Deployment", "dsvl-gateway"));
    let v = planted("dev", |d| {
        d.push(json!({"apiVersion": "keda.sh/v1alpha1", "kind": "ScaledObject", "metadata": {"name": "x"}}))
    });
    assert_eq!(
        v,
        [Violation::UnknownKind {
            api_version: "keda.sh/v1alpha1".into(),
            object: ObjectRef::new("ScaledObject", "x")
        }]
    );
}

#[test]
fn a_service_that_selects_nothing_and_an_upstream_that_is_no_service() {
    let v = planted("dev", |d| {
        *at(
            d,
            "Service",
            "dsvl-decoder-leader",
            "/spec/selector/leaderworkerset.sigs.k8s.io~1name",
        ) = json!("decoder")
    });
    assert_eq!(
        v,
        [Violation::ServiceSelectsNothing {
            service: ObjectRef::new("Service", "dsvl-decoder-leader")
        }]
    );
    let v = planted("dev", |d| {
        replace_arg(
            args(d, "Deployment", "dsvl-gateway", POD),
            "--decoder",
            "--decoder=dsvl-decoder:50071",
        )
    });
    assert_eq!(
        v,
        [Violation::DanglingUpstream {
            pod: gateway(),
            flag: "decoder",
            endpoint: "dsvl-decoder:50071".into()
        }]
    );
}

#[test]
fn network_policies_that_block_a_tier() {
    let v = planted("dev", |d| {
        *at(d, "NetworkPolicy", "dsvl-decoder-ingress", "/spec/ingress/0/ports/0/port") =
            json!(50072)
    });
    assert_eq!(v, [Violation::FlowBlocked { from: gateway(), to: decoder_leader(), port: 50071 }]);
    let v = planted("dev", |d| {
        *at(
            d,
            "NetworkPolicy",
            "dsvl-redis-ingress",
            "/spec/ingress/0/from/0/podSelector/matchExpressions/0/values",
        ) = json!(["gateway", "decoder"]);
    });
    let redis = pod("StatefulSet", "dsvl-redis", Role::StatefulSet);
    assert_eq!(v, [Violation::FlowBlocked { from: vision(), to: redis, port: 6379 }]);
}

#[test]
fn a_rendezvous_port_open_beyond_its_group() {
    let v = planted("prod-67b", |d| {
        let rules = at(d, "NetworkPolicy", "dsvl-decoder-2node-ingress", "/spec/ingress")
            .as_array_mut()
            .expect("list");
        rules.push(json!({"from": [{"podSelector": {"matchLabels": {"app.kubernetes.io/name": "dsvl-gateway"}}}], "ports": [{"protocol": "TCP", "port": 29500}]}));
    });
    let policy = ObjectRef::new("NetworkPolicy", "dsvl-decoder-2node-ingress");
    let exposed = |role| Violation::RendezvousExposed {
        policy: policy.clone(),
        pod: two_node(role),
        port: 29500,
    };
    assert_eq!(v, [exposed(Role::Leader), exposed(Role::Worker)]);
}

#[test]
fn a_group_the_network_policies_leave_apart() {
    let lws = ObjectRef::new("LeaderWorkerSet", "dsvl-decoder-2node");
    let v = planted("prod-67b", |d| {
        d.retain(|o| o["metadata"]["name"] != "dsvl-decoder-2node-group-1")
    });
    assert_eq!(v, [Violation::GroupPolicyMissing { lws: lws.clone(), group: 1 }]);
    // Raising the HPA's bound without a policy for the new group index.
    let v = planted("prod-67b", |d| {
        *at(d, "HorizontalPodAutoscaler", "dsvl-decoder-2node", "/spec/maxReplicas") = json!(3)
    });
    assert_eq!(v, [Violation::GroupPolicyMissing { lws, group: 2 }]);
}

#[test]
fn an_open_gateway_is_refused() {
    // The gateway fails closed; a manifest that opens it (--allow-unauthenticated) is caught.
    let v = planted("dev", |d| {
        args(d, "Deployment", "dsvl-gateway", POD).push(json!("--allow-unauthenticated"))
    });
    assert_eq!(
        v,
        [Violation::BadFlags {
            pod: gateway(),
            container: "gateway".into(),
            error: "--allow-unauthenticated: the gateway must require API keys".into(),
        }]
    );
}

#[test]
fn internal_tiers_need_the_cluster_secret() {
    // `--insecure` is refused outright.
    let v = planted("dev", |d| args(d, "Deployment", "dsvl-vision", POD).push(json!("--insecure")));
    assert_eq!(
        v,
        [Violation::BadFlags {
            pod: vision(),
            container: "vision".into(),
            error: "--insecure: internal links must be protected by the cluster secret".into(),
        }]
    );
    // Without the file, a tier with Redis would refuse to start.
    let v = planted("dev", |d| {
        let env = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/env"))
            .as_array_mut()
            .expect("list");
        env.retain(|e| e["name"] != "DSVL_CLUSTER_SECRET_FILE");
    });
    assert!(
        matches!(&v[..], [Violation::BadFlags { error, .. }] if error.contains("cluster secret")),
        "{v:?}"
    );
    // The file must come from a Secret volume.
    let v = planted("dev", |d| {
        let env = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/env"))
            .as_array_mut()
            .expect("list");
        for e in env.iter_mut().filter(|e| e["name"] == "DSVL_CLUSTER_SECRET_FILE") {
            e["value"] = json!("/tmp/secret");
        }
    });
    assert_eq!(
        v,
        [Violation::SecretFileNotMounted {
            pod: vision(),
            container: "vision".into(),
            path: "/tmp/secret".into()
        }]
    );
}

#[test]
fn every_container_is_hardened() {
    // A writable root filesystem, a service-account token, and the seccomp profile removed.
    let v = planted("dev", |d| {
        let c = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/securityContext"));
        c["readOnlyRootFilesystem"] = json!(false);
        *at(d, "Deployment", "dsvl-vision", &format!("{POD}/automountServiceAccountToken")) =
            json!(true);
        let pod = at(d, "Deployment", "dsvl-vision", &format!("{POD}/securityContext"));
        pod.as_object_mut().expect("object").remove("seccompProfile");
    });
    let mut missing: Vec<&str> = v
        .iter()
        .map(|x| match x {
            Violation::NotHardened { container, missing, .. } if container == "vision" => *missing,
            other => panic!("{other:?}"),
        })
        .collect();
    missing.sort_unstable();
    assert_eq!(
        missing,
        [
            "automountServiceAccountToken: false",
            "readOnlyRootFilesystem: true",
            "seccompProfile: RuntimeDefault"
        ]
    );
    // Capabilities kept on the Redis container.
    let v = planted("dev", |d| {
        let c = at(d, "StatefulSet", "dsvl-redis", &format!("{POD}/containers/0/securityContext"));
        c.as_object_mut().expect("object").remove("capabilities");
    });
    assert!(
        matches!(&v[..], [Violation::NotHardened { missing: "capabilities.drop: [ALL]", .. }]),
        "{v:?}"
    );
}

/// The `secretKeyRef` of the vision container's `DSVL_REDIS_URL`.
fn vision_redis_secret(d: &mut [Value]) -> &mut Value {
    let env = at(d, "Deployment", "dsvl-vision", &format!("{POD}/containers/0/env"));
    let redis = env
        .as_array_mut()
        .expect("env")
        .iter_mut()
        .find(|e| e["name"] == "DSVL_REDIS_URL")
        .expect("DSVL_REDIS_URL");
    &mut redis["valueFrom"]["secretKeyRef"]
}

#[test]
fn a_tier_using_another_tiers_redis_user() {
    let v = planted("dev", |d| vision_redis_secret(d)["key"] = json!("gateway-url"));
    let other_secret =
        planted("dev", |d| vision_redis_secret(d)["name"] = json!("some-other-secret"));
    assert_eq!(
        other_secret,
        [Violation::SharedRedisUser {
            pod: vision(),
            container: "vision".into(),
            key: "some-other-secret/vision-url".into(),
            expected: "vision-url",
        }]
    );
    assert_eq!(
        v,
        [Violation::SharedRedisUser {
            pod: vision(),
            container: "vision".into(),
            key: "dsvl-redis/gateway-url".into(),
            expected: "vision-url",
        }]
    );
}
