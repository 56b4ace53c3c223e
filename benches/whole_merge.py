"""Whole-merge benchmark: amalgam vs mergekit vs the machine's I/O floor, same run.

    scripts/setup.sh && cargo build --release && .venv/bin/python benches/whole_merge.py

Generates TinyLlama-1.1B-shape BF16 checkpoints (a base and two fine-tunes,
2.2 GB each) with `amalgam synth` under work/bench/ (reused when present), then,
with a warm page cache:
  * the I/O floor: read every input once; write one output-sized file and fsync, through the
    page cache and with O_DIRECT (the faster counts);
  * amalgam and mergekit on linear, ties (density 0.5) and dare_ties (density 0.5):
    median wall time of --runs runs, peak RSS (wait4) and peak anonymous memory
    (RssAnon sampled every 20 ms);
  * amalgam's scaling: TIES with 2, 4 and 8 fine-tunes (time per GB read; the 4- and 8-fine-tune
    inputs, 31 GB, are deleted afterwards unless --keep);
  * amalgam's --dry-run peak-memory estimate next to the measured peak.
Writes benches/RESULTS.md (machine, command, tables; benches/NOTES.md appended)
and prints the tables.

    --compare BINARY   also run another amalgam build (e.g. the previous commit's) in the same run
    --large            instead: Mistral-7B-shape BF16 inputs (base + 2, 43 GB, more than the page
                       cache holds), the I/O floor, linear and TIES once each; writes
                       benches/large.json (shown in RESULTS.md by the next full run) and deletes
                       the inputs unless --keep
    --large-layers N   with --large: Mistral-7B's tensors but N of its 32 layers, where the disk does
                       not hold the whole shape (58 GB with the output); the table says so
    --keep             keep the generated inputs (the scaling families; with --large, the 7B ones)
    --no-scaling       leave out the scaling runs (whose inputs need 31 GB of disk), e.g. to compare
                       two builds quickly with --compare
"""
import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AMALGAM = os.path.join(ROOT, "target", "release", "amalgam")
MERGEKIT = os.path.join(ROOT, ".venv", "bin", "mergekit-yaml")
GB = 1e9


def sh(*args):
    return subprocess.run(args, check=True, cwd=ROOT)


def family(work, name, finetunes, extra=(), shape="tinyllama"):
    path = os.path.join(work, name)
    if not os.path.exists(os.path.join(path, f"finetune-{finetunes}", "config.json")):
        print(f"generating {path} …", flush=True)
        sh(AMALGAM, "synth", path, "--shape", shape, "--dtype", "bfloat16",
           "--finetunes", str(finetunes), "--seed", "0", "--force", "-q", *extra)
        os.sync()  # no write-back of the new files during the timed runs
    return path


def recipe(work, name, method, fam, finetunes):
    models = "".join(
        f"  - model: {fam}/finetune-{k}\n    parameters: {{weight: {1 / finetunes:.4f}"
        + (", density: 0.5" if method != "linear" else "") + "}\n"
        for k in range(1, finetunes + 1))
    base = f"base_model: {fam}/base\n" if method != "linear" else ""
    path = os.path.join(work, "recipes", f"{name}.yml")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(f"merge_method: {method}\n{base}models:\n{models}")
    return path


def inputs_of(fam, finetunes, with_base=True):
    members = (["base"] if with_base else []) + [f"finetune-{k}" for k in range(1, finetunes + 1)]
    files = []
    for m in members:
        d = os.path.join(fam, m)
        files += [os.path.join(d, f) for f in sorted(os.listdir(d)) if f.endswith(".safetensors")]
    return files


def read_all(files):
    buf = bytearray(64 << 20)
    view = memoryview(buf)
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while f.readinto(view):
                pass


def write_floor(path, out_bytes, direct):
    """Seconds to write `out_bytes` to a new file and fsync it: through the page cache, or with
    O_DIRECT (whole 4 KiB blocks from an aligned buffer, the tail through the page cache)."""
    block = mmap.mmap(-1, 64 << 20)  # page-aligned, as O_DIRECT needs
    block.write(os.urandom(64 << 20))
    view = memoryview(block)
    started = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct else 0), 0o644)
    aligned = out_bytes // 4096 * 4096 if direct else out_bytes
    written = 0
    while written < aligned:
        written += os.write(fd, view[: min(len(block), aligned - written)])
    os.close(fd)
    fd = os.open(path, os.O_WRONLY)
    os.pwrite(fd, view[: out_bytes - written], written)
    os.fsync(fd)
    os.close(fd)
    seconds = time.perf_counter() - started
    os.remove(path)
    return seconds


