"""PLeaS benchmark: `amalgam merge` with `merge_method: pleas` on the small zoo,
and on two TinyLlama-1.1B-shape BF16 checkpoints (`--tinyllama`); and
`amalgam stitch` of a TinyLlama-shape anchor with a half-width one (`--stitch`).

    scripts/setup.sh && cargo build --release && .venv/bin/python benches/pleas.py
    .venv/bin/python benches/pleas.py --tinyllama   # about an hour on 2 cores
    .venv/bin/python benches/pleas.py --stitch      # minutes

The stitch case: the TinyLlama-shape base (as above) and a half-width,
11-layer anchor of the same family (`amalgam synth --hidden 1024
--intermediate 2816 --layers 11`, BF16), stitched by least squares alone on
64 x 128 random-token windows, streamed; reported: wall time, peak RSS, the
`--dry-run` estimate and the number of routes.

The TinyLlama case: `amalgam synth --shape tinyllama --dtype bfloat16` writes
a base and one fine-tune (4.4 GB in all, generated on demand under
work/bench, never committed); PLeaS merges them with activation matching on
64 x 128 random-token calibration windows at budgets 1 and 1.5, streamed
layer by layer. Reported: wall time, the two passes and the phases (from the
model card), peak RSS and peak anonymous RSS (sampled), the `--dry-run`
estimate beside them, and the I/O floor (reading both inputs and writing the
output's bytes, same run). Synthetic weights are enough for time and memory,
not for quality.

Merges the small zoo's `base` and `init-b` (built with `amalgam zoo build
--size small` when missing; minutes) at budgets 1x, 1.5x and 2x with
activation matching, and at 1x with weight matching on random tokens (the
data-free variant). For each: the median wall time over --runs runs, peak RSS,
and the time amalgam spent in each phase (from the output's model card:
features = forward passes of both models, matching = statistics, assignment
and the budget allocation, least squares = normal equations and solves). The
I/O floor is reading both inputs and writing the output's bytes, same run.
(mergekit has no PLeaS; the reference implementation handles ResNets only.)
Writes benches/PLEAS.md and prints the table.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import time

from whole_merge import AMALGAM, ROOT, machine, measure, read_all

CASES = [
    ("activation, 1x", ["budget: 1"]),
    ("activation, 1.5x", ["budget: 1.5"]),
    ("activation, 2x", ["budget: 2"]),
    ("weight + random tokens, 1x", ["budget: 1", "matching: weight", "calibration: random"]),
]
PHASES = re.compile(r"features ([\d.]+) s, matching ([\d.]+) s, least squares ([\d.]+) s "
                    r"\(first pass ([\d.]+) s, second ([\d.]+) s\)", re.IGNORECASE)
ESTIMATE = re.compile(r"peak memory ≈ ([\d.]+) GB")


def safetensors(d):
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def write_section(name, text):
    """Replaces this section of benches/PLEAS.md (between its markers), keeping the others."""
    path = os.path.join(ROOT, "benches", "PLEAS.md")
    old = open(path).read() if os.path.exists(path) else "# PLeaS benchmark (benches/pleas.py)\n"
    start, end = f"<!-- {name} -->", f"<!-- /{name} -->"
    section = f"{start}\n{text}{end}\n"
    if start in old and end in old:
        new = old[:old.index(start)] + section + old[old.index(end) + len(end) + 1:]
    else:
        new = old.rstrip("\n") + "\n\n" + section
    with open(path, "w") as f:
        f.write(new)
    print(text)


def floor_of(inputs, written, work):
    read_all(inputs)  # warm
    started = time.perf_counter()
    read_all(inputs)
    with open(os.path.join(work, "floor.bin"), "wb") as f:
        f.write(os.urandom(written))
        f.flush()
        os.fsync(f.fileno())
    os.remove(os.path.join(work, "floor.bin"))
    return time.perf_counter() - started


def synth(out, finetunes, *shape):
    """`amalgam synth` of a TinyLlama-shape BF16 family into `out` unless it is there."""
    last = f"finetune-{finetunes}" if finetunes else "base"
    if not os.path.exists(os.path.join(out, last, "config.json")):
        subprocess.run([AMALGAM, "synth", "--shape", "tinyllama", "--dtype", "bfloat16",
                        "--finetunes", str(finetunes), *shape, out], cwd=ROOT, check=True)


def stitch(args):
    work = os.path.join(ROOT, args.work, "tinyllama")
    large, small = os.path.join(work, "synth"), os.path.join(work, "half")
    synth(large, 1)
    synth(small, 0, "--hidden", "1024", "--intermediate", "2816", "--layers", "11")
    recipe = os.path.join(work, "stitch.yml")
    with open(recipe, "w") as f:
        f.write(f"kind: stitch\nanchors: [{small}/base, {large}/base]\n"
                "calibration: {source: random, samples: 64, seq_len: 128, batch: 8}\n")
    out = os.path.join(work, "family")
    dry = subprocess.run([AMALGAM, "stitch", recipe, out, "--dry-run"],
                         cwd=ROOT, check=True, capture_output=True, text=True)
    estimate = float(ESTIMATE.search(dry.stdout).group(1))
    wall, rss, anon = measure([AMALGAM, "stitch", recipe, out, "--force", "-q"])
    with open(os.path.join(out, "family.json")) as f:
        routes = sum(r["kind"] == "stitched" for r in json.load(f)["routes"])
    written = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(out) for n in names)
    shutil.rmtree(out)
    floor = floor_of(safetensors(f"{small}/base") + safetensors(f"{large}/base"), written, work)
    lines = [
        f"Machine: {machine()}. `amalgam stitch` (least squares only) of a half-width, 11-layer "
        "anchor (hidden 1024, FFN 2816, 16 heads / 2 KV heads; `amalgam synth --hidden 1024 "
        "--intermediate 2816 --layers 11`) and the TinyLlama-1.1B-shape base, both BF16 "
        "(forward passes in BF16), 64 x 128 random-token calibration windows in batches of 8, "
        "normal equations in F64; the family written (anchors copied tensor by tensor, the "
        "stitches); one run. I/O floor: reading both anchors and writing the family's bytes, same "
        "run (there is no reference stitching tool to run beside it). Target (issue 17): peak RSS "
        "≤ 4 GB.",
        "",
        "| routes | wall s | peak RSS GB | peak anon GB | `--dry-run` estimate GB | written GB | I/O floor s |",
        "|---:|---:|---:|---:|---:|---:|---:|",
        f"| {routes} | {wall:.0f} | {rss / 1e9:.2f} | {anon / 1e9:.2f} | {estimate:.2f} | {written / 1e9:.2f} "
        f"| {floor:.1f} |",
    ]
    write_section("stitch", "\n".join(lines) + "\n")


def tinyllama(args):
    work = os.path.join(ROOT, args.work, "tinyllama")
    pair = os.path.join(work, "synth")
    synth(pair, 1)
    inputs = safetensors(os.path.join(pair, "base")) + safetensors(os.path.join(pair, "finetune-1"))
    rows = []
    for budget in ("1", "1.5"):
        recipe = os.path.join(work, f"budget-{budget}.yml")
        with open(recipe, "w") as f:
            f.write(f"merge_method: pleas\nmodels:\n  - model: {pair}/base\n  - model: {pair}/finetune-1\n"
                    f"parameters:\n  calibration: random\n  samples: 64\n  seq_len: 128\n  budget: {budget}\n")
        dry = subprocess.run([AMALGAM, "merge", recipe, os.path.join(work, "out"), "--dry-run"],
                             cwd=ROOT, check=True, capture_output=True, text=True)
        estimate = float(ESTIMATE.search(dry.stdout + dry.stderr).group(1))
        out = os.path.join(work, f"budget-{budget}")
        wall, rss, anon = measure([AMALGAM, "merge", recipe, out, "--force", "-q"])
        phases = [float(x) for x in PHASES.search(open(os.path.join(out, "README.md")).read()).groups()]
        written = sum(os.path.getsize(p) for p in safetensors(out))
        rows.append((budget, wall, *phases, rss / 1e9, anon / 1e9, estimate,
                     floor_of(inputs, written, work), written / 1e9))
        shutil.rmtree(out)
    lines = [
        f"Machine: {machine()}. Two TinyLlama-1.1B-shape BF16 checkpoints (`amalgam synth`, "
        "1,100,048,384 parameters each), activation matching, 64 x 128 random-token calibration "
        "tokens in batches of 16, normal equations in F64, output BF16; one run each.",
        "",
        "| budget | wall s | first pass s | second pass s | forward passes s | matching s | "
        "least squares s | peak RSS GB | peak anon GB | `--dry-run` estimate GB | output GB | I/O floor s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {r[0]}x | {r[1]:.0f} | {r[5]:.0f} | {r[6]:.0f} | {r[2]:.0f} | {r[3]:.0f} | {r[4]:.0f} | "
         f"{r[7]:.2f} | {r[8]:.2f} | {r[9]:.2f} | {r[11]:.2f} | {r[10]:.1f} |" for r in rows]
    write_section("tinyllama", "\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="work/bench/pleas")
    parser.add_argument("--tinyllama", action="store_true",
                        help="the TinyLlama-1.1B-shape pair instead of the small zoo")
    parser.add_argument("--stitch", action="store_true",
                        help="stitch a TinyLlama-shape anchor with a half-width one")
    args = parser.parse_args()
    if args.tinyllama:
        return tinyllama(args)
    if args.stitch:
        return stitch(args)
    zoo = os.path.join(ROOT, "work", "zoo", "small")
    if not all(os.path.exists(os.path.join(zoo, m, "config.json")) for m in ("base", "init-b")):
        subprocess.run([AMALGAM, "zoo", "build", "--size", "small", "--dir", "work/zoo"], cwd=ROOT, check=True)
    work = os.path.join(ROOT, args.work)
    os.makedirs(work, exist_ok=True)
    inputs = safetensors(os.path.join(zoo, "base")) + safetensors(os.path.join(zoo, "init-b"))
    rows = []
    for label, parameters in CASES:
        name = re.sub(r"[^a-z0-9]+", "-", label.lower()).strip("-")
        recipe = os.path.join(work, f"{name}.yml")
        with open(recipe, "w") as f:
            f.write("merge_method: pleas\nmodels:\n  - model: work/zoo/small/base\n"
                    "  - model: work/zoo/small/init-b\nparameters:\n")
            f.writelines(f"  {p}\n" for p in parameters)
        out = os.path.join(work, name)
        results = [measure([AMALGAM, "merge", recipe, out, "--force", "-q"]) for _ in range(args.runs)]
        card = open(os.path.join(out, "README.md")).read()
        phases = [float(x) for x in PHASES.search(card).groups()[:3]]
        written = sum(os.path.getsize(p) for p in safetensors(out))
        floor = floor_of(inputs, written, work)
        rows.append((label, statistics.median(r[0] for r in results), *phases,
                     max(r[1] for r in results) / 1e9, floor))
    lines = [
        f"Machine: {machine()}. Small zoo (820,608 parameters per model, F32), {args.runs} runs, median.",
        "",
        "| case | wall s | features s | matching s | least squares s | peak RSS GB | I/O floor s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.3f} |" for r in rows]
    write_section("zoo", "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
