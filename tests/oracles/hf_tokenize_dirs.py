"""Oracle: for each model directory of SPEC.json, the tokenizer class
transformers' AutoTokenizer picks and the ids it gives each text, with and
without special tokens.

    python hf_tokenize_dirs.py SPEC.json

SPEC.json: {"dirs": [DIR, ...], "texts": [TEXT, ...]}. Prints
{DIR: {"class": NAME, "with": [[id, ...], ...], "without": [[id, ...], ...]}}.
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from transformers import AutoTokenizer  # noqa: E402

spec = json.load(open(sys.argv[1]))
result = {}
for directory in spec["dirs"]:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    result[directory] = {
        "class": type(tokenizer).__name__,
        "with": [tokenizer(text)["input_ids"] for text in spec["texts"]],
        "without": [tokenizer(text, add_special_tokens=False)["input_ids"] for text in spec["texts"]],
    }
print(json.dumps(result))
