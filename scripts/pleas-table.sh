#!/usr/bin/env bash
# The book's PLeaS tables (docs/src/results/pleas.md), printed: builds (or
# reuses) the zoo and merges two pairs
# that share no base — `base` + `init-b` (same data, different
# initialisations) and `expert-prose` + `init-b-code` (experts from different
# bases on different domains) — by naive averaging, permute-then-average,
# PLeaS at 1x (activation matching; and data-free: weight matching with
# random-token calibration) and PLeaS at budgets 1.25x, 1.5x and 2x; then
# evaluates everything on every domain's held-out text.
# Usage: scripts/pleas-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --dir work/zoo
out=work/pleas/$size
mkdir -p "$out"
table() { # pair name, model A, model B
  local pair=$1 a=$2 b=$3
  local models=("work/zoo/$size/$a" "work/zoo/$size/$b")
  merge() { # name, then parameter lines
    local name=$pair-$1
    shift
    {
      printf 'merge_method: pleas\nmodels:\n  - model: work/zoo/%s/%s\n  - model: work/zoo/%s/%s\n' "$size" "$a" "$size" "$b"
      printf 'parameters:\n  seq_len: %s\n' "$((window - 1))"
      printf '  %s\n' "$@"
    } > "$out/$name.yml"
    $amalgam merge "$out/$name.yml" "$out/$name" --force
    models+=("$out/$name")
  }
  merge naive-average "matching: none" "least_squares: false"
  merge permute-average "least_squares: false"
  merge permute-average-distance "least_squares: false" "metric: distance"
  merge pleas-1x "budget: 1"
  merge pleas-free-1x "budget: 1" "matching: weight" "calibration: random"
  for budget in 1.25 1.5 2; do
    merge "pleas-${budget}x" "budget: $budget"
  done
  $amalgam eval "${models[@]}" --seq-len "$window" --by-model
}
table inits base init-b
table experts expert-prose init-b-code
