"""Renders fixed conversations with the chat template of each output directory
(as transformers loads it) and with the reference templates: mergekit 0.1.5's
named templates and Meta's published Llama 3 template (from the pinned npm
package setup.sh fetches). Prints JSON.

usage: chat_templates.py LLAMA3_TOKENIZER_CONFIG OUT_DIR...
"""
import importlib.resources
import json
import os
import sys

from transformers import AutoTokenizer
from transformers.utils.chat_template_utils import render_jinja_template
from mergekit._data import chat_templates

CONVERSATIONS = [
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": " Hi there "},
        {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "2+2?"},
    ],
    [{"role": "user", "content": "only"}],
    [{"role": "user", "content": "Äbc"}, {"role": "assistant", "content": " x "}],
]


def renders(template):
    out = []
    for conversation in CONVERSATIONS:
        for prompt in (False, True):
            rendered, _ = render_jinja_template(
                conversations=[conversation],
                chat_template=template,
                add_generation_prompt=prompt,
                bos_token="<s>",
                eos_token="</s>",
            )
            out.append(rendered[0])
    return out


def ours(directory):
    tokenizer = AutoTokenizer.from_pretrained(directory)
    config = json.load(open(os.path.join(directory, "tokenizer_config.json")))
    return {
        "template": tokenizer.chat_template,
        "tokenizer_config_has_template": "chat_template" in config,
        "renders": renders(tokenizer.chat_template) if tokenizer.chat_template else None,
    }


official = json.load(open(sys.argv[1]))["chat_template"]
print(
    json.dumps(
        {
            "ours": {d: ours(d) for d in sys.argv[2:]},
            "mergekit": {
                name: renders(
                    importlib.resources.files(chat_templates)
                    .joinpath(name + ".jinja")
                    .read_text()
                )
                for name in ["alpaca", "chatml", "exaone", "llama3", "mistral"]
            },
            # Meta's template always ends in the assistant header: compared
            # with ours where the prompt is asked for.
            "llama3_official": renders(official),
        }
    )
)
