//! Differential tests against mergekit (the pinned PyPI release, run in-process
//! by tests/oracles/mergekit_diff.py): every deterministic method, DARE and
//! DELLA at density 1, gradients, filters, slices/passthrough and out_dtype,
//! on generated tiny F32 checkpoints (one case computing in BF16). Outputs must
//! agree within 1e-6.

use crate::common;

use std::path::Path;

use common::*;
use serde_json::{json, Value};

/// (name, recipe with {base} {a} {b} {c} placeholders)
const CASES: &[(&str, &str)] = &[
    (
        "linear",
        "merge_method: linear
models:
  - model: {a}
    parameters: {weight: 0.3}
  - model: {b}
    parameters: {weight: 0.7}
",
    ),
    (
        "linear_with_base_unnormalized",
        "merge_method: linear
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.5}
  - model: {base}
    parameters: {weight: 0.25}
parameters:
  normalize: false
",
    ),
    (
        "task_arithmetic",
        "merge_method: task_arithmetic
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.5}
  - model: {b}
    parameters: {weight: 0.8}
parameters:
  lambda: 0.9
",
    ),
    (
        "ties_with_gradient_and_filters",
        "merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: {b}
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1]
  - model: {c}
    parameters:
      density: 0.33
      weight:
        - filter: mlp
          value: 0.5
        - value: 0.1
parameters:
  normalize: true
  int8_mask: true
",
    ),
    (
        "dare_linear_density_1",
        "merge_method: dare_linear
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 1.0}
  - model: {b}
    parameters: {weight: 0.4, density: 1.0}
",
    ),
    (
        "dare_ties_density_1",
        "merge_method: dare_ties
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 1.0}
  - model: {b}
    parameters: {weight: 0.4, density: 1.0}
",
    ),
    (
        "breadcrumbs",
        "merge_method: breadcrumbs
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 0.8, gamma: 0.05}
  - model: {b}
    parameters: {weight: 0.4, density: 0.9, gamma: 0.0}
",
    ),
    (
        "breadcrumbs_ties",
        "merge_method: breadcrumbs_ties
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 0.7, gamma: 0.1}
  - model: {b}
    parameters: {weight: 0.4, density: 0.7, gamma: 0.1}
",
    ),
    (
        "della_density_1",
        "merge_method: della
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 1.0}
  - model: {b}
    parameters: {weight: 0.4, density: 1.0}
",
    ),
    (
        "della_linear_density_1",
        "merge_method: della_linear
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6, density: 1.0}
  - model: {b}
    parameters: {weight: 0.4, density: 1.0}
",
    ),
    (
        "gradient_slerp_slices",
        "merge_method: slerp
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {a}
        layer_range: [0, 4]
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
",
    ),
    (
        "nuslerp_with_base",
        "merge_method: nuslerp
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.4}
  - model: {b}
    parameters: {weight: 0.6}
",
    ),
    (
        "nuslerp_row_wise",
        "merge_method: nuslerp
models:
  - model: {a}
    parameters: {weight: 0.7}
  - model: {b}
    parameters: {weight: 0.3}
parameters:
  nuslerp_flatten: false
  nuslerp_row_wise: true
",
    ),
    (
        "multislerp",
        "merge_method: multislerp
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.5}
  - model: {b}
    parameters: {weight: 0.3}
  - model: {c}
    parameters: {weight: 0.2}
",
    ),
    (
        "karcher",
        "merge_method: karcher
models:
  - model: {a}
  - model: {b}
  - model: {c}
",
    ),
    (
        "model_stock",
        "merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
",
    ),
    (
        "model_stock_filter_wise",
        "merge_method: model_stock
base_model: {base}
models:
  - model: {a}
  - model: {b}
parameters:
  filter_wise: true
",
    ),
    (
        "sce",
        "merge_method: sce
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  select_topk: 0.5
",
    ),
    (
        "nearswap",
        "merge_method: nearswap
base_model: {base}
models:
  - model: {base}
  - model: {a}
parameters:
  t: 0.001
",
    ),
    (
        "ram",
        "merge_method: ram
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  epsilon: 0.002
",
    ),
    (
        "ramplus_tl",
        "merge_method: ramplus_tl
base_model: {base}
models:
  - model: {a}
  - model: {b}
  - model: {c}
parameters:
  r: 0.5
  alpha: 0.3
  epsilon: 0.002
",
    ),
    (
        "arcee_fusion",
        "merge_method: arcee_fusion
base_model: {base}
models:
  - model: {a}
",
    ),
    (
        "passthrough_frankenmerge",
        "merge_method: passthrough
slices:
  - sources:
      - model: {a}
        layer_range: [0, 3]
  - sources:
      - model: {b}
        layer_range: [1, 4]
        parameters:
          scale:
            - filter: o_proj
              value: 0.5
            - value: 1.0
",
    ),
    (
        "task_arithmetic_two_slices",
        "merge_method: task_arithmetic
base_model: {base}
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
      - model: {a}
        layer_range: [0, 2]
        parameters: {weight: 0.7}
    parameters:
      lambda: 0.5
  - sources:
      - model: {base}
        layer_range: [2, 4]
      - model: {a}
        layer_range: [2, 4]
        parameters: {weight: [0.2, 1.0]}
dtype: float32
",
    ),
    (
        // Math in bf16: every step rounded as torch rounds it, λ included.
        "ties_lambda_math_in_bf16",
        "merge_method: ties
base_model: {base}
models:
  - model: {a}
    parameters: {weight: 0.6}
  - model: {b}
    parameters: {weight: 0.9}
parameters:
  lambda: 0.7
dtype: bfloat16
",
    ),
    (
        "linear_out_bfloat16",
        "merge_method: linear
models:
  - model: {a}
    parameters: {weight: 1.0}
  - model: {b}
    parameters: {weight: 2.0}
dtype: float32
out_dtype: bfloat16
",
    ),
];

