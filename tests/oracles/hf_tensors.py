"""Oracle: what transformers and Python safetensors see in a checkpoint directory.

Prints JSON with, for each library, every tensor's dtype, shape and SHA-256 of
its little-endian bytes, and transformers' parameter count. Used by the Rust
tests to check amalgam's reading and writing against the reference libraries.

    python hf_tensors.py DIR...          # load weights with both libraries
    python hf_tensors.py --meta DIR...   # only count parameters from config.json (no weights read)

Output: one JSON object keyed by DIR.
"""
import hashlib
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from transformers import AutoConfig, AutoModelForCausalLM  # noqa: E402


def digest(t: torch.Tensor) -> dict:
    t = t.detach().contiguous().cpu()
    raw = t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return {
        "dtype": str(t.dtype).removeprefix("torch."),
        "shape": list(t.shape),
        "sha256": hashlib.sha256(raw).hexdigest(),
    }


def report(directory: str, meta: bool) -> dict:
    if meta:
        config = AutoConfig.from_pretrained(directory)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        return {"parameters": model.num_parameters()}

    model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
    out = {
        "parameters": model.num_parameters(),
        "transformers": {k: digest(v) for k, v in model.state_dict().items()},
        "safetensors": {},
    }
    files = sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))
    for name in files:
        with safe_open(os.path.join(directory, name), framework="pt") as f:
            for key in f.keys():
                out["safetensors"][key] = digest(f.get_tensor(key))
    return out


def main() -> None:
    meta = "--meta" in sys.argv[1:]
    dirs = [a for a in sys.argv[1:] if a != "--meta"]
    print(json.dumps({d: report(d, meta) for d in dirs}))


if __name__ == "__main__":
    main()
