#!/usr/bin/env bash
# The README's PLeaS table: builds (or reuses) the zoo, merges `base` and
# `init-b` (same data, different initialisations) by naive averaging,
# permute-then-average, PLeaS at 1x (activation matching; and data-free: weight
# matching with random-token calibration) and PLeaS at budgets 1.25x, 1.5x and
# 2x, and evaluates everything on every domain's held-out text.
# Usage: scripts/pleas-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --dir work/zoo
out=work/pleas/$size
mkdir -p "$out"
models=("work/zoo/$size/base" "work/zoo/$size/init-b")
merge() { # name, then parameter lines
  local name=$1
  shift
  {
    printf 'merge_method: pleas\nmodels:\n  - model: work/zoo/%s/base\n  - model: work/zoo/%s/init-b\nparameters:\n  seq_len: %s\n' "$size" "$size" "$((window - 1))"
    printf '  %s\n' "$@"
  } > "$out/$name.yml"
  $amalgam merge "$out/$name.yml" "$out/$name" --force
  models+=("$out/$name")
}
merge naive-average "matching: none" "least_squares: false"
merge permute-average "least_squares: false"
merge pleas-1x "budget: 1"
merge pleas-free-1x "budget: 1" "matching: weight" "calibration: random"
for budget in 1.25 1.5 2; do
  merge "pleas-${budget}x" "budget: $budget"
done
$amalgam eval "${models[@]}" --seq-len "$window" --by-model