#[test]
fn every_method_matches_mergekit() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "3", "--seed", "11"]);
    let fill = |recipe: &str| {
        recipe
            .replace("{base}", family.join("base").to_str().unwrap())
            .replace("{a}", family.join("finetune-1").to_str().unwrap())
            .replace("{b}", family.join("finetune-2").to_str().unwrap())
            .replace("{c}", family.join("finetune-3").to_str().unwrap())
    };
    let mut cases = vec![];
    for (name, recipe) in CASES {
        let path = tmp.path().join(format!("{name}.yml"));
        std::fs::write(&path, fill(recipe)).unwrap();
        let out = tmp.path().join(format!("out-{name}"));
        ok(["merge".as_ref(), path.as_os_str(), out.as_os_str()]);
        cases.push(json!({"name": name, "recipe": path, "ours": out}));
    }
    let results = mergekit_oracle(tmp.path(), &cases);
    let mut failures = vec![];
    for (name, _) in CASES {
        let r = &results[*name];
        let bf16 = name.contains("bfloat16");
        let tolerance_ok = if bf16 {
            // One bf16 rounding step of results that agree to 1e-6 before rounding.
            r["max_rel"].as_f64().unwrap_or(f64::MAX) <= 1.0 / 128.0
        } else {
            r["max_abs"].as_f64().unwrap_or(f64::MAX) <= 1e-6
        };
        let clean = r.get("error").is_none()
            && r["only_ours"].as_array().is_some_and(Vec::is_empty)
            && r["only_theirs"].as_array().is_some_and(Vec::is_empty)
            && r["dtype_mismatch"]
                .as_object()
                .is_some_and(|m| m.is_empty());
        if !(clean && tolerance_ok) {
            failures.push(format!("{name}: {r}"));
        }
    }
    assert!(
        failures.is_empty(),
        "differences from mergekit:\n{}",
        failures.join("\n")
    );
    let layers = |name: &str| {
        let config: Value = serde_json::from_slice(
            &std::fs::read(tmp.path().join(format!("out-{name}/config.json"))).unwrap(),
        )
        .unwrap();
        config["num_hidden_layers"].clone()
    };
    assert_eq!(layers("passthrough_frankenmerge"), 6);
    assert_eq!(results["passthrough_frankenmerge"]["num_hidden_layers"], 6);
}

/// TIES and breadcrumbs on BF16 models: BF16 magnitudes tie often, and where
/// they tie at a threshold the two tools keep different entries of the tie
/// (both keep exactly k; amalgam by flat index, mergekit in whatever order
/// its unstable sort leaves). Every entry that differs from mergekit must be
/// one where some input's |δ| equals one of its own thresholds.
#[test]
fn bf16_magnitude_methods_differ_from_mergekit_only_at_threshold_ties() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(
        &family,
        &["--finetunes", "2", "--seed", "5", "--dtype", "bfloat16"],
    );
    let member = |m: &str| family.join(m).to_str().unwrap().to_owned();
    let mut cases = vec![];
    for (name, method, gamma) in [
        ("ties_bf16", "ties", None),
        ("breadcrumbs_bf16", "breadcrumbs", Some(0.05)),
    ] {
        let gamma_param = gamma.map_or(String::new(), |g| format!(", gamma: {g}"));
        let (recipe, out) = merge_ok(
            tmp.path(),
            name,
            &format!(
                "merge_method: {method}\nbase_model: {}\nmodels:\n  - model: {}\n    \
                 parameters: {{weight: 1.0, density: 0.5{gamma_param}}}\n  - model: {}\n    \
                 parameters: {{weight: 0.5, density: 0.5{gamma_param}}}\n",
                member("base"),
                member("finetune-1"),
                member("finetune-2")
            ),
        );
        cases.push(json!({
            "name": name,
            "recipe": recipe,
            "ours": out,
            "threshold_ties": {
                "base": member("base"),
                "models": [member("finetune-1"), member("finetune-2")],
                "density": 0.5,
                "gamma": gamma,
            },
        }));
    }
    let results = mergekit_oracle(tmp.path(), &cases);
    for name in ["ties_bf16", "breadcrumbs_bf16"] {
        let result = &results[name];
        assert_eq!(
            result["threshold_ties"]["unexplained"], 0,
            "{name}: {result}"
        );
        assert!(
            result["dtype_mismatch"].as_object().unwrap().is_empty(),
            "{result}"
        );
        eprintln!("{name} vs mergekit: {}", result["threshold_ties"]);
    }
}

