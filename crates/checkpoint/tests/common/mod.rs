//! Helpers shared by the checkpoint crate's integration tests.
#![allow(dead_code)] // each test binary uses its own subset

use std::path::{Path, PathBuf};

use amalgam_checkpoint::{CheckpointWriter, Finish, ModelCard, ModelConfig};

/// Commits a writer with a minimal config (`model_type` only) and no tokenizer.
pub fn finish(writer: CheckpointWriter) -> amalgam_checkpoint::Result<PathBuf> {
    let config = serde_json::json!({"model_type": "llama"});
    writer.finish(Finish {
        config: &ModelConfig::from_json(config.as_object().unwrap().clone()),
        tokenizer_source: None,
        chat_template: None,
        extra_files: &[],
        card: &ModelCard::default(),
    })
}

/// Directory entries of `parent`, sorted, to show nothing was left behind.
pub fn listing(parent: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(parent)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}
