#!/usr/bin/env bash
# The README's stitching table and plot (docs/stitch-pareto-SIZE.png): builds (or
# reuses) the zoo, stitches anchor-small and base with least squares only
# (recipes/stitch/zoo.yml), then trained (zoo-trained.yml), trained with
# distillation from base (zoo-distilled.yml), and both for four times the steps
# (zoo-trained-long.yml, zoo-distilled-long.yml), evaluates every network of
# the five families, and tabulates FLOPs per token against held-out loss.
# Usage: scripts/stitch-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --dir work/zoo
out=work/stitch/$size
mkdir -p "$out"
for recipe in zoo zoo-trained zoo-distilled zoo-trained-long zoo-distilled-long; do
  sed "s#work/zoo/small/#work/zoo/$size/#g" "recipes/stitch/$recipe.yml" > "$out/$recipe.yml"
  $amalgam stitch "$out/$recipe.yml" "$out/$recipe" --force -q
  $amalgam eval "$out/$recipe" --seq-len "$window" --json -q > "$out/$recipe.json"
done
mkdir -p docs
$amalgam pareto --x flops \
  --series "least squares=$out/zoo.json" \
  --series "trained=$out/zoo-trained.json" \
  --series "distilled=$out/zoo-distilled.json" \
  --series "trained 4x=$out/zoo-trained-long.json" \
  --series "distilled 4x=$out/zoo-distilled-long.json" \
  --title "SN-Net family ($size zoo): FLOPs per token vs. held-out loss" \
  --png "docs/stitch-pareto-$size.png"
