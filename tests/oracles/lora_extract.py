"""Oracle for extracted LoRA adapters.

    python lora_extract.py compare OURS THEIRS   # two adapter directories
    python lora_extract.py apply BASE ADAPTER OUT

`compare` prints JSON: tensor names on one side only, the largest absolute
difference of same-named tensors, and the adapter_config.json keys whose
values differ (target_modules compared as a set). `apply` merges the adapter
into the base with peft's merge_and_unload and saves the model to OUT.
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from safetensors.torch import load_file  # noqa: E402


def compare(ours_dir, theirs_dir):
    ours = load_file(os.path.join(ours_dir, "adapter_model.safetensors"))
    theirs = load_file(os.path.join(theirs_dir, "adapter_model.safetensors"))
    max_abs = 0.0
    for name in set(ours) & set(theirs):
        if ours[name].shape != theirs[name].shape:
            max_abs = float("inf")
            continue
        max_abs = max(max_abs, (ours[name].double() - theirs[name].double()).abs().max().item())
    config_ours = json.load(open(os.path.join(ours_dir, "adapter_config.json")))
    config_theirs = json.load(open(os.path.join(theirs_dir, "adapter_config.json")))
    differing = []
    for key, value in config_theirs.items():
        mine = config_ours.get(key)
        if key in ("target_modules", "modules_to_save"):
            mine, value = sorted(mine or []), sorted(value or [])
        if mine != value:
            differing.append(key)
    print(json.dumps({
        "only_ours": sorted(set(ours) - set(theirs)),
        "only_theirs": sorted(set(theirs) - set(ours)),
        "max_abs": max_abs,
        "config_differs": differing,
    }))


def apply(base, adapter, out):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype="auto")
    PeftModel.from_pretrained(model, adapter).merge_and_unload().save_pretrained(out)


if sys.argv[1] == "compare":
    compare(sys.argv[2], sys.argv[3])
else:
    apply(sys.argv[2], sys.argv[3], sys.argv[4])