/// `tokenizer_source` with vocabularies that differ: one model's tokenizer
/// has four more tokens and two ids swapped. The embedding and head of the
/// output follow the tokenizer written (its rows, in its order), rows a model
/// lacks filled as mergekit fills them; the config's vocab_size says so.
/// Identical to mergekit 0.1.5, both ways round.
#[test]
fn tokenizer_source_decides_the_vocabulary_rows() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "2", "--seed", "3"]);
    let script = r#"
import json, shutil, sys, torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, models, pre_tokenizers
root = sys.argv[1]
def tokenizer(directory, vocab):
    t = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(f"{directory}/tokenizer.json")
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"},
              open(f"{directory}/tokenizer_config.json", "w"))
vocab = {f"t{i}": i for i in range(384)}
for member in ["base", "finetune-1"]:
    tokenizer(f"{root}/{member}", vocab)
# finetune-2 grows: four new tokens, and t5/t6 trade ids (rows follow).
big = dict(vocab, t5=6, t6=5, **{f"new{i}": 384 + i for i in range(4)})
tokenizer(f"{root}/finetune-2", big)
d = load_file(f"{root}/finetune-2/model.safetensors")
g = torch.Generator().manual_seed(9)
for name in ["model.embed_tokens.weight", "lm_head.weight"]:
    w = d[name].clone()
    w[[5, 6]] = w[[6, 5]]
    d[name] = torch.cat([w, torch.randn(4, w.shape[1], generator=g)])
save_file(d, f"{root}/finetune-2/model.safetensors", metadata={"format": "pt"})
c = json.load(open(f"{root}/finetune-2/config.json")); c["vocab_size"] = 388
json.dump(c, open(f"{root}/finetune-2/config.json", "w"))
"#;
    python_ok(["-c".as_ref(), script.as_ref(), family.as_os_str()]);
    let member = |m: &str| family.join(m).to_str().unwrap().to_owned();
    let mut cases = vec![];
    for (name, source, rows) in [
        ("tokenizer_source_model", member("finetune-2"), 388),
        ("tokenizer_source_base", "base".to_owned(), 384),
    ] {
        let (recipe, out) = merge_ok(
            tmp.path(),
            name,
            &format!(
                "merge_method: linear\nbase_model: {}\nmodels:\n  - model: {0}\n    parameters: {{weight: 0.5}}\n  \
                 - model: {}\n    parameters: {{weight: 0.3}}\n  - model: {}\n    parameters: {{weight: 0.2}}\n\
                 tokenizer_source: {source}\n",
                member("base"),
                member("finetune-1"),
                member("finetune-2")
            ),
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["vocab_size"], rows, "{name}");
        cases.push(json!({"name": name, "recipe": recipe, "ours": out}));
    }
    let results = mergekit_oracle(tmp.path(), &cases);
    assert_matches(&results, &cases, 1e-6);
}

/// `chat_template: NAME` writes mergekit's named formats (chatml and mistral
/// render exactly as mergekit's; llama3 as Meta's published template, which
/// mergekit's adds newlines to; alpaca and exaone as their formats read,
/// without mergekit's stray blank lines and indentation), and `auto` the
/// template most inputs carry. transformers loads each from the output and
/// finds no second template in `tokenizer_config.json`.
#[test]
fn named_and_auto_chat_templates() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "2", "--seed", "4"]);
    let script = r#"
import json, sys
from tokenizers import Tokenizer, models, pre_tokenizers
root = sys.argv[1]
common = "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
for member, where, template in [("base", "config", common), ("finetune-1", "jinja", common + "\n"),
                                ("finetune-2", "config", "{{ messages | length }}")]:
    t = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.save(f"{root}/{member}/tokenizer.json")
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
              "unk_token": "<unk>"}
    if where == "config":
        config["chat_template"] = template
    else:
        open(f"{root}/{member}/chat_template.jinja", "w").write(template)
    json.dump(config, open(f"{root}/{member}/tokenizer_config.json", "w"))
