"""Runs `amalgam merge RECIPE OUT` as a Ray job: one remote task per part
(`--part I/N`), then the join (`--join`) on the driver once every part is
written. The result is byte for byte what one `amalgam merge` writes.

    .venv/bin/python scripts/ray-merge.py RECIPE OUT --parts 8 [--address auto] [-- EXTRA...]

Assumes a filesystem every node shares: the `amalgam` binary (or one at the
same path on every node), the recipe, its input models (recipe paths are
relative to --cwd, the same on every node) and OUT's parent. EXTRA arguments
(`--seed 7`, `--out-shard-size 2GB`, ...) go to every `amalgam merge` call.
Without --address, Ray starts a local cluster on this machine.
"""
import argparse
import os
import subprocess
import sys

import ray

DEFAULT_AMALGAM = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "target", "release", "amalgam")


@ray.remote(num_cpus=1)
def merge_part(amalgam, cwd, recipe, out, part, parts, extra):
    """One part, on whichever node Ray picks; returns amalgam's report."""
    done = subprocess.run([amalgam, "merge", recipe, out, "--part", f"{part}/{parts}", *extra],
                          cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"part {part}/{parts} failed:\n{done.stderr}")
    return done.stdout.strip()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("recipe")
    parser.add_argument("out")
    parser.add_argument("--parts", type=int, required=True)
    parser.add_argument("--address", default=None, help="a running Ray cluster (default: start a local one)")
    parser.add_argument("--amalgam", default=DEFAULT_AMALGAM)
    parser.add_argument("--cwd", default=os.getcwd(), help="where recipe paths are relative to")
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_args(argv[:split])
    args.extra = argv[split + 1:]
    if args.parts < 1:
        parser.error("--parts must be at least 1")
    amalgam = os.path.abspath(args.amalgam)
    ray.init(address=args.address, include_dashboard=False, log_to_driver=False,
             num_cpus=None if args.address else max(os.cpu_count() or 1, args.parts))
    try:
        reports = ray.get([merge_part.remote(amalgam, args.cwd, args.recipe, args.out, i, args.parts, args.extra)
                           for i in range(1, args.parts + 1)])
    finally:
        ray.shutdown()
    for report in reports:
        if report:
            print(report)
    joined = subprocess.run([amalgam, "merge", args.recipe, args.out, "--join", *args.extra], cwd=args.cwd)
    return joined.returncode


if __name__ == "__main__":
    sys.exit(main())
