//! Compiles `proto/dsvl/v1/*.proto` with the vendored `protoc` (an explicit `PROTOC` wins), and
//! emits a file descriptor set for gRPC server reflection.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        unsafe { std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?) };
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files: Vec<_> = ["common", "vision", "decoder", "chat"]
        .iter()
        .map(|f| root.join(format!("dsvl/v1/{f}.proto")))
        .filter(|p| p.exists())
        .collect();
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("dsvl_descriptor.bin"))
        .compile_protos(&files, &[root.clone()])?;
    // The directory too, so a newly added .proto file triggers a rebuild.
    println!("cargo:rerun-if-changed={}", root.join("dsvl/v1").display());
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    Ok(())
}
