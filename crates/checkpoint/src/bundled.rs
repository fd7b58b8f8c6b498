//! The tiny random-weight DeepSeek-VL checkpoint compiled into the binary, so every command has
//! a model to run without downloads. Source: `assets/tiny-dsvl/` (provenance in its README).

/// `(file name, contents)` of the bundled checkpoint directory.
pub(crate) const FILES: &[(&str, &[u8])] = &[
    ("config.json", include_bytes!("../../../assets/tiny-dsvl/config.json")),
    ("model.safetensors", include_bytes!("../../../assets/tiny-dsvl/model.safetensors")),
    (
        "preprocessor_config.json",
        include_bytes!("../../../assets/tiny-dsvl/preprocessor_config.json"),
    ),
    ("processor_config.json", include_bytes!("../../../assets/tiny-dsvl/processor_config.json")),
    (
        "special_tokens_map.json",
        include_bytes!("../../../assets/tiny-dsvl/special_tokens_map.json"),
    ),
    ("tokenizer.json", include_bytes!("../../../assets/tiny-dsvl/tokenizer.json")),
    ("tokenizer_config.json", include_bytes!("../../../assets/tiny-dsvl/tokenizer_config.json")),
];

pub(crate) fn file(name: &str) -> Option<&'static [u8]> {
    FILES.iter().find(|(n, _)| *n == name).map(|(_, b)| *b)
}