"#;
    python_ok(["-c".as_ref(), script.as_ref(), family.as_os_str()]);
    let member = |m: &str| family.join(m).display().to_string();
    let names = ["alpaca", "chatml", "exaone", "llama3", "mistral", "auto"];
    let outs: Vec<std::path::PathBuf> = names
        .iter()
        .map(|name| {
            merge_ok(
                tmp.path(),
                name,
                &format!(
                    "merge_method: linear\nmodels:\n  - model: {}\n    parameters: {{weight: 0.5}}\n  \
                     - model: {}\n    parameters: {{weight: 0.3}}\n  - model: {}\n    \
                     parameters: {{weight: 0.2}}\nchat_template: {name}\n",
                    member("base"),
                    member("finetune-1"),
                    member("finetune-2")
                ),
            )
            .1
        })
        .collect();
    let official = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/tokenizers/llama3/tokenizer_config.json");
    let mut args = vec![official.into_os_string()];
    args.extend(outs.iter().map(|o| o.clone().into_os_string()));
    let report: Value = serde_json::from_str(&oracle_ok(
        "chat_templates.py",
        &args.iter().map(|a| a.as_os_str()).collect::<Vec<_>>(),
    ))
    .unwrap();
    let ours = |name: &str| {
        &report["ours"][outs[names.iter().position(|n| *n == name).unwrap()]
            .to_str()
            .unwrap()]
    };
    for name in names {
        assert_eq!(ours(name)["tokenizer_config_has_template"], false, "{name}");
    }
    for name in ["chatml", "mistral"] {
        assert_eq!(ours(name)["renders"], report["mergekit"][name], "{name}");
    }
    // Renders come in (conversation, generation prompt) pairs; Meta's
    // template always ends in the assistant header.
    let with_prompt = |renders: &Value| -> Vec<Value> {
        renders
            .as_array()
            .unwrap()
            .iter()
            .skip(1)
            .step_by(2)
            .cloned()
            .collect()
    };
    assert_eq!(
        with_prompt(&ours("llama3")["renders"]),
        with_prompt(&report["llama3_official"])
    );
    assert_ne!(ours("llama3")["renders"], report["mergekit"]["llama3"]);
    // The formats as written down (Alpaca's README; EXAONE's model card).
    let alpaca = &ours("alpaca")["renders"];
    assert_eq!(
        alpaca[1],
        "Be brief.\n\n### Instruction:\nHi there\n\n### Response:\nHello!\n\n### Instruction:\n2+2?\n\n### Response:\n"
    );
    assert_eq!(alpaca[2], "### Instruction:\nonly");
    assert_eq!(alpaca[0], report["mergekit"]["alpaca"][0]);
    let exaone = &ours("exaone")["renders"];
    assert_eq!(
        exaone[1],
        "[|system|]Be brief.[|endofturn|]\n[|user|] Hi there \n[|assistant|]Hello![|endofturn|]\n[|user|]2+2?\n[|assistant|]"
    );
    assert_eq!(exaone[2], "[|system|][|endofturn|]\n[|user|]only\n");
    // auto: two of three models carry the same template (once with a trailing newline).
    assert_eq!(
        ours("auto")["template"],
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% endfor %}"
    );
}

