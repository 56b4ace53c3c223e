"""transformers' side of the forward-throughput bench (crates/nn/benches/forward.rs
runs it in the same process tree, on the same checkpoint and token batches).

    python hf_forward.py MODEL_DIR BATCH SEQ ITERS
    python hf_forward.py --build-qwen2-0.5b OUT

Prints JSON: tokens per second of the checkpoint's causal LM forward (F32,
no grad, sdpa attention), the median of ITERS timed calls after one warm-up.
`--build-qwen2-0.5b` saves a random-weight model of Qwen2.5-0.5B's published
shape (896 hidden, 24 layers, 14/2 heads, FFN 4864, 151,936 tokens, tied).
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
from transformers import AutoModelForCausalLM, Qwen2Config  # noqa: E402


def build_qwen2(out):
    config = Qwen2Config(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    print(json.dumps({"parameters": sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(out).parameters())}))


def main():
    if sys.argv[1] == "--build-qwen2-0.5b":
        return build_qwen2(sys.argv[2])
    model_dir, batch, seq, iters = sys.argv[1], *map(int, sys.argv[2:5])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa")
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
