//! Fuzzes untrusted bytes through decode + preprocess: any input must give `Ok` or a typed
//! `ImageError`, never a panic, an abort or an allocation past the limits.
#![no_main]

use dsvl_core::ImageLimits;
use dsvl_models::preprocess::{PreprocessConfig, Preprocessor};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Limits tighter than production so each execution stays fast; the code path is the same.
    let limits = ImageLimits { max_input_bytes: 4 << 20, max_width: 4096, max_height: 4096, max_alloc: 128 << 20 };
    let config = PreprocessConfig::from_json(r#"{"image_size": 384, "do_normalize": false}"#).expect("static config");
    let pre = Preprocessor::new(config, limits);
    if let Ok(out) = pre.preprocess_bytes(data) {
        assert_eq!(out.pixel_values.len(), 3 * 384 * 384);
    }
});
