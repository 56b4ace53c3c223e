"""Extraction benchmark: `amalgam extract` vs a plain copy of the kept bytes, same run.

    scripts/setup.sh && cargo build --release && .venv/bin/python benches/extract.py

Generates a TinyLlama-1.1B-shape BF16 checkpoint with `amalgam synth` under
work/bench/ (reused when present) and, with a warm page cache, times three
submodels:
  * M: every FFN at a quarter of its width;
  * L, 4 layers skipped: half-width FFNs, layers 8–11 dropped;
  * budget 60%: the Mix'n'Match rule's choice within 60% of the parameters.
For each: amalgam's median wall time over --runs runs and peak RSS; the floor —
the faster of `cp` of the output's shards and as many bytes read in large
blocks and written to one file, fsynced; a strided
copy of exactly the kept ranges (computed here from the safetensors headers by
the slicing rule, independently of amalgam); and notebook-style Python (safetensors
`safe_open`, torch slicing, `save_file`, as Google's MatFormer Lab does it).
Writes benches/EXTRACT.md and prints the table.
"""
import argparse
import json
import os
import re
import shutil
import statistics
import struct
import subprocess
import sys
import time

from whole_merge import AMALGAM, ROOT, machine, measure, read_all, sh

FFN = re.compile(r"^model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def header(path):
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        meta = json.loads(f.read(n))
    meta.pop("__metadata__", None)
    return 8 + n, meta


def kept_ranges(model_dir, skip, widths_by_layer):
    """(file, [(offset, length)]) of every byte a submodel keeps, by the rule."""
    out = []
    for name in sorted(f for f in os.listdir(model_dir) if f.endswith(".safetensors")):
        path = os.path.join(model_dir, name)
        start, meta = header(path)
        ranges = []
        for tensor, info in meta.items():
            begin, end = (start + o for o in info["data_offsets"])
            layer = LAYER.match(tensor)
            if layer and int(layer.group(1)) in skip:
                continue
            ffn = FFN.match(tensor)
            if not ffn:
                ranges.append((begin, end - begin))
                continue
            m = widths_by_layer[int(ffn.group(1))]
            rows, cols = info["shape"]
            if ffn.group(2) == "down":  # columns [:m] of every row
                ranges += [(begin + r * cols * 2, m * 2) for r in range(rows)]
            else:  # rows [:m]
                ranges.append((begin, m * cols * 2))
        out.append((path, ranges))
    return out


def contiguous_copy(files, nbytes, out_path):
    """The floor: the same number of bytes read from the input in 64 MiB blocks
    and written to one file, fsynced."""
    started = time.perf_counter()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while written < nbytes:
                block = f.read(min(64 << 20, nbytes - written))
                if not block:
                    break
                written += os.write(fd, block)
    os.fsync(fd)
    os.close(fd)
    os.remove(out_path)
    return time.perf_counter() - started


def plain_copy(ranges, out_path):
    started = time.perf_counter()
    fd = os.open(out_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    for path, spans in ranges:
        src = os.open(path, os.O_RDONLY)
        for offset, length in spans:
            written += os.pwrite(fd, os.pread(src, length, offset), written)
        os.close(src)
    os.fsync(fd)
    os.close(fd)
    os.remove(out_path)
    return time.perf_counter() - started, written


NOTEBOOK = r"""
import json, os, re, sys, torch
from safetensors import safe_open
from safetensors.torch import save_file
src, out, skip, widths = sys.argv[1], sys.argv[2], set(json.loads(sys.argv[3])), json.loads(sys.argv[4])
kept = [l for l in range(len(widths)) if l not in skip]
os.makedirs(out, exist_ok=True)
for name in sorted(f for f in os.listdir(src) if f.endswith(".safetensors")):
    tensors = {}
    with safe_open(os.path.join(src, name), framework="pt") as f:
        for key in f.keys():
            m = re.match(r"model\.layers\.(\d+)\.(.*)", key)
            if not m:
                tensors[key] = f.get_tensor(key)
                continue
            old = int(m.group(1))
            if old in skip:
                continue
            new, rest, t = kept.index(old), m.group(2), f.get_tensor(key)
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                t = t[: widths[old]].contiguous()
            elif rest == "mlp.down_proj.weight":
                t = t[:, : widths[old]].contiguous()
            tensors[f"model.layers.{new}.{rest}"] = t
    save_file(tensors, os.path.join(out, name), metadata={"format": "pt"})
    fd = os.open(os.path.join(out, name), os.O_RDONLY); os.fsync(fd); os.close(fd)
"""


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    work = os.path.join(ROOT, "work", "bench")
    base = os.path.join(work, "tinyllama-single", "base")
    if not os.path.exists(os.path.join(base, "config.json")):
        print(f"generating {base} …", flush=True)
        sh(AMALGAM, "synth", os.path.dirname(base), "--shape", "tinyllama", "--dtype", "bfloat16",
           "--finetunes", "0", "--seed", "0", "--force", "-q")
    files = [os.path.join(base, f) for f in os.listdir(base) if f.endswith(".safetensors")]
    layers, ffn = 22, 5632
    cases = [
        ("M (FFN 1/4)", "ffn_widths: M\n", set(), [ffn // 4] * layers),
        ("L, layers 8–11 skipped", "ffn_widths: L\nskip_layers: [8, 9, 10, 11]\n", {8, 9, 10, 11},
         [ffn // 2] * layers),
        ("budget 60%", "budget: 60%\n", set(), None),
    ]
    rows = []
    for label, body, skip, widths in cases:
        recipe = os.path.join(work, "extract.yml")
        with open(recipe, "w") as f:
            f.write(f"kind: extract\nmodel: {base}\n{body}")
        out = os.path.join(work, "extracted")
        if widths is None:  # ask amalgam's plan which widths the budget rule chose
            plan = subprocess.run([AMALGAM, "extract", recipe, out, "--dry-run"], check=True,
                                  capture_output=True, text=True).stdout
            widths = json.loads(re.search(r"FFN widths (\[[0-9, ]*\])", plan).group(1))
        ranges = kept_ranges(base, skip, widths)
        read_all(files)  # warm the page cache
        floors, gathers, amalgam, notebook = [], [], [], []
        for _ in range(args.runs):
            seconds, kept = plain_copy(ranges, os.path.join(work, "floor.bin"))
            gathers.append(seconds)
            floors.append(contiguous_copy(files, kept, os.path.join(work, "floor.bin")))
            shutil.rmtree(out, ignore_errors=True)
            amalgam.append(measure([AMALGAM, "extract", recipe, out, "--force", "-q"]))
        shards = [os.path.join(out, f) for f in os.listdir(out) if f.endswith(".safetensors")]
        size = sum(os.path.getsize(f) for f in shards)
        copies = []
        for _ in range(args.runs):  # cp of amalgam's own output: the same bytes, contiguous
            read_all(shards)
            dest = os.path.join(work, "cp")
            shutil.rmtree(dest, ignore_errors=True)
            os.makedirs(dest)
            started = time.perf_counter()
            subprocess.run(["cp", *shards, dest], check=True)
            for name in os.listdir(dest):
                fd = os.open(os.path.join(dest, name), os.O_RDONLY)
                os.fsync(fd)
                os.close(fd)
            copies.append(time.perf_counter() - started)
            shutil.rmtree(dest)
        shutil.rmtree(out, ignore_errors=True)
        for _ in range(args.runs):
            nb = os.path.join(work, "notebook")
            shutil.rmtree(nb, ignore_errors=True)
            notebook.append(measure([sys.executable, "-c", NOTEBOOK, base, nb, json.dumps(sorted(skip)),
                                     json.dumps(widths)]))
            shutil.rmtree(nb, ignore_errors=True)
        floor = min(statistics.median(floors), statistics.median(copies))
        ours = statistics.median(r[0] for r in amalgam)
        theirs = statistics.median(r[0] for r in notebook)
        rows.append((label, kept / 1e9, size / 1e9, floor, statistics.median(gathers), ours,
                     max(r[1] for r in amalgam), theirs, max(r[1] for r in notebook)))
    lines = [
        "| submodel | kept bytes | output shards | plain copy | strided copy | amalgam | × plain copy "
        "| amalgam peak RSS | notebook-style Python | × plain copy | its peak RSS |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, kept, size, floor, gather, ours, rss, theirs, their_rss in rows:
        lines.append(f"| {label} | {kept:.2f} GB | {size:.2f} GB | {floor:.2f} s | {gather:.2f} s | "
                     f"{ours:.2f} s | {ours / floor:.2f}× | {rss / 1e9:.2f} GB | {theirs:.2f} s | "
                     f"{theirs / floor:.2f}× | {their_rss / 1e9:.2f} GB |")
    table = "\n".join(lines)
    text = (
        "# Extraction benchmark\n\n"
        f"`.venv/bin/python benches/extract.py --runs {args.runs}` on {machine()}.\n\n"
        "Input: the TinyLlama-1.1B-shape BF16 checkpoint (2.2 GB, 22 layers, FFN 5632) from "
        "`amalgam synth`, page cache warm. Times are medians of the runs; every output is fsynced. "
        "Plain copy: the faster of `cp` of amalgam's output shards (the same bytes, contiguous, page "
        "cache warm) and as many bytes read from the input in 64 MiB blocks and written to one file "
        "(Python) — the floor for moving them. Strided copy: exactly the kept byte ranges "
        "(computed from the safetensors headers by the slicing rule, independently of amalgam), "
        "pread/pwrite per range from Python. amalgam's first run also hashes the input for the model "
        "card (cached afterwards, as for merges), so its median is a run with the hash cached.\n\n"
        f"{table}\n"
    )
    with open(os.path.join(ROOT, "benches", "EXTRACT.md"), "w") as f:
        f.write(text)
    print(table)


if __name__ == "__main__":
    main()