/// `model: BASE+ADAPTER` applies a PEFT LoRA adapter while reading: a
/// weight-1 linear merge of it alone is bit-identical to peft's
/// `merge_and_unload` (plain LoRA with an adapted embedding and a saved head;
/// rsLoRA with an `alpha_pattern`; F32 and BF16 bases), and TIES with a LoRA
/// input is identical to mergekit's. Adapters amalgam cannot apply are refused
/// at their recipe line.
#[test]
fn lora_adapters_apply_as_peft_merges_them() {
    let tmp = tempfile::tempdir().unwrap();
    let mut cases = vec![];
    for dtype in ["float32", "bfloat16"] {
        let family = tmp.path().join(dtype);
        synth(&family, &["--finetunes", "1", "--dtype", dtype]);
        let adapters = tmp.path().join(format!("adapters-{dtype}"));
        oracle_ok(
            "lora_adapters.py",
            &[family.join("base").as_os_str(), adapters.as_os_str()],
        );
        for adapter in ["plain", "rslora"] {
            let model = format!(
                "{}+{}",
                family.join("base").display(),
                adapters.join(adapter).display()
            );
            let (_, out) = merge_ok(
                tmp.path(),
                &format!("{dtype}-{adapter}"),
                &format!(
                    "merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1.0}}\n"
                ),
            );
            let peft = adapters.join(format!("{adapter}-merged"));
            assert_eq!(
                tensor_digests(&inspect_json(&out, true)),
                tensor_digests(&inspect_json(&peft, true)),
                "{dtype} {adapter}"
            );
        }
        let base = family.join("base").display().to_string();
        let name = format!("ties-lora-{dtype}");
        let (recipe, out) = merge_ok(
            tmp.path(),
            &name,
            &format!(
                "merge_method: ties\nbase_model: {base}\nmodels:\n  - model: {}\n    \
                 parameters: {{weight: 1.0, density: 0.5}}\n  - model: {base}+{}\n    \
                 parameters: {{weight: 0.5, density: 0.7}}\n",
                family.join("finetune-1").display(),
                adapters.join("plain").display()
            ),
        );
        // mergekit merges adapters in float32 unless told the dtype; amalgam
        // in the base's own, as peft does on a model loaded in its dtype.
        // In BF16, magnitudes tie at the TIES threshold and each tool keeps
        // its own tied entries (see bf16_magnitude_methods_…): every
        // difference must be such a tie. peft's merged model stands in for
        // the adapted one (bit-identical, checked above).
        cases.push(json!({
            "name": name, "recipe": recipe, "ours": out, "lora_merge_dtype": dtype,
            "threshold_ties": {
                "base": base,
                "models": [family.join("finetune-1"), adapters.join("plain-merged")],
                "density": 0.5,
                "densities": [0.5, 0.7],
            },
        }));
    }
    let results = mergekit_oracle(tmp.path(), &cases);
    for case in &cases {
        let r = &results[case["name"].as_str().unwrap()];
        eprintln!("{}: {r}", case["name"]);
        let exact = r["max_abs"] == 0.0 || r["threshold_ties"]["unexplained"] == 0;
        assert!(
            r.get("error").is_none()
                && exact
                && r["only_ours"] == json!([])
                && r["only_theirs"] == json!([]),
            "{}: {r}",
            case["name"]
        );
    }

    // DoRA is not applied: refused at the model's line, naming the adapter.
    let dora = tmp.path().join("dora");
    copy_dir(&tmp.path().join("adapters-float32/plain"), &dora);
    edit_json(&dora.join("adapter_config.json"), |c| {
        c["use_dora"] = json!(true)
    });
    let recipe = tmp.path().join("dora.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
            tmp.path().join("float32/base").display(),
            dora.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("dora-out");
    let message = fails(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    assert!(
        message.contains("dora.yml:3:") && message.contains("DoRA") && message.contains("dora"),
        "{message}"
    );
    assert!(!out.exists());
}

/// A multi-stage recipe (mergekit-multi's format): named stages used by name
/// in later ones, an unnamed final merge. One `amalgam merge` gives
/// mergekit-multi's tensors, leaves no scratch behind, and with
/// `--intermediate-dir` keeps the stages and reuses them when unchanged.
#[test]
fn multi_stage_recipes_match_mergekit_multi() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "2", "--seed", "6"]);
    let member = |m: &str| family.join(m).display().to_string();
    let recipe = tmp.path().join("multi.yml");
    std::fs::write(
        &recipe,
        format!(
            "# the final merge first: stages may come in any order\n\
             merge_method: linear\nmodels:\n  - model: soup\n    parameters: {{weight: 0.3}}\n  \
             - model: trimmed\n    parameters: {{weight: 0.7}}\n---\n\
             name: trimmed\nmerge_method: ties\nbase_model: {base}\nmodels:\n  - model: soup\n    \
             parameters: {{weight: 1.0, density: 0.5}}\n  - model: {ft2}\n    \
             parameters: {{weight: 0.5, density: 0.5}}\n---\n\
             name: soup\nmerge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  \
             - model: {ft1}\n    parameters: {{weight: 0.5}}\n",
            base = member("base"),
            ft1 = member("finetune-1"),
            ft2 = member("finetune-2"),
        ),
    )
    .unwrap();
    let runs = tmp.path().join("runs");
    std::fs::create_dir(&runs).unwrap();
    let out = runs.join("out");
    ok(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    assert_eq!(listing(&runs), ["out"], "no scratch left beside the output");

    let theirs = tmp.path().join("theirs");
    python_ok([
        "-m".as_ref(),
        "mergekit.scripts.multimerge".as_ref(),
        recipe.as_os_str(),
        "--intermediate-dir".as_ref(),
        tmp.path().join("theirs-stages").as_os_str(),
        "--out-path".as_ref(),
        theirs.as_os_str(),
        "--no-copy-tokenizer".as_ref(),
    ]);
    // Linear rounds the weighted sum as mergekit's does up to one fused
    // multiply-add (torch's addcmul_): within 1.2e-7, as in every_method_….
    let cases = [json!({"name": "multi", "ours": out, "theirs": theirs})];
    assert_matches(&mergekit_oracle(tmp.path(), &cases), &cases, 1.2e-7);
    let digests = |dir: &Path| tensor_digests(&inspect_json(dir, true));

    let stages = tmp.path().join("stages");
    let again = |out: &Path| {
        ok([
            "merge".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--intermediate-dir".as_ref(),
            stages.as_os_str(),
        ])
    };
    again(&runs.join("kept"));
    assert_eq!(listing(&stages), ["soup", "trimmed"]);
    let written = |stage: &str| {
        std::fs::metadata(stages.join(stage).join("model.safetensors"))
            .unwrap()
            .modified()
            .unwrap()
    };
    let before = [written("soup"), written("trimmed")];
    again(&runs.join("kept-again"));
    assert_eq!(
        [written("soup"), written("trimmed")],
        before,
        "stages reused, not rewritten"
    );
    assert_eq!(digests(&runs.join("kept-again")), digests(&out));

    // Stages that use each other are refused before anything is written.
    let cycle = tmp.path().join("cycle.yml");
    std::fs::write(
        &cycle,
        "name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\n\
         name: b\nmerge_method: linear\nmodels:\n  - model: a\n",
    )
    .unwrap();
    let message = fails([
        "merge".as_ref(),
        cycle.as_os_str(),
        runs.join("never").as_os_str(),
    ]);
    assert!(
        message.contains("cycle.yml:1:7") && message.contains("cycle"),
        "{message}"
    );
    assert!(!runs.join("never").exists());
}

