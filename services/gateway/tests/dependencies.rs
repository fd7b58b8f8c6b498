//! The gateway reads model facts through `dsvl_checkpoint` and links no tensor library: its
//! image stays small and its build does not pull in candle.

#[test]
fn links_no_tensor_library() {
    let out = std::process::Command::new(env!("CARGO"))
        .args(["tree", "--offline", "-p", "dsvl-gateway", "-e", "normal", "--prefix", "none"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("dsvl-checkpoint ")), "{tree}");
    let linked: Vec<&str> =
        tree.lines().filter(|l| l.starts_with("candle") || l.starts_with("dsvl-models ")).collect();
    assert!(linked.is_empty(), "the gateway links {linked:?}");
}
