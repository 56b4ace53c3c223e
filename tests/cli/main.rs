//! The everyday tier of end-to-end tests (plain `cargo test`): the binary on
//! synthetic checkpoints, hostile inputs, broken outputs. No Python and no
//! zoo training here: [`common::python`] refuses to start one in this binary.
//! One test binary, so a change links once.

/// Whether this binary may call the Python oracles and train the zoo.
const ORACLE_TIER: bool = false;

#[path = "../common/mod.rs"]
mod common;

mod bad_input;
mod broken_outputs;
mod checkpoint_io;
mod cli_options;
mod cli_reference;
mod docs;
mod dry_run_json;
mod eval_stream;
mod hostile_cli;
mod hostile_configs;
mod interrupts;
mod merge_cli;
mod multi_stage_outputs;
mod resource_limits;
mod split_hostile;
