//! The oracle tier (`cargo test --features oracle`, run by scripts/test.sh):
//! differential tests against transformers, mergekit, peft and
//! huggingface_hub from the project venv, and the runs on the micro zoo,
//! which is trained once per run and shared ([`common::micro_zoo`]).

/// Whether this binary may call the Python oracles and train the zoo.
const ORACLE_TIER: bool = true;

#[path = "../common/mod.rs"]
mod common;

mod broken_outputs;
mod eval_text;
mod extract_cli;
mod families;
mod hub_cache;
mod merge_cli;
mod mergekit_diff;
mod study_cli;
mod transformers_oracle;
mod zoo_cli;
