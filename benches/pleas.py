"""PLeaS benchmark: `amalgam merge` with `merge_method: pleas` on the small zoo.

    scripts/setup.sh && cargo build --release && .venv/bin/python benches/pleas.py

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
import os
import re
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
PHASES = re.compile(r"Features ([\d.]+) s, matching ([\d.]+) s, least squares ([\d.]+) s")


def safetensors(d):
    return [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--work", default="work/bench/pleas")
    args = parser.parse_args()
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
        phases = [float(x) for x in PHASES.search(card).groups()]
        written = sum(os.path.getsize(p) for p in safetensors(out))
        read_all(inputs)  # warm
        started = time.perf_counter()
        read_all(inputs)
        with open(os.path.join(work, "floor.bin"), "wb") as f:
            f.write(os.urandom(written))
            f.flush()
            os.fsync(f.fileno())
        floor = time.perf_counter() - started
        rows.append((label, statistics.median(r[0] for r in results), *phases,
                     max(r[1] for r in results) / 1e9, floor))
    lines = [
        f"Machine: {machine()}. Small zoo (820,608 parameters per model, F32), {args.runs} runs, median.",
        "",
        "| case | wall s | features s | matching s | least squares s | peak RSS GB | I/O floor s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ] + [f"| {r[0]} | {r[1]:.2f} | {r[2]:.2f} | {r[3]:.2f} | {r[4]:.2f} | {r[5]:.2f} | {r[6]:.3f} |" for r in rows]
    text = "\n".join(lines) + "\n"
    with open(os.path.join(ROOT, "benches", "PLEAS.md"), "w") as f:
        f.write("# PLeaS benchmark (benches/pleas.py)\n\n" + text)
    print(text)


if __name__ == "__main__":
    main()
