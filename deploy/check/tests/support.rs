//! Rendering each overlay once per test run, and helpers to plant mistakes in the result.

use std::sync::OnceLock;

use dsvl_deploy_check::lws::LwsSchema;
use dsvl_deploy_check::objects::split_yaml;
use dsvl_deploy_check::pods::{PodRef, Role};
use dsvl_deploy_check::{adapter, check, deploy_dir, tools, CheckContext, Profile, Violation};
use serde_json::Value;

/// Every overlay under deploy/k8s/overlays.
pub const OVERLAYS: [&str; 4] = ["dev", "prod-7b", "prod-7b-tp2", "prod-67b"];

/// Pointer to the pod spec of a Deployment or StatefulSet.
pub const POD: &str = "/spec/template/spec";
/// Pointer to the leader pod spec of a LeaderWorkerSet.
pub const LEADER: &str = "/spec/leaderWorkerTemplate/leaderTemplate/spec";
/// Pointer to the worker pod spec of a LeaderWorkerSet.
pub const WORKER: &str = "/spec/leaderWorkerTemplate/workerTemplate/spec";

/// The rendered documents of `overlay` (rendered once per test process, on first use: under
/// cargo-nextest every test is its own process, so only the overlays a test uses are rendered).
pub fn rendered(overlay: &str) -> Vec<Value> {
    static RENDERED: [OnceLock<Vec<Value>>; OVERLAYS.len()] =
        [const { OnceLock::new() }; OVERLAYS.len()];
    let index = OVERLAYS
        .iter()
        .position(|o| *o == overlay)
        .unwrap_or_else(|| panic!("no overlay {overlay}"));
    RENDERED[index]
        .get_or_init(|| {
            let dir = deploy_dir().join("k8s/overlays").join(overlay);
            let yaml = tools::render(&dir).unwrap_or_else(|e| panic!("rendering {overlay}: {e}"));
            split_yaml(&yaml).unwrap_or_else(|e| panic!("{overlay}: {e}"))
        })
        .clone()
}

/// The check context of `overlay`.
pub fn context(overlay: &str) -> CheckContext {
    CheckContext {
        profile: Profile::of_overlay(overlay),
        schema: LwsSchema::load_default()
            .expect("deploy/schemas/leaderworkerset.v1.schema.json loads"),
        adapter_metrics: adapter::served_metrics(&adapter::default_rules_path())
            .expect("the adapter rules parse"),
    }
}

/// Renders `overlay`, applies `plant` to the documents, and returns what the checks report.
pub fn planted(overlay: &str, plant: impl FnOnce(&mut Vec<Value>)) -> Vec<Violation> {
    let mut docs = rendered(overlay);
    plant(&mut docs);
    check(&docs, &context(overlay))
}

/// The rendered object `kind`/`name`.
pub fn object<'a>(docs: &'a mut [Value], kind: &str, name: &str) -> &'a mut Value {
    docs.iter_mut()
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name} in the rendered overlay"))
}

/// The value at `pointer` inside object `kind`/`name`.
pub fn at<'a>(docs: &'a mut [Value], kind: &str, name: &str, pointer: &str) -> &'a mut Value {
    object(docs, kind, name)
        .pointer_mut(pointer)
        .unwrap_or_else(|| panic!("{kind}/{name} has nothing at {pointer}"))
}

/// The args of the first container at pod spec `pod` of `kind`/`name`, as a mutable list.
pub fn args<'a>(docs: &'a mut [Value], kind: &str, name: &str, pod: &str) -> &'a mut Vec<Value> {
    at(docs, kind, name, &format!("{pod}/containers/0/args"))
        .as_array_mut()
        .expect("args is a list")
}

/// Replaces the arg starting with `prefix` by `new`.
pub fn replace_arg(args: &mut [Value], prefix: &str, new: &str) {
    let slot = args
        .iter_mut()
        .find(|a| a.as_str().is_some_and(|s| s.starts_with(prefix)))
        .unwrap_or_else(|| panic!("no arg {prefix}"));
    *slot = Value::from(new);
}

/// A pod reference.
pub fn pod(kind: &str, name: &str, role: Role) -> PodRef {
    PodRef::new(kind, name, role)
}

/// The decoder leader of the single-node LeaderWorkerSet.
pub fn decoder_leader() -> PodRef {
    pod("LeaderWorkerSet", "dsvl-decoder", Role::Leader)
}
