//! Every overlay renders, passes `kubernetes-validate --strict` (LeaderWorkerSet pod templates
//! included), parses into typed objects, and breaks no invariant; and each has the shape its
//! kustomization promises.

use dsvl_deploy_check::objects::ManifestSet;
use dsvl_deploy_check::{adapter, check, tools};
use serde_json::Value;

use crate::support::{context, object, rendered, OVERLAYS};

fn strict(docs: &[Value]) -> Result<(), tools::ToolError> {
    let mut all = docs.to_vec();
    all.extend(tools::lws_pod_templates(docs));
    tools::validate_strict(&all)
}

#[test]
fn every_overlay_validates_strictly() {
    for o in OVERLAYS {
        if let Err(e) = strict(&rendered(o)) {
            panic!("{o}: {e}");
        }
    }
}

#[test]
fn every_overlay_keeps_every_invariant() {
    for o in OVERLAYS {
        let violations = check(&rendered(o), &context(o));
        let report: Vec<String> = violations.iter().map(ToString::to_string).collect();
        assert!(violations.is_empty(), "{o}:\n{}", report.join("\n"));
    }
}

#[test]
fn strict_validation_catches_a_misspelled_field_typed_parsing_ignores() {
    // In a Deployment...
    let mut docs = rendered("dev");
    let c = object(&mut docs, "Deployment", "dsvl-vision")
        .pointer_mut("/spec/template/spec/containers/0")
        .expect("container");
    let probe = c.as_object_mut().expect("map").remove("readinessProbe").expect("probe");
    c["readynessProbe"] = probe;
    let err = strict(&docs).expect_err("a misspelled field must fail");
    assert!(err.to_string().contains("readynessProbe"), "{err}");
    // ...and inside a LeaderWorkerSet's pod template, which the validator has no CRD schema for.
    let mut docs = rendered("dev");
    let spec = object(&mut docs, "LeaderWorkerSet", "dsvl-decoder")
        .pointer_mut("/spec/leaderWorkerTemplate/leaderTemplate/spec")
        .expect("spec");
    spec["terminationGracePeriodSecond"] = Value::from(150);
    assert!(strict(&docs).is_err(), "a misspelled field in an LWS template must fail");
}

fn kinds(o: &str) -> Vec<(String, String)> {
    rendered(o)
        .iter()
        .map(|d| {
            (
                d["kind"].as_str().unwrap_or("").to_string(),
                d["metadata"]["name"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

fn lws_sizes(o: &str) -> Vec<(String, i32)> {
    let schema = context(o).schema;
    let (set, _) = ManifestSet::parse(&rendered(o), &schema);
    set.iter(|t| if let dsvl_deploy_check::objects::Typed::Lws(l) = t { Some(l) } else { None })
        .map(|(_, l)| (l.name().to_string(), l.size()))
        .collect()
}

#[test]
fn overlays_have_the_promised_shape() {
    // dev: CPU only, one image for the three services, one replica of everything.
    let dev = rendered("dev");
    let text = serde_json::to_string(&dev).expect("json");
    assert!(
        !text.contains("nvidia.com/gpu") && !text.contains("cuda:"),
        "dev must not ask for GPUs"
    );
    for d in &dev {
        if let Some(r) = d.pointer("/spec/replicas") {
            assert_eq!(r, 1, "{}", d["metadata"]["name"]);
        }
    }
    // prod-7b: vision and decoder on GPUs; TP 1, and 2 in prod-7b-tp2.
    for (o, tp) in [("prod-7b", "--tp=1"), ("prod-7b-tp2", "--tp=2")] {
        let docs = rendered(o);
        let lws = docs.iter().find(|d| d["kind"] == "LeaderWorkerSet").expect("decoder LWS");
        assert!(lws.to_string().contains(tp), "{o}");
        assert!(
            kinds(o).contains(&("Deployment".into(), "dsvl-vision".into())),
            "{o} serves images"
        );
    }
    // prod-67b: text-only (no vision tier), one TP-8 group per node and a two-pod group.
    assert!(!kinds("prod-67b").iter().any(|(_, n)| n.contains("vision")));
    let mut sizes = lws_sizes("prod-67b");
    sizes.sort();
    assert_eq!(sizes, vec![("dsvl-decoder".to_string(), 1), ("dsvl-decoder-2node".to_string(), 2)]);
}

#[test]
fn adapter_rules_serve_the_metrics_the_hpas_use() {
    let served = adapter::served_metrics(&adapter::default_rules_path()).expect("rules parse");
    for m in [
        "dsvl_vision_queue_depth",
        "dsvl_vision_images_encoded_per_second",
        "dsvl_decoder_waiting",
        "dsvl_decoder_kv_usage_ratio",
        "dsvl_gateway_in_flight_requests",
    ] {
        assert!(served.contains(m), "{m}");
    }
    // The addon renders on its own (it lives in the monitoring namespace).
    let yaml =
        tools::render(&dsvl_deploy_check::deploy_dir().join("k8s/addons/prometheus-adapter"))
            .expect("addon renders");
    let docs = dsvl_deploy_check::objects::split_yaml(&yaml).expect("yaml");
    tools::validate_strict(&docs).expect("addon validates");
    assert_eq!(docs[0]["metadata"]["namespace"], "monitoring");
}
