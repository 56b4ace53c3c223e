#!/usr/bin/env bash
# The book's merging study: every table, written to docs/src/results/study-SIZE.md
# (the small zoo's page is linked from docs/src/results/merging-study.md). Builds
# (or reuses) the zoo's
# study set, merges the first 2, 3 and 4 study experts of `base`, of the
# shorter-trained `base-short` and of the longer-trained `base-long` with linear,
# task arithmetic, TIES and DARE-TIES —
# each at the recipe's defaults and as `amalgam tune` sets it on the validation
# split — and evaluates base, experts, multitask models and merges on the held-in
# and held-out domains' evaluation split. Usage: scripts/study-table.sh [small|micro]
source "$(dirname "${BASH_SOURCE[0]}")/table-env.sh"
started=$(date +%s)
$amalgam zoo build --size "$size" --set study --dir work/zoo -q > /dev/null
zoo=work/zoo/$size
out=work/study/$size
experts=(german c spanish perl)
trials=${TUNE_TRIALS:-20}
mkdir -p "$out"
models=("$zoo/base" "$zoo/base-short" "$zoo/base-long")
for e in "${experts[@]}"; do models+=("$zoo/study-$e" "$zoo/short-study-$e" "$zoo/long-study-$e"); done
for k in 2 3 4; do models+=("$zoo/multitask-$k"); done

# recipe METHOD BASE PREFIX K: a recipe over the first K experts, tune markers
# where the method has settings (the defaults are mergekit's usual ones).
recipe() {
  local method=$1 base=$2 prefix=$3 k=$4 parameters
  case $method in
    linear) parameters="{weight: 1.0}" ;;
    task_arithmetic) parameters="{weight: {tune: [0.1, 1.5], default: 0.5}}" ;;
    *) parameters="{weight: 1.0, density: {tune: [0.1, 1.0], default: 0.5}, lambda: {tune: [0.2, 2.0], default: 1.0}}" ;;
  esac
  echo "merge_method: $method"
  [ "$method" = linear ] || echo "base_model: $zoo/$base"
  echo "parameters: $parameters"
  echo "models:"
  for e in "${experts[@]:0:$k}"; do echo "  - model: $zoo/$prefix$e"; done
  echo "dtype: float32"
}

for base in base base-short base-long; do
  prefix=${base#base}-study-; prefix=${prefix#-}
  for k in 2 3 4; do
    held_in=$(IFS=,; echo "${experts[*]:0:$k}")
    for method in linear task_arithmetic ties dare_ties; do
      dir=$out/$base/k$k
      mkdir -p "$dir"
      recipe "$method" "$base" "$prefix" "$k" > "$dir/$method.tune.yml"
      if [ "$method" = linear ]; then
        cp "$dir/$method.tune.yml" "$dir/$method.yml"
      else
        # The defaults, as an ordinary recipe: each marker replaced by its default.
        sed -E 's/\{tune: \[[^]]*\], default: ([0-9.]+)\}/\1/g' "$dir/$method.tune.yml" > "$dir/$method.yml"
        $amalgam tune "$dir/$method.tune.yml" "$dir/$method-tune" --domains "$held_in" \
          --trials "$trials" --seq-len "$window" --seed 0 --force -q > /dev/null
        $amalgam merge "$dir/$method-tune/best.yml" "$dir/$method-tuned" --seed 0 --force -q
        models+=("$dir/$method-tuned")
      fi
      $amalgam merge "$dir/$method.yml" "$dir/$method" --seed 0 --force -q
      models+=("$dir/$method")
    done
  done
done
$amalgam eval "${models[@]}" --domains german,c,spanish,perl,italian,cpp \
  --seq-len "$window" --json -q > "$out/eval.json"
# How strong each base is where they trained: the general domains.
$amalgam eval "$zoo/base" "$zoo/base-short" "$zoo/base-long" --seq-len "$window" --json -q > "$out/eval-general.json"
mkdir -p docs/src/results
.venv/bin/python scripts/study-table.py "$out" > "docs/src/results/study-$size.md"
cat "docs/src/results/study-$size.md"
echo "study-table: $(( $(date +%s) - started )) s (zoo included)" >&2