/// Vocabulary merging: `tokenizer_source: union` and the `tokenizer:` block
/// (per-token sources, `force`, a token no model has, `pad_to_multiple_of`).
/// Rows, token by token, as mergekit's (whose ids for new tokens follow
/// hash-map order, so rows are compared by token); the written tokenizer holds
/// mergekit's tokens and transformers encodes the new ones to their rows.
#[test]
fn union_vocabularies_and_token_rules_match_mergekit() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "2", "--seed", "8"]);
    let script = r#"
import json, sys, torch
from safetensors.torch import load_file, save_file
from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers
root = sys.argv[1]
g = torch.Generator().manual_seed(5)
def make(member, extra, added):
    vocab = {f"t{i}": i for i in range(384)}
    for word in extra:
        vocab[word] = len(vocab)
    t = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    t.pre_tokenizer = pre_tokenizers.Whitespace()
    t.add_special_tokens([AddedToken(a, special=True) for a in added])
    t.save(f"{root}/{member}/tokenizer.json")
    json.dump({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"},
              open(f"{root}/{member}/tokenizer_config.json", "w"))
    rows = 384 + len(extra) + len(added)
    if rows > 384:
        d = load_file(f"{root}/{member}/model.safetensors")
        for name in ["model.embed_tokens.weight", "lm_head.weight"]:
            w = d[name]
            d[name] = torch.cat([w, torch.randn(rows - 384, w.shape[1], generator=g)])
        save_file(d, f"{root}/{member}/model.safetensors", metadata={"format": "pt"})
        c = json.load(open(f"{root}/{member}/config.json")); c["vocab_size"] = rows
        json.dump(c, open(f"{root}/{member}/config.json", "w"))
make("base", [], [])
make("finetune-1", ["extra0", "extra1"], ["<tool>"])
make("finetune-2", ["extra1", "new0"], ["<tool>", "<end>"])
"#;
    python_ok(["-c".as_ref(), script.as_ref(), family.as_os_str()]);
    let member = |m: &str| family.join(m).display().to_string();
    let models = format!(
        "base_model: {base}\nmodels:\n  - model: {base}\n    parameters: {{weight: 0.5}}\n  \
         - model: {}\n    parameters: {{weight: 0.3}}\n  - model: {}\n    parameters: {{weight: 0.2}}\n",
        member("finetune-1"),
        member("finetune-2"),
        base = member("base"),
    );
    let mut cases = vec![];
    for (name, tokenizer, rows) in [
        ("union", "tokenizer_source: union\n".to_owned(), 384 + 3 + 2),
        (
            "union_rules",
            format!(
                "tokenizer:\n  source: union\n  pad_to_multiple_of: 64\n  tokens:\n    \
                 extra0: {{source: {{kind: zero}}, force: true}}\n    \
                 t5: {{source: {ft2}, force: true}}\n    \
                 brand_new: {{source: {{kind: model_token, model: {ft1}, token: t7}}}}\n    \
                 new0: {{source: {{kind: model_token, model: {ft2}, token_id: 9}}}}\n",
                ft1 = member("finetune-1"),
                ft2 = member("finetune-2")
            ),
            448,
        ),
    ] {
        let (recipe, out) = merge_ok(
            tmp.path(),
            name,
            &format!("merge_method: linear\n{models}{tokenizer}"),
        );
        let config: Value =
            serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["vocab_size"], rows, "{name}");
        cases.push(json!({
            "name": name, "recipe": recipe, "ours": out,
            "by_token": ["model.embed_tokens.weight", "lm_head.weight"],
        }));
    }
    let results = mergekit_oracle(tmp.path(), &cases);
    // Padding rows are means of the same rows summed in another order.
    assert_matches(&results, &cases, 1e-6);
    // transformers encodes the new tokens to the rows amalgam wrote for them.
    let check = "import sys, json\nfrom transformers import AutoTokenizer\n\
                 t = AutoTokenizer.from_pretrained(sys.argv[1])\n\
                 print(json.dumps([t.convert_tokens_to_ids(w) for w in ['extra0', 'new0', '<end>', 'brand_new']] + \
                 [t('t3 new0 <end> brand_new')['input_ids']]))";
    let out = tmp.path().join("union_rules");
    let ids: Value =
        serde_json::from_str(&python_ok(["-c".as_ref(), check.as_ref(), out.as_os_str()])).unwrap();
    let ours: Value = serde_json::from_str(&python_ok([
        "-c".as_ref(),
        "import sys, json\nfrom tokenizers import Tokenizer\nv = Tokenizer.from_file(sys.argv[1]).get_vocab(True)\n\
         print(json.dumps([v[w] for w in ['extra0', 'new0', '<end>', 'brand_new']]))"
            .as_ref(),
        out.join("tokenizer.json").as_os_str(),
    ]))
    .unwrap();
    assert_eq!(ids.as_array().unwrap()[..4], ours.as_array().unwrap()[..]);
    assert_eq!(ids[4], json!([3, ours[1], ours[2], ours[3]]));
}

