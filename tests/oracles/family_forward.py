"""Oracle: random-weight checkpoints of every decoder family amalgam runs,
built by transformers itself from published models' configs scaled down
(same head-layout ratios, GQA, tying, RoPE scaling, norms, soft caps; sliding
windows shrunk so they bite on short sequences), and transformers' own
forward pass on them.

    python family_forward.py OUT [CASE...]

For each case, OUT/CASE/ holds:
  model/           the checkpoint as transformers 5 saves it (F32)
  legacy/          the same weights with the config in the pre-`rope_parameters`
                   style published checkpoints carry (rope_theta, rope_scaling,
                   rotary_pct, sliding_window_pattern, no layer_types) — checked
                   here to give transformers the same logits
  bf16/            the weights rounded to BF16, saved as BF16
  expected.safetensors  ids, logits and hidden.{i} (the residual stream
                   entering block i) of model/; bf16_logits_f32 (bf16/ computed
                   in F32) and bf16_logits (bf16/ computed in BF16)
Prints a JSON list of the cases written.
"""
import json
import os
import shutil
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

VOCAB = 96

# Published configs (the real model named), scaled down: widths divided,
# layer counts cut, ratios and every family feature kept.
CASES = {
    # Llama 3.2 1B: GQA 4:1, tied, llama3 RoPE scaling.
    "llama": dict(
        model_type="llama", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        intermediate_size=256, num_hidden_layers=3, rms_norm_eps=1e-5, tie_word_embeddings=True,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                          original_max_position_embeddings=16),
    ),
    # Mistral 7B v0.1: GQA 4:1, untied, sliding window on every layer.
    "mistral": dict(
        model_type="mistral", hidden_size=64, num_attention_heads=8, num_key_value_heads=2, head_dim=8,
        intermediate_size=224, num_hidden_layers=3, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=8,
    ),
    # Qwen2.5 0.5B: GQA 7:1, q/k/v biases, tied, θ 1e6, sliding window off.
    "qwen2": dict(
        model_type="qwen2", hidden_size=56, num_attention_heads=7, num_key_value_heads=1,
        intermediate_size=304, num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0, use_sliding_window=False, sliding_window=32768, max_window_layers=21,
    ),
    # Qwen3 0.6B: head_dim 128 with 16 heads over a 1024 hidden (heads·hd ≠ hidden), q/k norms, tied.
    "qwen3": dict(
        model_type="qwen3", hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=96, num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_theta=1000000.0,
    ),
    # Gemma 2B: multi-query (8:1), head_dim 256, GeGLU (published as legacy `gelu`), tied.
    "gemma": dict(
        model_type="gemma", hidden_size=32, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
        intermediate_size=256, num_hidden_layers=3, rms_norm_eps=1e-6, hidden_act="gelu",
        rope_theta=10000.0,
    ),
    # Gemma 2 9B: GQA 2:1, query_pre_attn_scalar ≠ head_dim, soft caps, sliding/global alternation.
    "gemma2": dict(
        model_type="gemma2", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=192, num_hidden_layers=4, rms_norm_eps=1e-6, query_pre_attn_scalar=12,
        attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=8,
        rope_theta=10000.0,
    ),
    # Gemma 3 4B text: GQA 2:1, q/k norms, 5 sliding : 1 global, local θ 1e4, global θ 1e6 with linear ×8.
    "gemma3_text": dict(
        model_type="gemma3_text", hidden_size=48, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, intermediate_size=192, num_hidden_layers=6, rms_norm_eps=1e-6,
        query_pre_attn_scalar=16, sliding_window=8, sliding_window_pattern=6,
        rope_theta=1000000.0, rope_local_base_freq=10000.0,
        rope_scaling=dict(rope_type="linear", factor=8.0),
    ),
    # Phi-3 mini 4k: fused qkv_proj and gate_up_proj, MHA, untied, sliding window 2047.
    "phi3": dict(
        model_type="phi3", hidden_size=64, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=176, num_hidden_layers=3, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_theta=10000.0, sliding_window=7, pad_token_id=0,
    ),
    # Pythia 160M: LayerNorm with bias, parallel residual, 25% rotary, fused per-head q/k/v, untied.
    "gpt_neox": dict(
        model_type="gpt_neox", hidden_size=48, num_attention_heads=6, intermediate_size=192,
        num_hidden_layers=3, layer_norm_eps=1e-5, rotary_pct=0.25, rotary_emb_base=10000,
        use_parallel_residual=True, tie_word_embeddings=False, hidden_act="gelu",
    ),
    # The same without the parallel residual (GPT-NeoX's sequential form).
    "gpt_neox_sequential": dict(
        model_type="gpt_neox", hidden_size=48, num_attention_heads=6, intermediate_size=192,
        num_hidden_layers=3, layer_norm_eps=1e-5, rotary_pct=0.5, rotary_emb_base=10000,
        use_parallel_residual=False, tie_word_embeddings=False, hidden_act="gelu",
    ),
    # OLMo 2 1B: post-norms only, q/k norms over all heads, θ 5e5, untied.
    "olmo2": dict(
        model_type="olmo2", hidden_size=64, num_attention_heads=8, num_key_value_heads=8,
        intermediate_size=256, num_hidden_layers=3, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_theta=500000.0,
    ),
    # StarCoder2 3B: LayerNorm with bias, ungated GELU-tanh MLP, biases everywhere, GQA (12:1
    # there, 3:1 here), θ ≈ 1e6, a sliding window on every layer, tied.
    "starcoder2": dict(
        model_type="starcoder2", hidden_size=48, num_attention_heads=6, num_key_value_heads=2,
        intermediate_size=192, num_hidden_layers=3, norm_epsilon=1e-5, use_bias=True,
        tie_word_embeddings=True, rope_theta=999999.4420358813, sliding_window=8,
        hidden_act="gelu_pytorch_tanh",
    ),
}

