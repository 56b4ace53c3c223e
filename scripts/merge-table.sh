#!/usr/bin/env bash
# The README's "does merging work" table: builds (or reuses) the zoo, merges its
# three domain experts with linear, task arithmetic, TIES and DARE-TIES
# (recipes/zoo/*.yml), and evaluates the base, each expert and each merge on every
# domain's held-out text. Usage: scripts/merge-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --dir work/zoo
zoo=work/zoo/$size
models=("$zoo/base" "$zoo/expert-prose" "$zoo/expert-code" "$zoo/expert-legal")
for method in linear task-arithmetic ties dare-ties; do
  recipe=work/zoo-recipes/$size/$method.yml
  mkdir -p "$(dirname "$recipe")"
  sed "s#work/zoo/small/#$zoo/#" "recipes/zoo/$method.yml" > "$recipe"
  $amalgam merge "$recipe" "work/zoo-merged/$size/$method" --force --seed 0
  models+=("work/zoo-merged/$size/$method")
done
$amalgam eval "${models[@]}" --seq-len "$window" --by-model
