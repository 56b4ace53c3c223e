"""Makes PEFT LoRA adapters for a base model and peft's own merged model for each.

    python lora_adapters.py BASE OUT_DIR

Writes OUT_DIR/plain (r 4, alpha 8, q/v projections and the embedding, the
head as a module to save) and OUT_DIR/rslora (rsLoRA, r 8, alpha 16, an
alpha_pattern for one layer, gate/down projections, in the base's dtype
bfloat16 when the base is), each with random A and B, and next to each,
OUT_DIR/NAME-merged: peft's merge_and_unload of the adapter into the base.
"""
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from peft import LoraConfig, PeftModel, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

base_dir, out = sys.argv[1], sys.argv[2]
configs = {
    "plain": LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens"],
        modules_to_save=["lm_head"],
    ),
    "rslora": LoraConfig(
        r=8, lora_alpha=16, use_rslora=True, target_modules=["gate_proj", "down_proj"],
        alpha_pattern={"model.layers.1.mlp.down_proj": 4},
    ),
}
generator = torch.Generator().manual_seed(11)
for name, config in configs.items():
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for key, weight in peft_model.named_parameters():
            if "lora_" in key or "modules_to_save" in key:
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.05)
    adapter = os.path.join(out, name)
    peft_model.save_pretrained(adapter)
    fresh = AutoModelForCausalLM.from_pretrained(base_dir, dtype="auto")
    merged = PeftModel.from_pretrained(fresh, adapter).merge_and_unload()
    merged.save_pretrained(os.path.join(out, name + "-merged"))
