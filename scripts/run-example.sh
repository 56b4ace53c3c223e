#!/usr/bin/env bash
# The main job on a fresh clone: installs what it needs, builds amalgam, generates
# small example models (a synthetic Llama base and two fine-tunes) under work/example,
# and merges them with TIES (recipes/ties.yml) into work/merged-ties.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --locked
amalgam=target/release/amalgam
$amalgam synth work/example --shape tiny --finetunes 2 --seed 0 --force
$amalgam merge recipes/ties.yml work/merged-ties --force
$amalgam inspect work/merged-ties | sed -n 1,8p   # sed reads to the end: no SIGPIPE
