"""Oracle for `amalgam eval --text`: transformers' own tokenizer and forward
pass, float32, on documents cut into windows the way lm-evaluation-harness's
rolling log-likelihood cuts them (every token scored once; the first window
predicts from BOS, or EOS without one; each later window predicts up to
MAX_LEN - CONTEXT + 1 new tokens from an input of MAX_LEN tokens ending just
before its last prediction), written here from that description.

    python hf_text_loss.py MODEL_DIR FILE MAX_LEN CONTEXT [FIELD]

A `.jsonl` FILE holds one document per line (the string at FIELD); any other
file is one document. Prints JSON: mean next-token cross-entropy, accuracy,
predicted tokens, UTF-8 bytes and bits per byte.
"""
import json
import math
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402


def documents(path, field):
    text = open(path, encoding="utf-8").read()
    if not path.endswith(".jsonl"):
        return [text]
    return [json.loads(line)[field] for line in text.splitlines() if line.strip()]


def pairs(tokens, prefix, max_len, context):
    """(input, the tokens its last positions predict) for each window."""
    if not tokens:
        return []
    step = max_len - context + 1
    first = min(max_len, len(tokens))
    out = [([prefix] + tokens[: first - 1], tokens[:first])]
    done = first
    while done < len(tokens):
        end = min(done + step, len(tokens))
        # The input ends just before the last predicted token.
        out.append((tokens[end - 1 - max_len: end - 1], tokens[done:end]))
        done = end
    return out


def main():
    directory, path = sys.argv[1], sys.argv[2]
    max_len, context = int(sys.argv[3]), int(sys.argv[4])
    field = sys.argv[5] if len(sys.argv) > 5 else "text"
    tokenizer = AutoTokenizer.from_pretrained(directory)
    prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    nll, correct, count, size = 0.0, 0, 0, 0
    with torch.no_grad():
        for doc in documents(path, field):
            size += len(doc.encode("utf-8"))
            tokens = tokenizer(doc, add_special_tokens=False)["input_ids"]
            for inputs, predicted in pairs(tokens, prefix, max_len, context):
                logits = model(torch.tensor([inputs])).logits[0, -len(predicted):]
                targets = torch.tensor(predicted)
                nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
                correct += (logits.argmax(-1) == targets).sum().item()
                count += len(predicted)
    print(json.dumps({
        "loss": nll / count, "accuracy": correct / count, "tokens": count, "bytes": size,
        "bits_per_byte": nll / (size * math.log(2)),
    }))


if __name__ == "__main__":
    main()