def io_floor(files, out_bytes, out_dir):
    """Seconds to read `files` (warm) and to write the output: the faster of a page-cache write
    and a direct one (amalgam writes directly where the filesystem allows). Returns
    (read_s, write_s, {"page cache": s, "direct": s})."""
    read_all(files)  # warm the page cache
    started = time.perf_counter()
    read_all(files)
    read_s = time.perf_counter() - started
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "floor.bin")
    ways = {"page cache": write_floor(path, out_bytes, False)}
    try:
        ways["direct"] = write_floor(path, out_bytes, True)
    except OSError as e:  # a filesystem without O_DIRECT
        print(f"no direct write floor: {e}", flush=True)
    return read_s, min(ways.values()), ways


def measure(cmd, env=None):
    """Wall seconds, peak RSS and peak RssAnon (bytes) of one command."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak_anon = 0
    done = threading.Event()

    def sample():
        nonlocal peak_anon
        while not done.is_set():
            try:
                with open(f"/proc/{proc.pid}/status") as f:
                    for line in f:
                        if line.startswith("RssAnon:"):
                            peak_anon = max(peak_anon, int(line.split()[1]) * 1024)
            except (FileNotFoundError, ProcessLookupError):
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    stderr = proc.stderr.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - started
    done.set()
    sampler.join()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{stderr[-3000:]}")
    return wall, usage.ru_maxrss * 1024, peak_anon


def runs(cmd, out, n, env=None):
    results = []
    for _ in range(n):
        shutil.rmtree(os.path.join(ROOT, out), ignore_errors=True)
        results.append(measure(cmd, env))
    shutil.rmtree(os.path.join(ROOT, out), ignore_errors=True)
    return (statistics.median(r[0] for r in results), max(r[1] for r in results), max(r[2] for r in results),
            [round(r[0], 1) for r in results])


def amalgam_cmd(recipe_path, out, binary=AMALGAM):
    return [binary, "merge", recipe_path, out, "--force", "-q"]


def mergekit_cmd(recipe_path, out):
    return [MERGEKIT, recipe_path, out, "--no-cuda", "--no-copy-tokenizer", "--random-seed", "0"]


def dry_run_estimate(recipe_path, extra=()):
    out = subprocess.run([AMALGAM, "merge", recipe_path, "unused", "--dry-run", "--json", *extra], cwd=ROOT,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out)["peak_memory_estimate"]


def machine():
    model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    mem = next(int(l.split()[1]) * 1024 for l in open("/proc/meminfo") if l.startswith("MemTotal"))
    disk = subprocess.run(["df", "-h", "--output=source,fstype,size", ROOT], capture_output=True, text=True).stdout.splitlines()[-1]
    return f"{model}, {os.cpu_count()} cores, {mem / 2**30:.0f} GiB RAM, Linux {platform.release()}, disk `{' '.join(disk.split())}`"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--skip-mergekit", action="store_true")
    parser.add_argument("--mergekit-runs", type=int, help="runs of mergekit (default: --runs)")
    parser.add_argument("--work", default="work/bench")
    parser.add_argument("--compare", help="another amalgam binary to run beside this one")
    parser.add_argument("--compare-label", default="amalgam (previous)")
    parser.add_argument("--large", action="store_true")
    parser.add_argument("--large-layers", type=int)
    parser.add_argument("--keep", action="store_true")
    parser.add_argument("--no-scaling", action="store_true")
    args = parser.parse_args()
    work = os.path.join(ROOT, args.work)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    if args.large:
        return large(work, args)

    fam = family(work, "tinyllama", 2)
    out_bytes = sum(os.path.getsize(f) for f in inputs_of(fam, 0))
    # The disk's write speed varies from run to run: the floor is a median too.
    floors = sorted(
        (io_floor(inputs_of(fam, 2), out_bytes, os.path.join(work, "floor")) for _ in range(args.runs)),
        key=lambda f: f[0] + f[1],
    )
    read_s, write_s, ways = floors[len(floors) // 2]
    floor = read_s + write_s
    lines = [
        "# Whole-merge benchmark",
        "",
        f"Machine: {machine()}.",
        "",
        "Reproduce: `scripts/setup.sh && cargo build --release && .venv/bin/python benches/whole_merge.py` "
        f"(this run: `--runs {args.runs}{' --skip-mergekit' if args.skip_mergekit else ''}"
        f"{f' --mergekit-runs {args.mergekit_runs}' if args.mergekit_runs else ''}"
        f"{' --no-scaling' if args.no_scaling else ''}"
        f"{f' --compare BINARY`, BINARY = {args.compare_label}' if args.compare else '`'}).",
        "",
        "Inputs: TinyLlama-1.1B-shape BF16 checkpoints from `amalgam synth` (base + 2 fine-tunes, "
        f"{out_bytes / GB:.2f} GB each); page cache warm; recipes with no `dtype` (math in the inputs' BF16, "
        "as mergekit does). Times are medians of the runs; memory is the largest over the runs. "
        "amalgam's input hashes for the model card are cached after the first run (as on a user's machine).",
        "",
        f"I/O floor: read the three inputs ({3 * out_bytes / GB:.1f} GB) in {read_s:.2f} s, write "
        f"{out_bytes / GB:.1f} GB + fsync in {write_s:.2f} s (the faster way: "
        + ", ".join(f"{way} {s:.2f} s" for way, s in ways.items())
        + f"): **{floor:.2f} s** (median of {[round(f[0] + f[1], 2) for f in floors]}).",
        "",
        "| method | tool | wall s (median) | runs | peak RSS GB | peak anon GB | × floor | mergekit / amalgam |",
        "|---|---|---|---|---|---|---|---|",
    ]
    estimates = []
    for method in ["linear", "ties", "dare_ties"]:
        path = recipe(work, method, method, fam, 2)
        ours = runs(amalgam_cmd(path, f"{args.work}/out"), f"{args.work}/out", args.runs)
        estimates.append((method, dry_run_estimate(path), ours[1]))
        if args.compare:
            other = runs(amalgam_cmd(path, f"{args.work}/out", args.compare), f"{args.work}/out", args.runs)
            lines.append(f"| {method} | {args.compare_label} | {other[0]:.2f} | {other[3]} | {other[1] / GB:.2f} | {other[2] / GB:.2f} | {other[0] / floor:.1f} | |")
            print(lines[-1], flush=True)
        theirs = None if args.skip_mergekit else runs(mergekit_cmd(path, f"{args.work}/out"), f"{args.work}/out", args.mergekit_runs or args.runs, env)
        ratio = f"{theirs[0] / ours[0]:.1f}×" if theirs else "—"
        lines.append(f"| {method} | amalgam | {ours[0]:.2f} | {ours[3]} | {ours[1] / GB:.2f} | {ours[2] / GB:.2f} | {ours[0] / floor:.1f} | {ratio} |")
        if theirs:
            lines.append(f"| {method} | mergekit 0.1.5 | {theirs[0]:.2f} | {theirs[3]} | {theirs[1] / GB:.2f} | {theirs[2] / GB:.2f} | {theirs[0] / floor:.1f} | |")
        print("\n".join(lines[-(2 if theirs else 1):]), flush=True)

    if not args.no_scaling:
        lines += ["", "## Scaling (amalgam, ties density 0.5)", "",
                  "Each family's inputs are read once before its run (warm where the page cache holds them: "
                  "base + 8 is 19.8 GB).", "",
                  "| inputs | read GB | output GB | wall s | s per GB read | peak RSS GB | peak anon GB | dry-run estimate GB |",
                  "|---|---|---|---|---|---|---|---|"]
        for label, name, k, extra in [("base + 2, 22 layers", "tinyllama", 2, ()),
                                      ("base + 4, 22 layers", "tinyllama-4", 4, ()),
                                      ("base + 8, 22 layers", "tinyllama-8", 8, ())]:
            f = family(work, name, k, extra)
            path = recipe(work, f"scale-{name}", "ties", f, k)
            size = sum(os.path.getsize(x) for x in inputs_of(f, 0))
            read = sum(os.path.getsize(x) for x in inputs_of(f, k))
            read_all(inputs_of(f, k))
            wall, rss, anon, _ = runs(amalgam_cmd(path, f"{args.work}/out"), f"{args.work}/out", 1)
            lines.append(f"| {label} | {read / GB:.1f} | {size / GB:.1f} | {wall:.1f} | {wall / (read / GB):.2f} | {rss / GB:.2f} | {anon / GB:.2f} | {dry_run_estimate(path) / GB:.2f} |")
            print(lines[-1], flush=True)
            if k > 2 and not args.keep:
                shutil.rmtree(f)  # 11 and 20 GB; the base + 2 family stays for the next run

    large_json = os.path.join(ROOT, "benches", "large.json")
    if os.path.exists(large_json):
        lines += ["", *large_table(json.load(open(large_json)))]

    lines += ["", "## `--dry-run` peak-memory estimate vs measured peak RSS", "",
              "| method | estimate GB | measured GB | estimate / measured |", "|---|---|---|---|"]
    for method, estimate, measured in estimates:
        lines.append(f"| {method} | {estimate / GB:.2f} | {measured / GB:.2f} | {estimate / measured:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    notes = os.path.join(ROOT, "benches", "NOTES.md")
    if os.path.exists(notes):
        text += "\n" + open(notes).read()
    with open(os.path.join(ROOT, "benches", "RESULTS.md"), "w") as f:
        f.write(text)


def large(work, args):
    """Mistral-7B-shape base + 2: the floor, linear, TIES and DARE-TIES, once each."""
    layers = ["--layers", str(args.large_layers)] if args.large_layers else []
    fam = family(work, "mistral-7b" + (f"-{args.large_layers}l" if layers else ""), 2, layers, shape="mistral-7b")
    files = inputs_of(fam, 2)
    out_bytes = sum(os.path.getsize(f) for f in inputs_of(fam, 0))
    # The inputs exceed the page cache: every pass reads from the disk, the floor's too.
    started = time.perf_counter()
    read_all(files)
    read_s = time.perf_counter() - started
    _, write_s, _ = io_floor([], out_bytes, os.path.join(work, "floor"))
    result = {"machine": machine(), "date": time.strftime("%Y-%m-%d"),
              "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                       capture_output=True, text=True).stdout.strip(),
              "read_gb": sum(os.path.getsize(f) for f in files) / GB, "output_gb": out_bytes / GB,
              "read_s": read_s, "write_s": write_s, "methods": {},
              "layers": args.large_layers}
    # The default budget runs the two largest tensors (embedding and head, 262 MB each) one at
    # a time; an explicit one as large as half the free memory (the old default) lets them overlap.
    for method, budget in [("linear", None), ("ties", None), ("dare_ties", None), ("ties", "8GB")]:
        path = recipe(work, f"large-{method}", method, fam, 2)
        extra = ["--max-memory", budget] if budget else []
        wall, rss, anon, _ = runs(amalgam_cmd(path, f"{args.work}/out") + extra, f"{args.work}/out", 1)
        label = f"{method} --max-memory {budget}" if budget else method
        result["methods"][label] = {"wall_s": wall, "rss": rss, "anon": anon,
                                    "estimate": dry_run_estimate(path, extra)}
        print(label, result["methods"][label], flush=True)
    with open(os.path.join(ROOT, "benches", "large.json"), "w") as f:
        json.dump(result, f, indent=1)
    print("\n".join(large_table(result)))
    if not args.keep:
        shutil.rmtree(fam)


def large_table(r):
    floor = r["read_s"] + r["write_s"]
    layers = r.get("layers")
    shape = f", {layers} of its 32 layers (the disk holds no more)" if layers else ""
    command = f"--large --large-layers {layers}" if layers else "--large"
    lines = [f"## Mistral-7B shape{shape} (amalgam, base + 2, BF16)", "",
             f"Run {r['date']} at {r['commit']} by `benches/whole_merge.py {command}` on {r['machine']}. "
             f"Inputs {r['read_gb']:.1f} GB — more than the page cache holds, so the inputs come from the disk, "
             f"in the floor as in the merges. I/O floor: read {r['read_s']:.1f} s + write "
             f"{r['output_gb']:.1f} GB and fsync {r['write_s']:.1f} s = **{floor:.1f} s**.", "",
             "| method | wall s | × floor | peak RSS GB | peak anon GB | dry-run estimate GB |",
             "|---|---|---|---|---|---|"]
    for method, m in r["methods"].items():
        anon = f"{m['anon'] / GB:.2f}" if m.get("anon") else "—"
        lines.append(f"| {method} | {m['wall_s']:.1f} | {m['wall_s'] / floor:.2f} | {m['rss'] / GB:.2f} | "
                     f"{anon} | {m['estimate'] / GB:.2f} |")
    if r.get("note"):
        lines += ["", r["note"]]
    return lines


if __name__ == "__main__":
    sys.exit(main())
