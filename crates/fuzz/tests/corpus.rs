//! Replays every committed input of every target: the corpus (`corpus/<target>/`, the seeds
//! and what campaigns kept) and the inputs that once crashed a target (`regressions/<target>/`,
//! each named after what it found). Runs in every test run, without instrumentation.
//!
//! `DSVL_WRITE_SEEDS=1` (re)writes the hand-made seeds into the corpus first.

use std::path::{Path, PathBuf};

mod seeds;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).to_path_buf()
}

fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    v.sort();
    v
}

#[test]
fn every_committed_input_runs_clean() {
    if std::env::var_os("DSVL_WRITE_SEEDS").is_some() {
        seeds::write(&root().join("corpus")).unwrap();
    }
    let mut total = 0;
    for t in dsvl_fuzz::TARGETS {
        let corpus = files(&root().join("corpus").join(t.name));
        assert!(corpus.len() >= 3, "{}: a corpus of at least 3 seeds is committed", t.name);
        for f in corpus.iter().chain(&files(&root().join("regressions").join(t.name))) {
            let data = std::fs::read(f).unwrap();
            eprintln!("{}: {}", t.name, f.display());
            (t.run)(&data);
            total += 1;
        }
    }
    eprintln!("{total} inputs");
}

#[test]
fn the_corpus_folders_are_the_targets() {
    for dir in ["corpus", "regressions"] {
        let Ok(entries) = std::fs::read_dir(root().join(dir)) else { continue };
        for entry in entries {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(dsvl_fuzz::target(&name).is_some(), "{dir}/{name} is not a target");
        }
    }
}

/// The first seeds are valid requests: the targets reach past validation (a target that refused
/// everything would fuzz nothing).
#[test]
fn the_valid_seeds_are_accepted() {
    use clap::Parser;
    use prost::Message as _;
    let args = dsvl_gateway::Args::try_parse_from([
        "t",
        "--decoder",
        "unused:1",
        "--allow-unauthenticated",
        "--insecure",
    ])
    .unwrap();
    let config = dsvl_gateway::config::GatewayConfig::try_from(&args).unwrap();
    let model = dsvl_gateway::served::ServedModel::load(None, config.model_name.clone()).unwrap();
    let seed =
        |t: &str, n: usize| std::fs::read(root().join(format!("corpus/{t}/seed-{n}"))).unwrap();
    use dsvl_gateway::untrusted;
    // The first three of each, and those with vLLM's extensions and strict tools.
    for (chat, completion, grpc) in
        [(0, 0, 0), (1, 1, 1), (2, 2, 2), (6, 3, 3), (7, 3, 3), (8, 4, 3)]
    {
        untrusted::openai_chat(&config, &model, &seed("openai_chat", chat)).unwrap();
        untrusted::openai_completion(&config, &model, &seed("openai_completion", completion))
            .unwrap();
        let req = dsvl_proto::v1::ChatRequest::decode(&seed("grpc_chat", grpc)[..]).unwrap();
        untrusted::grpc_chat(&config, &model, req).unwrap();
    }
    assert!(untrusted::image_url(&config, std::str::from_utf8(&seed("image_url", 0)).unwrap())
        .unwrap()
        .is_some());
    let d = untrusted::openai_deadline(false, b"30").unwrap().unwrap();
    assert_eq!(d, std::time::Duration::from_secs(30));
}
