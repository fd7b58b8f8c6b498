//! Compiles the gRPC contracts with the vendored `protoc` (an explicit `PROTOC` wins): the public
//! API (`proto/dsvl/v1`) and the tiers' internal contracts (`proto/dsvl/internal/v1`) as two
//! separate packages, each with its own file descriptor set, so a server's reflection lists only
//! the package it serves. `bytes` fields are `bytes::Bytes`: images and embeddings are passed
//! along without copies.

use std::path::{Path, PathBuf};

fn compile(
    root: &Path,
    dir: &str,
    files: &[&str],
    descriptor: &str,
) -> Result<(), Box<dyn std::error::Error>> {
    let files: Vec<PathBuf> =
        files.iter().map(|f| root.join(dir).join(format!("{f}.proto"))).collect();
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .bytes(".")
        .file_descriptor_set_path(out.join(descriptor))
        .compile_protos(&files, &[root.to_path_buf()])?;
    // The directory too, so a newly added .proto file triggers a rebuild.
    println!("cargo:rerun-if-changed={}", root.join(dir).display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    compile(&root, "dsvl/v1", &["chat"], "dsvl_public_descriptor.bin")?;
    compile(
        &root,
        "dsvl/internal/v1",
        &["common", "vision", "decoder"],
        "dsvl_internal_descriptor.bin",
    )?;
    Ok(())
}
