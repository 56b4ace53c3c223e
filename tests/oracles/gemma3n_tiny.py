"""Oracle: tiny Gemma 3n checkpoints and an independent check of MatFormer-style extraction.

    python gemma3n_tiny.py make OUT_DIR [--seed N] [--multimodal] [--shared-kv-weights]
    python gemma3n_tiny.py check ORIGINAL_DIR EXTRACTED_DIR --skip i,j --widths w0,w1,...
    python gemma3n_tiny.py kv-producers DIR

`make` writes config.json + model.safetensors of a random (seeded, F32) 8-layer
Gemma3nForCausalLM. With --multimodal the same text weights are written under the
Gemma3nForConditionalGeneration layout (`model.language_model.` prefix, config with
`text_config`) plus two small multimodal embedders as decoys; transformers can't
build that class here (its vision tower needs timm), so that layout is only for
testing tensor naming, never loaded. --shared-kv-weights adds k_proj/v_proj/k_norm
to the KV-shared layers, as Google's checkpoints carry them (transformers ignores
them on load).

`check` recomputes from ORIGINAL's safetensors what every extracted tensor must be
(layer drop + renumber, MLP rows/cols [:w], per-layer-input tensors sliced on the
layer axis, everything else verbatim), compares bit for bit, checks the rewritten
config fields, and for text-only checkpoints runs a transformers forward. Prints
one JSON line; exits non-zero with a message on any mismatch.

`kv-producers` prints (JSON) which layer each KV-shared layer reads its K/V from.
"""
import argparse
import json
import math
import os
import re
import sys
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
warnings.filterwarnings("ignore")

import torch  # noqa: E402
from safetensors import safe_open  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

TEXT_PREFIX = "model."  # Gemma3nForCausalLM
MM_PREFIX = "model.language_model."  # Gemma3nForConditionalGeneration
# Keys rewritten by extraction; every other config key must be copied unchanged.
SLICED_KEYS = (
    "num_hidden_layers",
    "intermediate_size",
    "layer_types",
    "activation_sparsity_pattern",
    "num_kv_shared_layers",
)


def fail(msg: str):
    print(f"gemma3n_tiny: {msg}", file=sys.stderr)
    sys.exit(1)


def tiny_text_config() -> dict:
    n = 8
    return dict(
        vocab_size=300,
        # Smaller than vocab_size, as in the real models (262144 vs 262400): ids past it
        # get per-layer row 0. Keeps "V of the per-layer table" distinct from vocab_size.
        vocab_size_per_layer_input=256,
        hidden_size=32,
        hidden_size_per_layer_input=8,
        intermediate_size=[64, 64, 48, 64, 64, 48, 64, 64],  # per layer, deliberately uneven
        num_hidden_layers=n,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        # Every 4th layer global: producers are layer 2 (sliding) and 3 (full).
        layer_types=["full_attention" if (i + 1) % 4 == 0 else "sliding_attention" for i in range(n)],
        num_kv_shared_layers=4,
        activation_sparsity_pattern=[0.95, 0.95] + [0.0] * (n - 2),
        altup_num_inputs=4,
        laurel_rank=4,
        sliding_window=4,
        max_position_embeddings=128,
    )


