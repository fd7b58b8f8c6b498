//! The Dockerfiles pass the static lint, and each rule fails on a planted mistake.

use dsvl_deploy_check::deploy_dir;
use dsvl_deploy_check::dockerfile::{check, DockerViolation};

const DOCKERFILES: [&str; 4] =
    ["Dockerfile.gateway", "Dockerfile.vision", "Dockerfile.decoder", "Dockerfile.cpu"];

fn read(name: &str) -> String {
    std::fs::read_to_string(deploy_dir().join("docker").join(name))
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no {needle:?}")) + 1
}

#[test]
fn every_dockerfile_passes() {
    for name in DOCKERFILES {
        assert_eq!(check(&read(name)), [], "{name}");
    }
}

#[test]
fn the_gpu_images_build_with_the_cuda_toolchain_and_run_on_the_cuda_runtime() {
    for name in ["Dockerfile.vision", "Dockerfile.decoder"] {
        let text = read(name);
        assert!(
            text.contains("scripts/build-cuda"),
            "{name} builds with the pinned PyPI CUDA toolchain"
        );
        assert!(
            text.contains("FROM nvidia/cuda:13.0.2-runtime-ubuntu24.04"),
            "{name} runs on CUDA 13.0 with NCCL"
        );
    }
}

#[test]
fn unpinned_bases() {
    let text = read("Dockerfile.gateway");
    let line = line_of(&text, "FROM rust:");
    for bad in ["rust:latest", "rust", "rust:1.95-bookworm", "rust:bookworm"] {
        let planted = text.replace("FROM rust:1.95.0-bookworm", &format!("FROM {bad}"));
        assert_eq!(
            check(&planted),
            [DockerViolation::UnpinnedBase { line, image: bad.into() }],
            "{bad}"
        );
    }
    // Through an ARG default, too.
    let planted =
        text.replace("FROM rust:1.95.0-bookworm", "ARG BUILDER=rust:latest\nFROM ${BUILDER}");
    assert_eq!(
        check(&planted),
        [DockerViolation::UnpinnedBase { line: line + 1, image: "rust:latest".into() }]
    );
    // Debian point releases are pinned; code names are not.
    let planted = text.replace("FROM debian:12.12-slim", "FROM debian:bookworm-slim");
    assert_eq!(
        check(&planted),
        [DockerViolation::UnpinnedBase {
            line: line_of(&text, "FROM debian"),
            image: "debian:bookworm-slim".into()
        }]
    );
}

#[test]
fn a_remote_add() {
    let text = read("Dockerfile.decoder");
    let planted = text
        .replace("WORKDIR /src\n", "WORKDIR /src\nADD https://example.invalid/tool.tar.gz /opt/\n");
    let line = line_of(&planted, "ADD https");
    assert_eq!(
        check(&planted),
        [DockerViolation::RemoteAdd {
            line,
            source_ref: "https://example.invalid/tool.tar.gz".into()
        }]
    );
}

#[test]
fn root_or_named_users() {
    let text = read("Dockerfile.vision");
    let line = line_of(&text, "USER 10001");
    assert_eq!(
        check(&text.replace("USER 10001:10001", "USER root")),
        [DockerViolation::BadUser { line, user: "root".into() }]
    );
    assert_eq!(
        check(&text.replace("USER 10001:10001", "USER 0:0")),
        [DockerViolation::BadUser { line, user: "0:0".into() }]
    );
    assert_eq!(
        check(&text.replace("USER 10001:10001", "USER dsvl")),
        [DockerViolation::BadUser { line, user: "dsvl".into() }]
    );
    assert_eq!(check(&text.replace("USER 10001:10001\n", "")), [DockerViolation::MissingUser]);
    // A USER in the build stage does not cover the runtime stage.
    let planted = text
        .replace("USER 10001:10001\n", "")
        .replace("WORKDIR /src\n", "WORKDIR /src\nUSER 10001\n");
    assert_eq!(check(&planted), [DockerViolation::MissingUser]);
}

#[test]
fn no_init_process() {
    let text = read("Dockerfile.gateway");
    let planted = text.replace(
        r#"ENTRYPOINT ["/usr/bin/tini", "--", "/usr/local/bin/dsvl-gateway"]"#,
        r#"ENTRYPOINT ["/usr/local/bin/dsvl-gateway"]"#,
    );
    assert_eq!(check(&planted), [DockerViolation::MissingInit]);
}
