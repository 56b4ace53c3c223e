"""transformers' side of the forward-throughput bench (crates/nn/benches/forward.rs
runs it in the same process tree, on the same checkpoint and token batches).

    python hf_forward.py MODEL_DIR BATCH SEQ ITERS

Prints JSON: tokens per second of LlamaForCausalLM's forward (F32, no grad,
sdpa attention), the median of ITERS timed calls after one warm-up.
"""
import json
import os
import statistics
import sys
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import LlamaForCausalLM  # noqa: E402


def main():
    model_dir, batch, seq, iters = sys.argv[1], *map(int, sys.argv[2:5])
    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32, attn_implementation="sdpa")
    model.eval()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=generator)
    times = []
    with torch.no_grad():
        model(ids)
        for _ in range(iters):
            started = time.perf_counter()
            model(ids)
            times.append(time.perf_counter() - started)
    print(json.dumps({"tokens_per_s": batch * seq / statistics.median(times), "threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()
