#!/usr/bin/env bash
# The main job on a fresh clone: installs what it needs, builds amalgam, generates
# small example models (a synthetic Llama base and two fine-tunes) under work/,
# and inspects one of them.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
scripts/setup.sh
cargo build --release --locked
amalgam=target/release/amalgam
$amalgam synth work/example --shape tiny --finetunes 2 --seed 0 --force
$amalgam convert work/example/finetune-1 work/example-converted --dtype bfloat16 --out-shard-size 300KB --force
$amalgam inspect work/example-converted | head -n 16
