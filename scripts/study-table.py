"""Formats scripts/study-table.sh's evaluation (OUT/eval.json) as the book's
merging-study tables (Markdown on stdout; the script writes them to
docs/src/results/study-SIZE.md).

    python scripts/study-table.py work/study/small

Normalised performance: for each held-in domain, the share of its expert's
loss reduction over the base that a model keeps, (L_base - L_model) /
(L_base - L_expert), averaged over the held-in domains (1 = every expert's
gain, 0 = the base, negative = worse than the base).
"""

import json
import os
import re
import sys

EXPERTS = ["german", "c", "spanish", "perl"]
HELD_OUT = ["italian", "cpp"]
METHODS = [
    ("linear", "linear (the experts' average)"),
    ("task_arithmetic", "task arithmetic"),
    ("ties", "TIES"),
    ("dare_ties", "DARE-TIES (seed 0)"),
]


def main():
    out = sys.argv[1]
    zoo = os.path.join("work", "zoo", os.path.basename(os.path.normpath(out)))
    scores = {}
    for entry in json.load(open(os.path.join(out, "eval.json"))):
        scores[entry["model"]] = {d["domain"]: d["loss"] for d in entry["domains"]}

    def settings(path):
        """The tuned values of a best.yml, as `name value` pairs (TIES and
        DARE-TIES tune density and lambda, their weight stays 1)."""
        text = open(path).read()
        line = next(l for l in text.splitlines() if l.startswith("parameters:"))
        pairs = re.findall(r"(\w+): ([0-9.]+)", line)
        return ", ".join(f"{n} {v}" for n, v in pairs if n != "weight" or "density" not in line)

    def row(label, model, base, experts, k):
        s = scores[model]
        held_in = EXPERTS[:k]
        mean_in = sum(s[d] for d in held_in) / k
        gains = [(scores[base][d] - s[d]) / (scores[base][d] - scores[experts[d]][d]) for d in held_in]
        mean_out = sum(s[d] for d in HELD_OUT) / len(HELD_OUT)
        cells = [f"{s[d]:.4f}" for d in held_in]
        cells += [f"{mean_in:.4f}", f"{sum(gains) / k:.2f}"]
        cells += [f"{s[d]:.4f}" for d in HELD_OUT] + [f"{mean_out:.4f}"]
        return mean_in, sum(gains) / k, mean_out, f"| {label} | " + " | ".join(cells) + " |"

    summary = {}
    bases = [("base-short", "short-study-"), ("base", "study-"), ("base-long", "long-study-")]
    for base, prefix in bases:
        base_dir = os.path.join(zoo, base)
        experts = {d: os.path.join(zoo, prefix + d) for d in EXPERTS}
        for k in (2, 3, 4):
            held_in = EXPERTS[:k]
            merged = os.path.join(out, base, f"k{k}")
            rows = [row(f"`{base}`", base_dir, base_dir, experts, k)]
            for d in held_in:
                rows.append(row(f"`{prefix}{d}`", experts[d], base_dir, experts, k))
            if base == "base":
                multitask = os.path.join(zoo, f"multitask-{k}")
                rows.append(row(f"`multitask-{k}` (all {k} domains)", multitask, base_dir, experts, k))
            for method, label in METHODS:
                if method == "linear":
                    rows.append(row(label, os.path.join(merged, method), base_dir, experts, k))
                    summary[(base, k, method)] = rows[-1]
                    continue
                default = "weight 0.5" if method == "task_arithmetic" else "density 0.5, lambda 1"
                rows.append(row(f"{label}, defaults ({default})", os.path.join(merged, method), base_dir, experts, k))
                tuned = settings(os.path.join(merged, f"{method}-tune", "best.yml"))
                rows.append(row(f"{label}, tuned ({tuned})", os.path.join(merged, f"{method}-tuned"), base_dir, experts, k))
                summary[(base, k, method)] = rows[-1]
            summary[(base, k, "base")] = rows[0]
            if base != "base":
                continue
            print(f"#### {k} experts ({', '.join(held_in)}) from `base`\n")
            head = [f"{d} loss" for d in held_in] + ["held-in mean", "normalised"]
            head += [f"{d} loss" for d in HELD_OUT] + ["held-out mean"]
            print("| model | " + " | ".join(head) + " |")
            print("|---|" + "---|" * len(head))
            for r in rows:
                print(r[3])
            print()

    general = {}
    for entry in json.load(open(os.path.join(out, "eval-general.json"))):
        losses = [d["loss"] for d in entry["domains"]]
        general[os.path.basename(entry["model"])] = sum(losses) / len(losses)
    names = " / ".join(b for b, _ in bases)
    print(f"#### Weaker and stronger bases: {names} (tuned merges)\n")
    print(
        "Mean loss on the general domains (prose, code, legal), where the bases trained: "
        + ", ".join(f"`{b}` {general[b]:.4f}" for b, _ in bases)
        + ".\n"
    )
    print(f"| experts | model | held-in mean ({names}) | normalised ({names}) | held-out mean ({names}) |")
    print("|---|---|---|---|---|")
    for k in (2, 3, 4):
        for method, label in [("base", "the base itself")] + METHODS:
            r = [summary[(b, k, method)] for b, _ in bases]
            held_in = " / ".join(f"{x[0]:.4f}" for x in r)
            norm = "—" if method == "base" else " / ".join(f"{x[1]:.2f}" for x in r)
            held_out = " / ".join(f"{x[2]:.4f}" for x in r)
            print(f"| {k} | {label} | {held_in} | {norm} | {held_out} |")


if __name__ == "__main__":
    main()
