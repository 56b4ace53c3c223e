"""Oracle: transformers' LlamaForCausalLM (F32, eager attention) on a checkpoint.

    python hf_logits.py MODEL_DIR CASE.safetensors [TEXT]

CASE holds `ids` (int64 [batch, seq]), our `logits` and, optionally, our
residual stream `residual.{i}` before each block i. Prints JSON: the largest absolute logit
difference, the largest difference per block boundary, and the logits' scale;
with TEXT, also the ids AutoTokenizer (from MODEL_DIR's tokenizer files) gives it.
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
from transformers import AutoTokenizer, LlamaForCausalLM  # noqa: E402


def main():
    model_dir, case_path = sys.argv[1], sys.argv[2]
    case = load_file(case_path)
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="eager")
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
    report = {
        "max_logit_diff": (logits - case["logits"]).abs().max().item(),
        "max_hidden_diff": hidden,
        "logit_std": logits.std().item(),
    }
    if len(sys.argv) > 3:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        report["tokenizer_ids"] = tokenizer(sys.argv[3], add_special_tokens=False)["input_ids"]
        report["tokenizer_decoded"] = tokenizer.decode(report["tokenizer_ids"])
    print(json.dumps(report))


if __name__ == "__main__":
    main()
