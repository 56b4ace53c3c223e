"""Oracle: the tokenizer class transformers' AutoTokenizer maps each model
type to, and whether it distrusts the class a checkpoint names for it.

    python hf_tokenizer_mapping.py MODEL_TYPE...

Prints {MODEL_TYPE: {"class": NAME or null, "overrides_config": BOOL}}.
"""
import json
import sys
import warnings

warnings.filterwarnings("ignore")

from transformers.models.auto import tokenization_auto  # noqa: E402

mapping = tokenization_auto.TOKENIZER_MAPPING_NAMES
distrusted = tokenization_auto.MODELS_WITH_INCORRECT_HUB_TOKENIZER_CLASS
print(json.dumps({
    model_type: {
        "class": mapping.get(model_type),
        "overrides_config": model_type in distrusted and mapping.get(model_type) is not None,
    }
    for model_type in sys.argv[1:]
}))
