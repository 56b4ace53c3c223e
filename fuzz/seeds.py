"""Writes the committed seed corpora and dictionaries under fuzz/ (run with
the project venv's Python: .venv/bin/python fuzz/seeds.py). Seeds are small,
valid inputs of every kind a target reads, made by the reference libraries
(safetensors, torch) where there is one, so the fuzzer starts from files a
real tool writes. Deterministic: running it again rewrites the same bytes."""
import json
import pathlib
import shutil

import torch
from safetensors.torch import save

root = pathlib.Path(__file__).resolve().parent
project = root.parent


def corpus(target):
    d = root / "corpus" / target
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True)
    return d


# checkpoint: first byte even = model.safetensors, odd = index JSON (the
# harness's tiny model: 4 layers, hidden 64, vocab 384, untied, F32).
d = corpus("checkpoint")
g = torch.Generator().manual_seed(0)
small = {
    "model.embed_tokens.weight": torch.randn(4, 2, generator=g),
    "model.layers.0.mlp.down_proj.weight": torch.randn(2, 3, generator=g).to(torch.bfloat16),
    "model.norm.weight": torch.ones(2, dtype=torch.float16),
}
(d / "single-mixed").write_bytes(b"\x00" + save(small, metadata={"format": "pt"}))
odd = {
    "a": torch.arange(6, dtype=torch.float64).reshape(2, 3),
    "b": torch.tensor([1, 2, 3], dtype=torch.int64),
    "c": torch.tensor([True, False]),
    "d": torch.zeros(0, 3),
    "e": torch.tensor(7, dtype=torch.uint8),
}
(d / "single-odd-dtypes").write_bytes(b"\x00" + save(odd))
(d / "single-empty").write_bytes(b"\x00" + save({}))
names = ["model.embed_tokens.weight"]
for layer in range(4):
    for part in ["input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                 "self_attn.o_proj", "post_attention_layernorm", "mlp.gate_proj", "mlp.up_proj",
                 "mlp.down_proj"]:
        names.append(f"model.layers.{layer}.{part}.weight")
names += ["model.norm.weight", "lm_head.weight"]
# Shard placement is the harness's (200 KB shards, largest-first order does
# not apply: tensors in plan order); a wrong placement is itself a good seed.
index = {"metadata": {"total_size": 885248}, "weight_map": {n: "model-00001-of-00005.safetensors" for n in names}}
(d / "index-one-shard").write_bytes(b"\x01" + json.dumps(index, indent=2).encode())
(d / "index-empty").write_bytes(b"\x01" + b'{"weight_map": {}}')

# config: config.json beside the tiny model's weights.
d = corpus("config")
llama = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 384,
    "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 4,
    "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "rope_scaling": None,
    "tie_word_embeddings": False, "max_position_embeddings": 2048, "torch_dtype": "float32",
}
variants = {
    "llama": llama,
    "llama3-rope": {**llama, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                    "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 8192}},
    "per-layer-widths": {**llama, "intermediate_size": [160, 80, 40, 160],
                         "layer_types": ["full_attention", "sliding_attention"] * 2},
    "tied": {**llama, "tie_word_embeddings": True},
    "gemma3n-text": {"model_type": "gemma3n_text", "architectures": ["Gemma3nForCausalLM"],
                     "vocab_size": 384, "hidden_size": 64, "intermediate_size": [160] * 4,
                     "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
                     "head_dim": 16, "num_kv_shared_layers": 2,
                     "layer_types": ["sliding_attention", "full_attention"] * 2,
                     "activation_sparsity_pattern": [0.95, 0.95, 0.0, 0.0],
                     "hidden_size_per_layer_input": 8, "vocab_size_per_layer_input": 384},
    "multimodal": {"model_type": "gemma3n", "architectures": ["Gemma3nForConditionalGeneration"],
                   "text_config": {"model_type": "gemma3n_text", "vocab_size": 384,
                                   "hidden_size": 64, "num_hidden_layers": 4,
                                   "intermediate_size": [160] * 4}},
}
for name, config in variants.items():
    (d / name).write_bytes(json.dumps(config, indent=2).encode())

# recipe: every recipe the project ships.
d = corpus("recipe")
for path in sorted((project / "recipes").rglob("*.yml")):
    (d / "-".join(path.relative_to(project / "recipes").parts)).write_bytes(path.read_bytes())

# slicing_table: the row to look up, then the table (Google's format).
d = corpus("slicing_table")
table = ("name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n"
         "Main model,3,1.0,50%,\"[2_048 * 8, 2_048 * 8, 16384]\",\n"
         "Config for small,2,0.5,40%,\"[2_048 * 4, 96]\",\"[1]\"\n")
(d / "main").write_bytes(b"Main model\n" + table.encode())
(d / "small").write_bytes(b"Config for small\n" + table.encode())
(d / "missing").write_bytes(b"E9B\n" + table.encode())
print("seeds written under", root / "corpus")
