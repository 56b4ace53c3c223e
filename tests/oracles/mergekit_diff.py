"""Oracle: run each recipe with mergekit (in-process, offline) and compare its
output tensors with amalgam's.

    python mergekit_diff.py CASES.json

CASES.json is a list of {"name", "recipe" (path), "ours" (amalgam's output dir)},
optionally with "lora_merge_dtype" (mergekit's --lora-merge-dtype), or with
"theirs" (a directory mergekit already wrote) instead of a recipe to run, or
with "by_token" (names of vocabulary tensors to compare row by token).
Prints one JSON object keyed by case name with, per case, the tensor names only
one side has, dtype disagreements, and the largest absolute and relative
differences (or the error mergekit raised).

A case may add "threshold_ties": {"base", "models", "density", "densities"?
(one per model), "gamma"?}: then
it also counts the entries where the outputs differ, and those of them where no
input's |delta| ties with a magnitude threshold of its own (TIES: the k-th
largest, k = density * entries; breadcrumbs, with gamma: both ends of the kept
window): where magnitudes tie at a threshold, which of the tied entries are
kept is each tool's own tie-break.
"""
import json
import os
import sys
import tempfile
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import yaml  # noqa: E402
from safetensors import safe_open  # noqa: E402
from mergekit.config import MergeConfiguration  # noqa: E402
from mergekit.merge import run_merge  # noqa: E402
from mergekit.options import MergeOptions  # noqa: E402


def load(directory):
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            with safe_open(os.path.join(directory, name), framework="pt") as f:
                for key in f.keys():
                    tensors[key] = f.get_tensor(key)
    return tensors


def compare(ours, theirs):
    report = {
        "only_ours": sorted(set(ours) - set(theirs)),
        "only_theirs": sorted(set(theirs) - set(ours)),
        "dtype_mismatch": {},
        "max_abs": 0.0,
        "max_rel": 0.0,
        "worst": None,
    }
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            report["dtype_mismatch"][name] = [str(a.dtype), list(a.shape), str(b.dtype), list(b.shape)]
            continue
        diff = (a.double() - b.double()).abs()
        worst = diff.max().item() if diff.numel() else 0.0
        rel = (diff / b.double().abs().clamp_min(1e-3)).max().item() if diff.numel() else 0.0
        if worst > report["max_abs"]:
            report["max_abs"], report["worst"] = worst, name
        report["max_rel"] = max(report["max_rel"], rel)
    return report


def by_token(ours_dir, theirs_dir, ours, theirs, names):
    """Reorders the rows of mergekit's vocabulary tensors `names` into amalgam's
    token order (a union vocabulary's ids for new tokens follow hash-map order
    in mergekit); fails unless both tokenizers hold the same tokens."""
    from tokenizers import Tokenizer

    vocab_ours = Tokenizer.from_file(os.path.join(ours_dir, "tokenizer.json")).get_vocab(True)
    vocab_theirs = Tokenizer.from_file(os.path.join(theirs_dir, "tokenizer.json")).get_vocab(True)
    if set(vocab_ours) != set(vocab_theirs):
        raise SystemExit(f"vocabularies differ: ours only {set(vocab_ours) - set(vocab_theirs)}, "
                         f"theirs only {set(vocab_theirs) - set(vocab_ours)}")
    order = [vocab_theirs[t] for t, _ in sorted(vocab_ours.items(), key=lambda e: e[1])]
    for name in names:
        rows = theirs[name]
        padding = rows[len(order):]
        theirs[name] = torch.cat([rows[order], padding])


def threshold_ties(ours, theirs, spec):
    base = load(spec["base"])
    models = [load(m) for m in spec["models"]]
    differing = unexplained = 0
    for name in sorted(set(ours) & set(theirs)):
        diff = ours[name].double() != theirs[name].double()
        if not diff.any():
            continue
        tied = torch.zeros_like(diff)
        densities = spec.get("densities") or [spec["density"]] * len(models)
        for model, density in zip(models, densities):
            magnitude = (model[name] - base[name]).abs().float().reshape(-1)
            ordered, n = torch.sort(magnitude).values, magnitude.numel()
            if spec.get("gamma") is None:  # TIES: the k largest
                bounds = [ordered[n - max(1, int(density * n))]]
            else:  # breadcrumbs: positions [bottom, bottom + target) ascending
                target, top = int(density * n), int(spec["gamma"] * n)
                bottom = max(0, n - target - top)
                bounds = [ordered[bottom], ordered[min(n, bottom + target) - 1]]
            for bound in bounds:
                tied |= (magnitude == bound).reshape(diff.shape)
        differing += int(diff.sum())
        unexplained += int((diff & ~tied).sum())
    return {"differing": differing, "unexplained": unexplained}


def main():
    cases = json.load(open(sys.argv[1]))
    results = {}
    for case in cases:
        if "theirs" in case:  # mergekit already ran (mergekit-multi, say)
            results[case["name"]] = report(case, case["theirs"])
            continue
        with open(case["recipe"]) as f:
            config = MergeConfiguration.model_validate(yaml.safe_load(f))
        with tempfile.TemporaryDirectory() as out, tempfile.TemporaryDirectory() as lora_cache:
            try:
                # LoRA inputs (`BASE+ADAPTER`) are merged by mergekit into a cache first.
                options = MergeOptions(
                    copy_tokenizer=False, write_model_card=False, quiet=True, random_seed=0,
                    lora_merge_cache=lora_cache,
                    lora_merge_dtype=case.get("lora_merge_dtype"),
                )
                run_merge(config, out, options=options)
            except Exception as e:  # reported, not raised: the Rust test decides
                results[case["name"]] = {"error": f"{type(e).__name__}: {e}"}
                continue
            results[case["name"]] = report(case, out)
    print(json.dumps(results))


def report(case, out):
    ours, theirs = load(case["ours"]), load(out)
    if case.get("by_token"):
        by_token(case["ours"], out, ours, theirs, case["by_token"])
    result = compare(ours, theirs)
    if "threshold_ties" in case:
        result["threshold_ties"] = threshold_ties(ours, theirs, case["threshold_ties"])
    with open(os.path.join(out, "config.json")) as f:
        result["num_hidden_layers"] = json.load(f).get("num_hidden_layers")
    return result


if __name__ == "__main__":
    main()
