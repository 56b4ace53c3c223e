"""Oracle for `amalgam moe`.

    python moe.py compare OURS THEIRS
    python moe.py hidden-gates BASE CONFIG OURS

`compare` loads both mixtures in transformers (float32) and prints JSON:
parameters on one side only, the largest difference of the routers
(`…mlp.gate.weight`) and of everything else, and of the logits of one
sequence. `hidden-gates` computes the router rows of `gate_mode: hidden`
with transformers' own forward pass in float32, one prompt at a time (the
hidden state entering each layer at the prompt's last token, averaged over
the prompts, minus the negative prompts', normalised) and prints the largest
difference from OURS's routers.
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
import yaml  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def load(directory):
    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)


def compare(ours, theirs):
    a, b = load(ours), load(theirs)
    sa, sb = a.state_dict(), b.state_dict()
    router = other = 0.0
    for name in set(sa) & set(sb):
        diff = (sa[name] - sb[name]).abs().max().item()
        if name.endswith("mlp.gate.weight"):
            router = max(router, diff)
        else:
            other = max(other, diff)
    ids = torch.tensor([[1, 5, 6, 7, 8]])
    with torch.no_grad():
        logits = (a(ids).logits - b(ids).logits).abs().max().item()
    print(json.dumps({"only_ours": sorted(set(sa) - set(sb)), "only_theirs": sorted(set(sb) - set(sa)),
                      "router": router, "other": other, "logits": logits}))


def hidden_gates(base, config_path, ours):
    config = yaml.safe_load(open(config_path))
    model = load(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    layers = model.config.num_hidden_layers

    def vectors(prompts):
        total = 0
        for prompt in prompts:
            ids = tokenizer((tokenizer.bos_token or "") + prompt, add_special_tokens=False, return_tensors="pt")
            with torch.no_grad():
                states = model(**ids, output_hidden_states=True).hidden_states[:layers]
            total = total + torch.stack([s[0, -1] for s in states])
        return total / len(prompts)

    rows = []
    for expert in config["experts"]:
        v = vectors(expert["positive_prompts"])
        if expert.get("negative_prompts"):
            v = v - vectors(expert["negative_prompts"])
        rows.append(v / v.norm(dim=-1, keepdim=True).clamp(min=1e-8))
    expected = torch.stack(rows, dim=1)  # [layers, experts, hidden]
    state = load(ours).state_dict()
    got = torch.stack([state[f"model.layers.{i}.mlp.gate.weight"] for i in range(layers)])
    print(json.dumps({"max_abs": (got - expected).abs().max().item()}))


if sys.argv[1] == "compare":
    compare(sys.argv[2], sys.argv[3])
else:
    hidden_gates(sys.argv[2], sys.argv[3], sys.argv[4])
