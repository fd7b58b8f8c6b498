//! The libFuzzer binary for every target: `DSVL_FUZZ_TARGET=<name> dsvl-fuzz [libFuzzer args]`.
//! Built with coverage instrumentation by `scripts/fuzz`, which also runs it.
#![no_main]

use std::sync::OnceLock;

fn chosen() -> &'static dsvl_fuzz::Target {
    static T: OnceLock<&'static dsvl_fuzz::Target> = OnceLock::new();
    T.get_or_init(|| {
        let name = std::env::var("DSVL_FUZZ_TARGET").unwrap_or_default();
        dsvl_fuzz::target(&name).unwrap_or_else(|| {
            let names: Vec<_> = dsvl_fuzz::TARGETS.iter().map(|t| t.name).collect();
            eprintln!("set DSVL_FUZZ_TARGET to one of: {}", names.join(", "));
            std::process::exit(2)
        })
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| (chosen().run)(data));
