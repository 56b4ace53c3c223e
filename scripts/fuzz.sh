#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets, cargo fuzz + libFuzzer with
# AddressSanitizer) for SECONDS each (default 30), starting from the committed
# corpus in fuzz/corpus/TARGET, and prints one table row per target. New
# inputs go to a scratch directory (the committed corpus is only read); a
# crash, timeout (10 s per input) or out-of-memory (2 GB) leaves its input in
# fuzz/artifacts/TARGET/ and fails the run.
#
#   scripts/fuzz.sh              # 30 s per target (what scripts/test.sh runs)
#   scripts/fuzz.sh 600          # 10 minutes per target
#   scripts/fuzz.sh 600 recipe   # one target
#   FUZZ_SCRATCH=DIR scripts/fuzz.sh 600   # keep what the fuzzer found in DIR
#
# cargo-fuzz is installed into .tools/ on first use; the build uses the
# stable toolchain with RUSTC_BOOTSTRAP=1 (libFuzzer's flags are unstable).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
scripts/setup.sh
seconds="${1:-30}"
shift || true
targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(checkpoint config recipe slicing_table small_formats)

if [ ! -x .tools/bin/cargo-fuzz ]; then
    echo "fuzz: installing cargo-fuzz into .tools/" >&2
    cargo install --quiet --locked --root .tools cargo-fuzz --version 0.13.2
fi
torch_lib="$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')"
export RUSTC_BOOTSTRAP=1 LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fuzz=(.tools/bin/cargo-fuzz fuzz)

dict() {
    case "$1" in
        checkpoint|config|small_formats) echo fuzz/dicts/json.dict ;;
        recipe) echo fuzz/dicts/yaml.dict ;;
        slicing_table) echo fuzz/dicts/csv.dict ;;
    esac
}

"${fuzz[@]}" build -O --fuzz-dir fuzz >&2
if [ -n "${FUZZ_SCRATCH:-}" ]; then
    scratch="$FUZZ_SCRATCH"   # kept: the inputs found, e.g. to minimise into the corpus
else
    scratch="$(mktemp -d)"
    trap 'rm -rf "$scratch"' EXIT
fi
status=0
printf '| target | seconds | executions | exec/s | coverage (edges) | features | corpus | peak RSS | findings |\n'
printf '|---|---|---|---|---|---|---|---|---|\n'
for target in "${targets[@]}"; do
    mkdir -p "$scratch/$target" "fuzz/artifacts/$target"
    log="$scratch/$target.log"
    if "${fuzz[@]}" run -O --fuzz-dir fuzz "$target" "$scratch/$target" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 -dict="$(dict "$target")" \
        -print_final_stats=1 -artifact_prefix="fuzz/artifacts/$target/" >"$log" 2>&1; then
        findings=0
    else
        findings="see fuzz/artifacts/$target/"
        status=1
        tail -n 40 "$log" >&2
    fi
    stat() { sed -n "s/^stat::$1: *//p" "$log" | tail -n 1; }
    done_line="$(grep -E '^#[0-9]+.* cov: ' "$log" | tail -n 1 || true)"
    cov="$(sed -n 's/.* cov: \([0-9]*\).*/\1/p' <<<"$done_line")"
    ft="$(sed -n 's/.* ft: \([0-9]*\).*/\1/p' <<<"$done_line")"
    corp="$(sed -n 's/.* corp: \([0-9]*\/[0-9]*[a-zA-Z]*\).*/\1/p' <<<"$done_line")"
    printf '| %s | %s | %s | %s | %s | %s | %s | %s MB | %s |\n' "$target" "$seconds" \
        "$(stat number_of_executed_units)" "$(stat average_exec_per_sec)" "${cov:-?}" \
        "${ft:-?}" "${corp:-?}" "$(stat peak_rss_mb)" "$findings"
done
exit $status
