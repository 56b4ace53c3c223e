"""Oracle: transformers' causal LM of any family (F32, eager attention) on a checkpoint.

    python hf_logits.py MODEL_DIR CASE.safetensors [TEXT]
    python hf_logits.py --many MODEL_DIR CASE.safetensors [MODEL_DIR CASE.safetensors ...]

CASE holds `ids` (int64 [batch, seq]), our `logits` and, optionally, our
residual stream `residual.{i}` before each block i. Prints JSON: the largest absolute logit
difference, the largest difference per block boundary, and the logits' spread
and largest magnitude; with TEXT, also the ids AutoTokenizer (from MODEL_DIR's
tokenizer files) gives it; with --many, a JSON list of reports, one per pair.
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def report(model_dir, case_path):
    case = load_file(case_path)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model(case["ids"], output_hidden_states=True)
    logits = out.logits.float()
    layers = model.config.num_hidden_layers
    hidden = [
        (out.hidden_states[i] - case[f"residual.{i}"]).abs().max().item()
        for i in range(layers)
        if f"residual.{i}" in case
    ]
    return {
        "max_logit_diff": (logits - case["logits"]).abs().max().item(),
        "max_hidden_diff": hidden,
        "logit_std": logits.std().item(),
        "logit_scale": logits.abs().max().item(),
    }


def main():
    if sys.argv[1] == "--many":
        pairs = sys.argv[2:]
        print(json.dumps([report(m, c) for m, c in zip(pairs[::2], pairs[1::2])]))
        return
    model_dir = sys.argv[1]
    result = report(model_dir, sys.argv[2])
    if len(sys.argv) > 3:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        result["tokenizer_ids"] = tokenizer(sys.argv[3], add_special_tokens=False)["input_ids"]
        result["tokenizer_decoded"] = tokenizer.decode(result["tokenizer_ids"])
    print(json.dumps(result))


if __name__ == "__main__":
    main()
