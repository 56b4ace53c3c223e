"""Builds a tiny random model of a transformers family and saves it as a
Hugging Face checkpoint (safetensors): what amalgam's tests merge when they
need a family other than its own synthetic Llama, made by the reference
implementation itself.

    python tiny_models.py FAMILY OUT [--seed N] [--layers N]

FAMILY: a model_type transformers knows (gpt2, gpt_neox, bert, t5, qwen2,
qwen3, gemma2, gemma3_text, olmo2, phi3, stablelm, starcoder2, mistral, mixtral, llama).
"""
import argparse
import os
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import transformers  # noqa: E402


def config(family, layers):
    if family == "gpt2":
        return transformers.GPT2Config(n_layer=layers, n_embd=32, n_head=2, vocab_size=96, n_positions=64)
    if family == "t5":
        return transformers.T5Config(
            num_layers=layers, num_decoder_layers=layers, d_model=32, d_kv=8, d_ff=64, num_heads=4,
            vocab_size=96, feed_forward_proj="gated-gelu",
        )
    if family == "bert":
        return transformers.BertConfig(
            num_hidden_layers=layers, hidden_size=32, num_attention_heads=2, intermediate_size=64,
            vocab_size=96, max_position_embeddings=64,
        )
    common = dict(
        num_hidden_layers=layers, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
        intermediate_size=64, vocab_size=96, max_position_embeddings=64,
    )
    if family == "gpt_neox":
        common.pop("num_key_value_heads")
    if family in ("qwen3", "gemma2", "gemma3_text"):
        common["head_dim"] = 8
    if family in ("qwen2", "qwen3"):
        # Sliding attention on some layers: a per-layer `layer_types` list.
        common.update(use_sliding_window=True, sliding_window=16, max_window_layers=1)
    if family == "phi3":
        common["pad_token_id"] = 0
    if family == "mixtral":
        common.update(num_local_experts=4, num_experts_per_tok=2)
    return transformers.AutoConfig.for_model(family, **common)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("family")
    parser.add_argument("out")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--layers", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    c = config(args.family, args.layers)
    classes = {"bert": transformers.BertModel, "t5": transformers.T5ForConditionalGeneration}
    model = classes[args.family](c) if args.family in classes else transformers.AutoModelForCausalLM.from_config(c)
    with torch.no_grad():
        for p in model.parameters():  # distinct values everywhere, norms included
            p.normal_(0.0, 0.5)
    model.save_pretrained(args.out)


if __name__ == "__main__":
    main()
