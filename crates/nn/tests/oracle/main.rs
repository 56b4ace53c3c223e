//! The oracle tier of the nn tests (`cargo test --features oracle`, run by
//! scripts/test.sh): the forward pass and the tokenizers against transformers
//! from the project venv.

/// Whether this binary may call the Python oracles.
const ORACLE_TIER: bool = true;

#[path = "../common/mod.rs"]
mod common;

mod families;
mod real_tokenizers;
mod transformers_logits;