/// `amalgam extract-lora` writes mergekit-extract-lora's adapter (the same
/// factors, bit for bit, and the same config), with and without
/// `--embed-lora`; peft applies it exactly as amalgam's `BASE+ADAPTER` does;
/// at full rank it rebuilds the fine-tune.
#[test]
fn extract_lora_matches_mergekit_and_round_trips_through_peft() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "1", "--seed", "12"]);
    let (base, tuned) = (family.join("base"), family.join("finetune-1"));
    for (name, extra) in [("rank8", vec![]), ("rank8-embed", vec!["--embed-lora"])] {
        let ours = tmp.path().join(name);
        let mut args: Vec<&std::ffi::OsStr> = vec![
            "extract-lora".as_ref(),
            base.as_os_str(),
            tuned.as_os_str(),
            ours.as_os_str(),
            "--rank".as_ref(),
            "8".as_ref(),
        ];
        args.extend(extra.iter().map(std::ffi::OsStr::new));
        ok(args);
        let theirs = tmp.path().join(format!("{name}-mergekit"));
        let mut mergekit: Vec<&std::ffi::OsStr> = vec![
            "-m".as_ref(),
            "mergekit.scripts.extract_lora".as_ref(),
            "--model".as_ref(),
            tuned.as_os_str(),
            "--base-model".as_ref(),
            base.as_os_str(),
            "--out-path".as_ref(),
            theirs.as_os_str(),
            "--max-rank".as_ref(),
            "8".as_ref(),
        ];
        mergekit.extend(extra.iter().map(std::ffi::OsStr::new));
        python_ok(mergekit);
        let report: Value = serde_json::from_str(&oracle_ok(
            "lora_extract.py",
            &["compare".as_ref(), ours.as_os_str(), theirs.as_os_str()],
        ))
        .unwrap();
        eprintln!("{name}: {report}");
        assert_eq!(report["only_ours"], json!([]), "{name}");
        assert_eq!(report["only_theirs"], json!([]), "{name}");
        assert_eq!(report["max_abs"], 0.0, "{name}");
        assert_eq!(report["config_differs"], json!([]), "{name}");
    }
    // peft applies the adapter as amalgam does.
    applies_as_peft(tmp.path(), "by-amalgam", &base, &tmp.path().join("rank8"));
    // Full rank (the hidden size is 64) rebuilds the fine-tune.
    let full = tmp.path().join("full");
    ok([
        "extract-lora".as_ref(),
        base.as_os_str(),
        tuned.as_os_str(),
        full.as_os_str(),
        "--rank".as_ref(),
        "64".as_ref(),
    ]);
    let rebuilt = apply_adapter(tmp.path(), "rebuilt", &base, &full);
    let cases = [json!({"name": "rebuilt", "ours": rebuilt, "theirs": tuned})];
    assert_matches(&mergekit_oracle(tmp.path(), &cases), &cases, 1e-5);
}

