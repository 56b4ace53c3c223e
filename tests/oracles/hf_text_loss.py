"""Oracle for `amalgam eval --text`: transformers' own tokenizer and forward
pass on the same windows (non-overlapping, each window's last token the
next one's first), float32.

    python hf_text_loss.py MODEL_DIR TEXT_FILE SEQ_LEN MAX_WINDOWS

Prints JSON: mean next-token cross-entropy, accuracy and predicted tokens.
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

directory, text_file = sys.argv[1], sys.argv[2]
seq_len, max_windows = int(sys.argv[3]), int(sys.argv[4])
tokenizer = AutoTokenizer.from_pretrained(directory)
model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
ids = tokenizer(open(text_file, encoding="utf-8").read())["input_ids"]
windows = [ids[s:s + seq_len] for s in range(0, len(ids) - seq_len + 1, seq_len - 1)][:max_windows]
loss_sum, correct, count = 0.0, 0, 0
with torch.no_grad():
    for window in windows:
        x = torch.tensor([window])
        logits = model(x[:, :-1]).logits[0]
        targets = x[0, 1:]
        loss_sum += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        correct += (logits.argmax(-1) == targets).sum().item()
        count += targets.numel()
print(json.dumps({"loss": loss_sum / count, "accuracy": correct / count, "tokens": count}))
