#!/usr/bin/env bash
# The GPU bench: one short run on a machine with an NVIDIA GPU (a few minutes
# once the binary is built), writing a results table to paste into
# benches/RESULTS.md.
#
#     benches/gpu.sh [WORK_DIR]      (default work/bench-gpu; results in WORK_DIR/RESULTS-gpu.md)
#
# 1. Reuses target/release/amalgam (builds it when missing).
# 2. Generates TinyLlama-1.1B-shape BF16 inputs (base + 2 fine-tunes) unless present.
# 3. linear / ties / dare_ties (density 0.5) with --device cpu and --device cuda:
#    wall time, peak RSS, and whether the two outputs are the same bytes.
# 4. The micro zoo built, a PLeaS merge of it and an eval, all with --device cuda.
# DEVICE=cpu runs the same steps with the CPU in the GPU's place (a check of the script).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
work=${1:-work/bench-gpu}
device=${DEVICE:-cuda}
bin=target/release/amalgam
scripts/setup.sh
[ -x "$bin" ] || cargo build --release
mkdir -p "$work"
results="$work/RESULTS-gpu.md"
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi")

# Wall seconds and peak RSS (GB) of one command, as "S GB"; its output goes to $work/last.log.
measure() {
    /usr/bin/time -f "%e %M" -o "$work/time" "$@" >"$work/last.log" 2>&1 || {
        cat "$work/last.log" >&2
        return 1
    }
    awk '{printf "%.2f %.2f\n", $1, $2 * 1024 / 1e9}' "$work/time"
}

fam="$work/tinyllama"
[ -f "$fam/finetune-2/config.json" ] ||
    "$bin" synth "$fam" --shape tinyllama --dtype bfloat16 --finetunes 2 --seed 0 --force -q
{
    echo "# GPU bench ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD))"
    echo
    echo "GPU: $gpu. CPU: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores."
    echo "Reproduce: \`benches/gpu.sh\`. Inputs: TinyLlama-1.1B-shape BF16, base + 2 fine-tunes (2.2 GB each), page cache warm."
    echo
    echo "| method | device | wall s | peak RSS GB | same bytes as CPU |"
    echo "|---|---|---|---|---|"
} >"$results"
cat "$fam"/*/*.safetensors >/dev/null # warm the page cache
for method in linear ties dare_ties; do
    recipe="$work/$method.yml"
    {
        echo "merge_method: $method"
        [ "$method" = linear ] || echo "base_model: $fam/base"
        echo "models:"
        for k in 1 2; do
            echo "  - model: $fam/finetune-$k"
            if [ "$method" = linear ]; then
                echo "    parameters: {weight: 0.5}"
            else
                echo "    parameters: {weight: 0.5, density: 0.5}"
            fi
        done
    } >"$recipe"
    for run in cpu "$device"; do
        read -r wall rss < <(measure "$bin" merge "$recipe" "$work/out-$run" --device "$run" --force -q)
        same=""
        if [ "$run" = "$device" ]; then
            same=yes
            for f in "$work/out-cpu"/*.safetensors; do
                cmp -s "$f" "$work/out-$run/$(basename "$f")" || same=NO
            done
        fi
        echo "| $method | $run | $wall | $rss | $same |" | tee -a "$results"
    done
    rm -rf "$work/out-cpu" "$work/out-$device"
done

{
    echo
    echo "| micro zoo, --device $device | wall s | peak RSS GB |"
    echo "|---|---|---|"
} >>"$results"
read -r wall rss < <(measure "$bin" zoo build --size micro --set merging --dir "$work/zoo" --device "$device")
echo "| zoo build --size micro --set merging | $wall | $rss |" | tee -a "$results"
sed "s#work/zoo/small#$work/zoo/micro#g" recipes/pleas/zoo.yml >"$work/pleas.yml"
read -r wall rss < <(measure "$bin" merge "$work/pleas.yml" "$work/pleas-out" --device "$device" --force -q)
echo "| PLeaS 1.5× of the micro zoo's base and init-b | $wall | $rss |" | tee -a "$results"
read -r wall rss < <(measure "$bin" eval "$work/zoo/micro/base" "$work/pleas-out" --device "$device")
echo "| eval of base and the PLeaS merge (three domains) | $wall | $rss |" | tee -a "$results"
cat "$work/last.log" >>"$results"
echo
cat "$results"