/// `amalgam moe` builds mergekit-moe's Mixtral: with `cheap_embed` gates the
/// same model, routers included; with `hidden` gates the same model but the
/// routers, which follow transformers' float32 forward pass one prompt at a
/// time (mergekit runs the base in bfloat16 on left-padded batches); random
/// gates are seeded.
#[test]
fn moe_matches_mergekit_moe() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "3", "--seed", "2"]);
    let script = "import json, sys\nfrom tokenizers import AddedToken, Tokenizer, models, pre_tokenizers\n\
                  words = ['<s>', '</s>'] + [f'w{i}' for i in range(382)]\n\
                  t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='w0'))\n\
                  t.pre_tokenizer = pre_tokenizers.Whitespace()\n\
                  t.add_special_tokens([AddedToken('<s>', special=True), AddedToken('</s>', special=True)])\n\
                  t.save(sys.argv[1] + '/tokenizer.json')\n\
                  json.dump({'tokenizer_class': 'PreTrainedTokenizerFast', 'bos_token': '<s>', \
                  'eos_token': '</s>', 'unk_token': 'w0'}, open(sys.argv[1] + '/tokenizer_config.json', 'w'))\n";
    let base = family.join("base");
    python_code(script, &[&base]);
    let expert = |i: usize| family.join(format!("finetune-{i}")).display().to_string();
    // Two experts; a third (`tail`: a shared expert instead, for Qwen2-MoE).
    let write_config = |name: &str, mode: &str, tail: &str| {
        let path = tmp.path().join(format!("{name}.yml"));
        std::fs::write(
            &path,
            format!(
                "base_model: {}\ngate_mode: {mode}\nexperts_per_token: 2\nexperts:\n  \
                 - source_model: {}\n    positive_prompts: [\"w1 w2 w3\", \"w4 w5\"]\n  \
                 - source_model: {}\n    positive_prompts: [\"w10 w11\"]\n    \
                 negative_prompts: [\"w1 w2\"]\n    residual_scale: 0.5\n{tail}",
                base.display(),
                expert(1),
                expert(2),
            ),
        )
        .unwrap();
        path
    };
    let config = |mode: &str| {
        let third = format!(
            "  - source_model: {}\n    positive_prompts: [\"w20 w21 w22 w23\"]\n",
            expert(3)
        );
        write_config(&format!("moe-{mode}"), mode, &third)
    };
    let build = |mode: &str, seed: &str, name: &str| {
        let out = tmp.path().join(name);
        let recipe = config(mode);
        ok([
            "moe".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--seed".as_ref(),
            seed.as_ref(),
        ]);
        out
    };
    // mergekit-moe's mixture for a config, and the oracle's comparison of two mixtures.
    let mergekit_moe = |recipe: &Path, name: &str| {
        let out = tmp.path().join(name);
        python_ok([
            "-m".as_ref(),
            "mergekit.scripts.moe".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--device".as_ref(),
            "cpu".as_ref(),
        ]);
        out
    };
    let compare = |a: &Path, b: &Path| -> Value {
        serde_json::from_str(&oracle_ok(
            "moe.py",
            &["compare".as_ref(), a.as_os_str(), b.as_os_str()],
        ))
        .unwrap()
    };
    for mode in ["cheap_embed", "hidden"] {
        let ours = build(mode, "0", &format!("ours-{mode}"));
        let theirs = mergekit_moe(&config(mode), &format!("theirs-{mode}"));
        let report = compare(&ours, &theirs);
        eprintln!("{mode}: {report}");
        assert_eq!(report["only_ours"], json!([]), "{mode}");
        assert_eq!(report["only_theirs"], json!([]), "{mode}");
        assert_eq!(report["other"], 0.0, "{mode}: experts, attention, norms");
        let router = report["router"].as_f64().unwrap();
        match mode {
            "cheap_embed" => assert!(router <= 1e-6, "{report}"),
            _ => {
                assert!(router <= 1e-2, "bfloat16 against float32: {report}");
                let gates: Value = serde_json::from_str(&oracle_ok(
                    "moe.py",
                    &[
                        "hidden-gates".as_ref(),
                        base.as_os_str(),
                        config(mode).as_os_str(),
                        ours.as_os_str(),
                    ],
                ))
                .unwrap();
                assert!(gates["max_abs"].as_f64().unwrap() <= 1e-5, "{gates}");
            }
        }
    }
    // Qwen2-MoE: a shared expert with its own gate, attention biases zeros.
    // mergekit 0.1.5 reads the shared expert only if it is the base (or an
    // expert), so the comparison uses the base; amalgam takes any model.
    let qwen = |shared: &Path, name: &str| {
        let tail = format!(
            "shared_experts:\n  - source_model: {}\n    positive_prompts: [\"w30 w31\"]\n",
            shared.display()
        );
        let path = write_config(name, "cheap_embed", &tail);
        let out = tmp.path().join(format!("{name}-out"));
        ok(["moe".as_ref(), path.as_os_str(), out.as_os_str()]);
        (path, out)
    };
    let (recipe, ours) = qwen(&base, "qwen-moe");
    let report = compare(&ours, &mergekit_moe(&recipe, "theirs-qwen-moe"));
    assert!(
        report["other"] == 0.0 && report["router"] == 0.0 && report["only_ours"] == json!([]),
        "{report}"
    );
    let (_, own_shared) = qwen(&family.join("finetune-3"), "qwen-moe-shared-3");
    let report = compare(&own_shared, &ours);
    assert!(
        report["other"].as_f64().unwrap() > 0.0,
        "another shared expert: {report}"
    );

    let digests = |dir: &Path| tensor_digests(&inspect_json(dir, true));
    let (first, again, other) = (
        build("random", "1", "random-1"),
        build("random", "1", "random-1-again"),
        build("random", "2", "random-2"),
    );
    assert_eq!(digests(&first), digests(&again));
    assert_ne!(digests(&first), digests(&other));
}