UNIT_OFFSET_NORMS = ("gemma", "gemma2", "gemma3_text")


def legacy_config(config):
    """The config in the style published checkpoints carry: RoPE in the old
    keys, no `layer_types` where the family derives them."""
    c = dict(config)
    rope = c.pop("rope_parameters", None)
    if rope is None:
        return c
    nested = "full_attention" in rope
    main = dict(rope["full_attention"] if nested else rope)
    theta = main.pop("rope_theta")
    partial = main.pop("partial_rotary_factor", None)
    if c["model_type"] == "gpt_neox":
        c["rotary_emb_base"] = theta
        c["rotary_pct"] = partial
    else:
        c["rope_theta"] = theta
        if partial is not None:
            c["partial_rotary_factor"] = partial
    if main.get("rope_type", "default") != "default":
        c["rope_scaling"] = main
    if nested:
        c["rope_local_base_freq"] = rope["sliding_attention"]["rope_theta"]
    if c["model_type"] == "gemma3_text":
        c["sliding_window_pattern"] = c.pop("_sliding_window_pattern", 6)
    if c["model_type"] in ("gemma2", "gemma3_text", "qwen2", "qwen3"):
        c.pop("layer_types", None)
    return c


def randomize(model, family):
    """Weights large enough that every part moves the logits; norms around
    their identity (0 where the norm adds 1)."""
    generator = torch.Generator().manual_seed(sum(map(ord, family)))
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if "norm" in name and name.endswith("weight"):
                identity = 0.0 if family in UNIT_OFFSET_NORMS else 1.0
                p.copy_(identity + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def run(model, ids):
    with torch.no_grad():
        return model(ids, output_hidden_states=True)


def load(path, dtype):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=dtype).eval()


def build(name, spec, out):
    spec = dict(spec)
    family = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, max_position_embeddings=256, **spec)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    randomize(model, family)
    case = os.path.join(out, name)
    shutil.rmtree(case, ignore_errors=True)
    model.save_pretrained(os.path.join(case, "model"))

    generator = torch.Generator().manual_seed(7)
    ids = torch.randint(0, VOCAB, (2, 24), generator=generator)
    reference = run(load(os.path.join(case, "model"), torch.float32), ids)
    tensors = {"ids": ids, "logits": reference.logits.float().contiguous()}
    layers = config.num_hidden_layers
    for i in range(layers):
        tensors[f"hidden.{i}"] = reference.hidden_states[i].float().contiguous()

    legacy = os.path.join(case, "legacy")
    shutil.copytree(os.path.join(case, "model"), legacy)
    with open(os.path.join(legacy, "config.json")) as f:
        written = json.load(f)
    with open(os.path.join(legacy, "config.json"), "w") as f:
        json.dump(legacy_config(written), f, indent=2)
    legacy_logits = run(load(legacy, torch.float32), ids).logits
    if not torch.equal(legacy_logits, reference.logits):
        raise SystemExit(f"{name}: the legacy-style config changes transformers' logits")

    load(os.path.join(case, "model"), torch.bfloat16).save_pretrained(os.path.join(case, "bf16"))
    tensors["bf16_logits_f32"] = run(load(os.path.join(case, "bf16"), torch.float32), ids).logits.contiguous()
    tensors["bf16_logits"] = run(load(os.path.join(case, "bf16"), torch.bfloat16), ids).logits.float().contiguous()
    save_file(tensors, os.path.join(case, "expected.safetensors"))


def main():
    out = sys.argv[1]
    names = sys.argv[2:] or list(CASES)
    torch.manual_seed(0)
    for name in names:
        build(name, CASES[name], out)
    print(json.dumps(names))


if __name__ == "__main__":
    main()
