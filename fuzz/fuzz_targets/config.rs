//! Every reader of `config.json` on hostile text, beside the tiny model's
//! real weights: the checkpoint's (sizes, layer count, tie default), the
//! forward pass's (shapes, memory estimates), MatFormer's layout (Gemma 3n
//! fields, KV sharing) and the output check.
#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use amalgam_checkpoint::{config_mismatch, Checkpoint, TensorSpec};
use amalgam_elastic::matformer::ModelLayout;
use amalgam_nn::DecoderConfig;
use libfuzzer_sys::fuzz_target;

fn dir() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| common::tiny_model("config", u64::MAX))
}

fuzz_target!(|data: &[u8]| {
    let dir = dir();
    common::put(dir, "config.json", data);
    let Ok(checkpoint) = Checkpoint::open(dir) else {
        return;
    };
    let config = checkpoint.config();
    let _ = (checkpoint.layers(), checkpoint.is_tied(), config.dtype());
    let specs: Vec<TensorSpec> = checkpoint
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(&t.name, t.dtype, t.shape.clone()))
        .collect();
    let _ = config_mismatch(config, &specs);
    let _ = ModelLayout::read(&checkpoint);
    if let Ok(decoder) = DecoderConfig::from_model_config(config, &dir.join("config.json")) {
        let _ = decoder.parameters();
        let _ = (decoder.weight_bytes(), decoder.forward_bytes(32, 4096));
        let _ = decoder.to_model_config().to_json_pretty();
    }
});
