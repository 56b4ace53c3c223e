#!/usr/bin/env bash
# The book's stitching results (docs/src/results/stitching.md): tables and plots
# (docs/src/images/). Builds (or reuses) the zoo's
# stitching set, then joins three anchor pairs and evaluates every network of
# each family:
# - anchor-small and base, and the same two trained further (all in
#   docs/src/images/stitch-pareto-SIZE.png): least squares only (recipes/stitch/zoo.yml),
#   trained (zoo-trained.yml), trained with distillation from base
#   (zoo-distilled.yml), both for four times the steps (zoo-trained-long.yml,
#   zoo-distilled-long.yml), distilled for four times the steps with the
#   anchors frozen (zoo-frozen.yml); the anchors trained further, least squares
#   and as zoo-distilled-long.yml (long-anchors*.yml);
# - the same pair distilled for 12 and 36 times the steps
#   (zoo-distilled-longer.yml, zoo-distilled-longest.yml: whether route
#   training converges; docs/src/images/stitch-pareto-SIZE-steps.png);
# - the deep pair of one depth at two widths (deep*.yml), least squares, as
#   zoo-distilled-long.yml and as zoo-distilled-longer.yml
#   (docs/src/images/stitch-pareto-SIZE-deep.png).
# Usage: scripts/stitch-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
$amalgam zoo build --size "$size" --set stitching --dir work/zoo
out=work/stitch/$size
mkdir -p "$out" docs/src/images
for recipe in zoo zoo-trained zoo-distilled zoo-trained-long zoo-distilled-long \
  zoo-distilled-longer zoo-distilled-longest zoo-frozen long-anchors long-anchors-distilled \
  deep deep-distilled deep-distilled-longer; do
  sed "s#work/zoo/small/#work/zoo/$size/#g" "recipes/stitch/$recipe.yml" > "$out/$recipe.yml"
  $amalgam stitch "$out/$recipe.yml" "$out/$recipe" --force -q
  $amalgam eval "$out/$recipe" --seq-len "$window" --json -q > "$out/$recipe.json"
done
$amalgam pareto --x flops \
  --series "least squares=$out/zoo.json" \
  --series "trained=$out/zoo-trained.json" \
  --series "distilled=$out/zoo-distilled.json" \
  --series "trained 4x=$out/zoo-trained-long.json" \
  --series "distilled 4x=$out/zoo-distilled-long.json" \
  --series "distilled 4x, anchors frozen=$out/zoo-frozen.json" \
  --series "anchors trained further: least squares=$out/long-anchors.json" \
  --series "anchors trained further: distilled 4x=$out/long-anchors-distilled.json" \
  --title "SN-Net family ($size zoo): FLOPs per token vs. held-out loss" \
  --png "docs/src/images/stitch-pareto-$size.png" --force
$amalgam pareto --x flops \
  --series "distilled 1000 steps=$out/zoo-distilled.json" \
  --series "distilled 4000 steps=$out/zoo-distilled-long.json" \
  --series "distilled 12000 steps=$out/zoo-distilled-longer.json" \
  --series "distilled 36000 steps=$out/zoo-distilled-longest.json" \
  --title "SN-Net family ($size zoo): route training for longer" \
  --png "docs/src/images/stitch-pareto-$size-steps.png" --force
$amalgam pareto --x flops \
  --series "least squares=$out/deep.json" \
  --series "distilled 4000 steps=$out/deep-distilled.json" \
  --series "distilled 12000 steps=$out/deep-distilled-longer.json" \
  --title "SN-Net family of one depth ($size zoo, 8 blocks, 64 and 128 wide)" \
  --png "docs/src/images/stitch-pareto-$size-deep.png" --force