def randomize(model: torch.nn.Module, seed: int):
    """Overwrite every parameter: the default init zeroes altup.correct_output_scale
    (which silences the per-layer inputs) and gives near-zero logits."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if p.dim() == 1:  # norm scales, correct_output_scale
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "embed_tokens" in name:
                p.copy_(torch.randn(p.shape, generator=g))
            else:  # nn.Linear [out, in]
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p.shape[1]))


def kv_rule(cfg: dict) -> dict:
    """transformers' Gemma3nTextConfig.kv_sharing_modes / Gemma3nTextAttention:
    the last `num_kv_shared_layers` layers ("reuse") compute no K/V; each reads the
    K/V of the last layer *before* that range with the same layer_type ("store"),
    i.e. producer(t) = first_shared - 1 - reversed(layer_types[:first_shared]).index(t),
    first_shared = num_hidden_layers - num_kv_shared_layers. transformers raises if a
    type among all layers has no producer. A "store" layer is marked per type present
    in the model, even if no shared layer of that type exists."""
    n, k, types = cfg["num_hidden_layers"], cfg["num_kv_shared_layers"], cfg["layer_types"]
    if k == 0:
        return {"first_shared": n, "producers": {}, "shared": {}, "modes": [None] * n}
    first = n - k
    before = types[:first][::-1]
    if sorted(set(before)) != sorted(set(types)):
        raise ValueError("a layer type used by the shared layers has no producer before them")
    producers = {t: first - 1 - before.index(t) for t in sorted(set(types))}
    modes = [None if i < first else "reuse" for i in range(n)]
    for p in producers.values():
        modes[p] = "store"
    shared = {i: producers[types[i]] for i in range(first, n)}
    return {"first_shared": first, "producers": producers, "shared": shared, "modes": modes}


def read_config(d: str):
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    text = cfg.get("text_config")
    return cfg, (text if text is not None else cfg), (MM_PREFIX if text is not None else TEXT_PREFIX)


def read_tensors(d: str) -> dict:
    out = {}
    for name in sorted(f for f in os.listdir(d) if f.endswith(".safetensors")):
        with safe_open(os.path.join(d, name), framework="pt") as f:
            for key in f.keys():
                if key in out:
                    fail(f"{d}: tensor {key} appears in more than one shard")
                out[key] = f.get_tensor(key)
    index = os.path.join(d, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            mapped = set(json.load(f)["weight_map"])
        if mapped != set(out):
            fail(f"{d}: index weight_map disagrees with shards: {sorted(mapped ^ set(out))[:5]}")
    return out


# ---------------------------------------------------------------- make

def cmd_make(args):
    from transformers import Gemma3nForCausalLM, Gemma3nTextConfig

    torch.manual_seed(args.seed)
    config = Gemma3nTextConfig(**tiny_text_config())
    model = Gemma3nForCausalLM(config).float().eval()
    randomize(model, args.seed)
    rule = kv_rule(config.to_dict())
    extra = {}
    if args.shared_kv_weights:
        g = torch.Generator().manual_seed(args.seed + 1)
        kv = config.num_key_value_heads * config.head_dim
        for i in rule["shared"]:
            extra[f"layers.{i}.self_attn.k_proj.weight"] = torch.randn(kv, config.hidden_size, generator=g) / 8
            extra[f"layers.{i}.self_attn.v_proj.weight"] = torch.randn(kv, config.hidden_size, generator=g) / 8
            extra[f"layers.{i}.self_attn.k_norm.weight"] = 1 + 0.1 * torch.randn(config.head_dim, generator=g)

    os.makedirs(args.out_dir, exist_ok=True)
    if not args.multimodal:
        model.save_pretrained(args.out_dir, safe_serialization=True)
        if extra:  # save_pretrained drops them; append to the single shard
            path = os.path.join(args.out_dir, "model.safetensors")
            tensors = read_tensors(args.out_dir)
            tensors.update({TEXT_PREFIX + k: v.contiguous() for k, v in extra.items()})
            save_file(tensors, path, metadata={"format": "pt"})
    else:
        # lm_head is tied to embed_tokens and, as in Google's files, not stored.
        sd = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
        tensors = {MM_PREFIX + k.removeprefix(TEXT_PREFIX): v.contiguous() for k, v in sd.items()}
        tensors.update({MM_PREFIX + k: v.contiguous() for k, v in extra.items()})
        # Decoys outside the language model (real shapes: [128, mm_hidden], [text_hidden, mm_hidden]).
        g = torch.Generator().manual_seed(args.seed + 2)
        mm_hidden = 16
        for tower in ("embed_vision", "embed_audio"):
            p = f"model.{tower}."
            tensors[p + "embedding.weight"] = torch.randn(128, mm_hidden, generator=g)
            tensors[p + "hard_embedding_norm.weight"] = 1 + 0.1 * torch.randn(mm_hidden, generator=g)
            tensors[p + "soft_embedding_norm.weight"] = 1 + 0.1 * torch.randn(mm_hidden, generator=g)
            tensors[p + "embedding_projection.weight"] = torch.randn(config.hidden_size, mm_hidden, generator=g)
        save_file(tensors, os.path.join(args.out_dir, "model.safetensors"), metadata={"format": "pt"})
        text = config.to_diff_dict()  # what save_pretrained writes for the text-only model
        top = {
            "architectures": ["Gemma3nForConditionalGeneration"],
            "model_type": "gemma3n",
            "text_config": text,
            "vision_config": {"model_type": "gemma3n_vision", "hidden_size": mm_hidden, "vocab_size": 128,
                              "vocab_offset": 256, "rms_norm_eps": 1e-6},
            "audio_config": {"model_type": "gemma3n_audio", "hidden_size": mm_hidden, "vocab_size": 128,
                             "vocab_offset": 384, "rms_norm_eps": 1e-6},
            "tie_word_embeddings": True,
            "dtype": "float32",
            "transformers_version": text.get("transformers_version"),
        }
        with open(os.path.join(args.out_dir, "config.json"), "w") as f:
            json.dump(top, f, indent=2)
    n = len(read_tensors(args.out_dir))
    layout = "multimodal" if args.multimodal else "text"
    print(f"wrote {args.out_dir}: {layout} layout, {n} tensors, {config.num_hidden_layers} layers, "
          f"kv producers {rule['producers']}")


# ---------------------------------------------------------------- check

def expected_tensors(orig: dict, tcfg: dict, prefix: str, skip: set, widths: list) -> dict:
    """What extraction must produce, derived from the original tensors only."""
    n = tcfg["num_hidden_layers"]
    kept = [i for i in range(n) if i not in skip]
    new_index = {old: new for new, old in enumerate(kept)}
    p = tcfg["hidden_size_per_layer_input"]
    layer_re = re.compile(re.escape(prefix) + r"layers\.(\d+)\.(.+)$")
    out = {}
    for key, t in orig.items():
        m = layer_re.match(key)
        if m:
            old, rest = int(m.group(1)), m.group(2)
            if old >= n:
                fail(f"original tensor {key} names a layer past num_hidden_layers={n}")
            if old in skip:
                continue
            new = new_index[old]
            w = widths[new]
            if rest in ("mlp.gate_proj.weight", "mlp.up_proj.weight"):
                if w > t.shape[0]:
                    fail(f"width {w} for layer {old} exceeds its {t.shape[0]} rows")
                t = t[:w, :]
            elif rest == "mlp.down_proj.weight":
                t = t[:, :w]
            out[f"{prefix}layers.{new}.{rest}"] = t.contiguous()
        elif key == prefix + "per_layer_model_projection.weight":  # [L*P, H]
            if t.shape[0] != n * p:
                fail(f"{key} has {t.shape[0]} rows, expected {n}*{p}")
            out[key] = t.reshape(n, p, t.shape[1])[kept].reshape(len(kept) * p, t.shape[1]).contiguous()
        elif key == prefix + "embed_tokens_per_layer.weight":  # [V, L*P]
            if t.shape[1] != n * p:
                fail(f"{key} has {t.shape[1]} columns, expected {n}*{p}")
            out[key] = t.reshape(t.shape[0], n, p)[:, kept].reshape(t.shape[0], len(kept) * p).contiguous()
        else:
            out[key] = t
    return out


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.numel() == 0:
        return True
    return torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


def expected_text_config(tcfg: dict, skip: set, widths: list) -> dict:
    n = tcfg["num_hidden_layers"]
    kept = [i for i in range(n) if i not in skip]
    rule = kv_rule(tcfg)
    if skip & set(rule["producers"].values()):
        fail(f"--skip {sorted(skip)} drops KV producer(s) {rule['producers']}: extraction must refuse this")
    old_inter = tcfg["intermediate_size"]
    old_inter = old_inter if isinstance(old_inter, list) else [old_inter] * n
    for new, old in enumerate(kept):
        if not 0 < widths[new] <= old_inter[old]:
            fail(f"width {widths[new]} for layer {old} not in 1..{old_inter[old]}")
    asp = tcfg.get("activation_sparsity_pattern")
    return {
        "num_hidden_layers": len(kept),
        "intermediate_size": widths,
        "layer_types": [tcfg["layer_types"][i] for i in kept],
        "activation_sparsity_pattern": None if asp is None else [asp[i] for i in kept],
        "num_kv_shared_layers": tcfg["num_kv_shared_layers"] - len(skip & set(rule["shared"])),
    }


def check_config(ocfg, otext, ecfg, etext, skip, widths) -> dict:
    want = expected_text_config(otext, skip, widths)
    for key, value in want.items():
        if etext.get(key) != value:
            fail(f"config {key}: expected {value}, got {etext.get(key)}")
    notes = []
    pairs = [(otext, etext, "text config")] + ([(ocfg, ecfg, "config")] if ocfg is not otext else [])
    for outer, extracted, where in pairs:
        for key, value in outer.items():
            if key in SLICED_KEYS or key == "text_config" or key == "transformers_version":
                continue
            if key not in extracted:
                fail(f"{where} key {key} missing from extraction")
            if extracted[key] != value:
                fail(f"{where} key {key} changed: {value!r} -> {extracted[key]!r}")
        notes += [f"{where} adds {k}" for k in extracted if k not in outer]
    # The kept layers must keep their KV role and read the same (original) producer.
    n = otext["num_hidden_layers"]
    kept = [i for i in range(n) if i not in skip]
    old, new = kv_rule(otext), kv_rule({**etext, **want})
    for j, i in enumerate(kept):
        if j in new["shared"] and kept[new["shared"][j]] != old["shared"].get(i):
            fail(f"layer {i} (now {j}) would read KV of layer {kept[new['shared'][j]]}, "
                 f"originally {old['shared'].get(i)}")
        if (j in new["shared"]) != (i in old["shared"]):
            fail(f"layer {i} (now {j}) changes its KV-shared status")
    return {"kv_sharing_modes": new["modes"], "notes": notes}


def forward(d: str, vocab: int):
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32, output_loading_info=True)
    # missing/unexpected/mismatched keys and error messages must all be empty; the
    # shared layers' k/v tensors, if present, are dropped silently by transformers.
    if bad := {k: v for k, v in info.items() if v}:
        fail(f"{d}: transformers load reported {bad}")
    model.eval()
    # Fixed batch, longer than the sliding window, ids spanning the whole vocabulary.
    ids = (torch.arange(2 * 12).reshape(2, 12) * 37 + 5) % vocab
    with torch.no_grad():
        logits = model(ids, use_cache=False).logits.float()
    return model, logits


def cmd_check(args):
    skip = {int(s) for s in args.skip.split(",") if s.strip()}
    widths = [int(w) for w in args.widths.split(",") if w.strip()]
    ocfg, otext, prefix = read_config(args.original)
    ecfg, etext, eprefix = read_config(args.extracted)
    if prefix != eprefix:
        fail(f"layout changed: original uses {prefix!r}, extraction {eprefix!r}")
    n = otext["num_hidden_layers"]
    if not skip <= set(range(n)):
        fail(f"--skip {sorted(skip)} outside 0..{n - 1}")
    if len(widths) != n - len(skip):
        fail(f"--widths has {len(widths)} entries for {n - len(skip)} kept layers")

    summary = check_config(ocfg, otext, ecfg, etext, skip, widths)

    want = expected_tensors(read_tensors(args.original), otext, prefix, skip, widths)
    got = read_tensors(args.extracted)
    missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
    if missing or extra:
        fail(f"tensor set differs: missing {missing[:8]}, unexpected {extra[:8]}")
    for key in sorted(want):
        if not same_bits(want[key], got[key]):
            fail(f"tensor {key}: expected {want[key].dtype} {list(want[key].shape)}, "
                 f"got {got[key].dtype} {list(got[key].shape)}" +
                 ("" if want[key].shape != got[key].shape else " (values differ)"))
    summary.update({"tensors": len(got), "kept_layers": [i for i in range(n) if i not in skip]})

    if prefix == TEXT_PREFIX:
        model, logits = forward(args.extracted, otext["vocab_size"])
        if model.config.num_hidden_layers != n - len(skip):
            fail("transformers built the wrong number of layers")
        if list(logits.shape) != [2, 12, otext["vocab_size"]]:
            fail(f"logits shape {list(logits.shape)}")
        if not torch.isfinite(logits).all():
            fail("non-finite logits")
        summary.update({"logits_shape": list(logits.shape), "max_abs_logit": logits.abs().max().item(),
                        "logit_std": logits.std().item()})
        # An identity extraction must reproduce the original exactly.
        old_inter = otext["intermediate_size"]
        if not skip and widths == (old_inter if isinstance(old_inter, list) else [old_inter] * n):
            _, base = forward(args.original, otext["vocab_size"])
            diff = (base - logits).abs().max().item()
            if diff != 0.0:
                fail(f"identity extraction changes logits by {diff}")
            summary["identity_logit_diff"] = diff
    print(json.dumps({"ok": True, **summary}))


# ---------------------------------------------------------------- kv-producers

def cmd_kv(args):
    _, tcfg, _ = read_config(args.dir)
    rule = kv_rule(tcfg)
    out = {
        "num_hidden_layers": tcfg["num_hidden_layers"],
        "num_kv_shared_layers": tcfg["num_kv_shared_layers"],
        "first_shared_layer": rule["first_shared"],
        "producers": rule["producers"],  # layer_type -> producing layer
        "shared": {str(k): v for k, v in rule["shared"].items()},  # shared layer -> producing layer
        "kv_sharing_modes": rule["modes"],
    }
    try:  # Cross-check the re-derivation against transformers' own property.
        from transformers import Gemma3nTextConfig

        fields = {k: v for k, v in tcfg.items() if k in Gemma3nTextConfig.__dataclass_fields__}
        theirs = Gemma3nTextConfig(**fields).kv_sharing_modes
        if theirs != rule["modes"]:
            fail(f"rule disagrees with transformers: {theirs} vs {rule['modes']}")
        out["matches_transformers"] = True
    except ImportError:
        out["matches_transformers"] = None
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("out_dir")
    m.add_argument("--seed", type=int, default=0)
    m.add_argument("--multimodal", action="store_true")
    m.add_argument("--shared-kv-weights", action="store_true")
    c = sub.add_parser("check")
    c.add_argument("original")
    c.add_argument("extracted")
    c.add_argument("--skip", default="")
    c.add_argument("--widths", required=True)
    k = sub.add_parser("kv-producers")
    k.add_argument("dir")
    args = ap.parse_args()
    {"make": cmd_make, "check": cmd_check, "kv-producers": cmd_kv}[args.cmd](args)


if __name__ == "__main__":
    main()
