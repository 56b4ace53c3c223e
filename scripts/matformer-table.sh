#!/usr/bin/env bash
# The book's MatFormer results (docs/src/results/matformer.md): prints the table
# and draws the plot (docs/src/images/matformer-pareto-SIZE.png). Builds
# (or reuses) the zoo's matformer set, extracts S/M/L/XL and every Mix'n'Match
# choice the budget rule admits (granularities that never narrow with depth and
# rise one step at most between layers), plus the same choices reversed
# (narrowing with depth, against the rule), and evaluates them against the
# independently trained baselines; submodels are also compared with the full
# MatFormer (next-token agreement, KL). Usage: scripts/matformer-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --set matformer --dir work/zoo
zoo=work/zoo/$size
out=work/matformer/$size
rm -rf "$out"
mkdir -p "$out/recipes"

names=(S M L XL)
# extract NAME WIDTHS...: writes a recipe and extracts it to $out/NAME.
extract() {
  local name=$1; shift
  local widths
  widths=$(IFS=,; echo "$*")
  printf 'kind: extract\nmodel: %s\nffn_widths: [%s]\n' "$zoo/matformer" "$widths" > "$out/recipes/$name.yml"
  $amalgam extract "$out/recipes/$name.yml" "$out/$name" -q
}

layers=$(grep -o '"num_hidden_layers": *[0-9]*' "$zoo/matformer/config.json" | grep -o '[0-9]*$')
uniform=() rule=() against=()
for g in 0 1 2 3; do
  widths=(); for _ in $(seq "$layers"); do widths+=("${names[g]}"); done
  extract "${names[g]}" "${widths[@]}"
  uniform+=("$out/${names[g]}")
done
# Every granularity sequence over the layers (base-4 counting) that the rule admits.
for ((code = 0; code < 4 ** layers; code++)); do
  seq=(); c=$code
  for ((l = 0; l < layers; l++)); do seq=("$((c % 4))" "${seq[@]}"); c=$((c / 4)); done
  admitted=1 uniform_seq=1
  for ((l = 1; l < layers; l++)); do
    step=$((seq[l] - seq[l - 1]))
    ((step == 0 || step == 1)) || admitted=0
    ((step == 0)) || uniform_seq=0
  done
  ((admitted && !uniform_seq)) || continue
  forward=() backward=()
  for g in "${seq[@]}"; do forward+=("${names[g]}"); backward=("${names[g]}" "${backward[@]}"); done
  extract "$(IFS=-; echo "${forward[*]}")" "${forward[@]}"
  extract "$(IFS=-; echo "${backward[*]}")" "${backward[@]}"
  rule+=("$out/$(IFS=-; echo "${forward[*]}")")
  against+=("$out/$(IFS=-; echo "${backward[*]}")")
done

evaluate() {
  local json=$1; shift
  $amalgam eval "$@" --seq-len "$window" --json -q > "$out/$json"
}
evaluate uniform.json "${uniform[@]}" --reference "$zoo/matformer"
evaluate rule.json "${rule[@]}" --reference "$zoo/matformer"
evaluate against.json "${against[@]}" --reference "$zoo/matformer"
evaluate baselines.json "$zoo/baseline-s" "$zoo/baseline-m" "$zoo/baseline-l" "$zoo/base"
mkdir -p docs/src/images
$amalgam pareto \
  --series "MatFormer S/M/L/XL=$out/uniform.json" \
  --series "Mix'n'Match, widening with depth=$out/rule.json" \
  --series "Mix'n'Match, narrowing with depth=$out/against.json" \
  --series "Trained separately=$out/baselines.json" \
  --title "MatFormer submodels ($size zoo): parameters vs. held-out loss" \
  --png "docs/src/images/matformer-pareto-$size.png" --force
