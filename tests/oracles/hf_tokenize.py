"""Oracle: the ids transformers' AutoTokenizer gives (special tokens added as
the tokenizer adds them) for each text of TEXTS.json, a list of strings.

    python hf_tokenize.py TOKENIZER_DIR TEXTS.json
"""
import json
import os
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
warnings.filterwarnings("ignore")

from transformers import AutoTokenizer  # noqa: E402

tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
texts = json.load(open(sys.argv[2]))
print(json.dumps([tokenizer(text)["input_ids"] for text in texts]))
