#!/usr/bin/env bash
# The whole test suite, from a fresh clone: installs what it needs (scripts/setup.sh),
# then checks formatting and lints, runs both test tiers (the everyday tier:
# unit, property, CLI and hostile-input tests; the oracle tier, `--features
# oracle`: differential tests against transformers, mergekit and peft from the
# project venv, and the runs on the micro zoo), and runs each fuzz target for
# 30 s on its committed corpus (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo fmt --all -- --check
cargo fmt --manifest-path fuzz/Cargo.toml -- --check
cargo clippy --workspace --all-targets --locked --features oracle -- -D warnings
cargo test --workspace --locked --features oracle
scripts/fuzz.sh 30
