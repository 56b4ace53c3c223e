//! Merges of families other than amalgam's own Llama, on tiny random models
//! that transformers itself builds (tests/oracles/tiny_models.py): what sits
//! before and after the layers, and per-layer config lists, follow each
//! family's description.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

fn tiny(dir: &Path, family: &str, seed: u32) -> PathBuf {
    let out = dir.join(format!("{family}-{seed}"));
    oracle_ok(
        "tiny_models.py",
        &[
            family.as_ref(),
            out.as_os_str(),
            "--seed".as_ref(),
            seed.to_string().as_ref(),
        ],
    );
    out
}

/// Passthrough of `ranges[0]` of `a`'s layers, then `ranges[1]` of `b`'s, into `out`.
fn stack(dir: &Path, a: &Path, b: &Path, out: &Path, ranges: [(usize, usize); 2]) -> PathBuf {
    let recipe = dir.join("stack.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        \
             layer_range: [{}, {}]\n  - sources:\n      - model: {}\n        layer_range: [{}, {}]\n",
            a.display(),
            ranges[0].0,
            ranges[0].1,
            b.display(),
            ranges[1].0,
            ranges[1].1
        ),
    )
    .unwrap();
    ok(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    recipe
}

fn config(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap()
}

/// mergekit takes the tensors before the layers from a stack's first slice
/// and those after from its last (as amalgam does for Llama's embed_tokens);
/// on GPT-2, GPT-NeoX and BERT the positional embeddings, NeoX's `embed_in`
/// and BERT's whole embedding block were taken from the last slice.
#[test]
fn stacks_take_the_embedding_side_from_the_first_slice() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: [(&str, &[&str], &[&str]); 3] = [
        (
            "gpt2",
            &["transformer.wte.weight", "transformer.wpe.weight"],
            &["transformer.ln_f.weight", "transformer.ln_f.bias"],
        ),
        (
            "gpt_neox",
            &["gpt_neox.embed_in.weight"],
            &["gpt_neox.final_layer_norm.weight", "embed_out.weight"],
        ),
        (
            "bert",
            &[
                "embeddings.word_embeddings.weight",
                "embeddings.position_embeddings.weight",
                "embeddings.token_type_embeddings.weight",
                "embeddings.LayerNorm.weight",
            ],
            &["pooler.dense.weight", "pooler.dense.bias"],
        ),
    ];
    for (family, before, after) in cases {
        let (a, b) = (tiny(tmp.path(), family, 1), tiny(tmp.path(), family, 2));
        let out = tmp.path().join(format!("{family}-stack"));
        let recipe = stack(tmp.path(), &a, &b, &out, [(0, 2), (2, 4)]);
        let digests = |dir: &Path| tensor_digests(&inspect_json(dir, true));
        let (ours, first, last) = (digests(&out), digests(&a), digests(&b));
        for name in before {
            assert_eq!(
                ours[*name], first[*name],
                "{family}: {name} from the first slice"
            );
        }
        for name in after {
            assert_eq!(
                ours[*name], last[*name],
                "{family}: {name} from the last slice"
            );
        }
        if family == "gpt2" {
            // mergekit 0.1.5 merges GPT-2 (not NeoX or BERT): the same bytes.
            let cases = [json!({"name": family, "recipe": recipe, "ours": out})];
            assert_matches(&mergekit_oracle(tmp.path(), &cases), &cases, 0.0);
        }
    }
}

/// Qwen2, Qwen3, Gemma 2 and Gemma 3 configs carry `layer_types`, one entry
/// per layer: a stack of six layers from a four-layer model needs six, each
/// its source layer's, or transformers refuses the config (mergekit 0.1.5
/// writes the old four).
#[test]
fn stacks_carry_per_layer_config_lists_along() {
    let tmp = tempfile::tempdir().unwrap();
    for family in ["qwen2", "qwen3", "gemma2", "gemma3_text"] {
        let a = tiny(tmp.path(), family, 1);
        let out = tmp.path().join(format!("{family}-stack"));
        stack(tmp.path(), &a, &a, &out, [(0, 3), (1, 4)]);
        let types = config(&a)["layer_types"].as_array().unwrap().clone();
        let expected: Vec<Value> = [0, 1, 2, 1, 2, 3]
            .iter()
            .map(|&l| types[l].clone())
            .collect();
        let written = config(&out);
        assert_eq!(written["num_hidden_layers"], 6, "{family}");
        assert_eq!(written["layer_types"], json!(expected), "{family}");
        let loaded = hf_oracle(&[&out], false);
        assert!(
            loaded[out.to_str().unwrap()]["transformers"]
                .as_object()
                .is_some_and(|t| t.keys().any(|k| k.contains("layers.5."))),
            "{family}: transformers builds six layers: {loaded}"
        );
    }
}

/// T5 numbers an encoder and a decoder stack (`encoder.block.N.layer.M`):
/// read as one stack the message was about a tensor that should not exist.
/// Encoder–decoder models are refused, saying so, at the model's line.
#[test]
fn encoder_decoder_models_are_refused_saying_why() {
    let tmp = tempfile::tempdir().unwrap();
    let t5 = tiny(tmp.path(), "t5", 1);
    let recipe = tmp.path().join("t5.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: linear\nmodels:\n  - model: {0}\n    parameters: {{weight: 1}}\n  \
             - model: {0}\n    parameters: {{weight: 1}}\n",
            t5.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let message = fails(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    for needle in [
        "t5.yml:3:",
        "is an encoder–decoder model (t5)",
        "not supported yet",
    ] {
        assert!(message.contains(needle), "missing {needle:?} in {message}");
    }
    assert!(!out.exists());
}

/// Mixtral checkpoints store each expert's projections as tensors of their
/// own (`block_sparse_moe.experts.E.w1` …; transformers 5 writes that layout
/// too), and amalgam writes them back so: every method runs per expert.
/// TIES at density 0.5 keeps half of each expert's changes, however small
/// one expert's changes are next to another's (a trim over the experts
/// stacked together would keep almost none of the small ones), and the
/// result loads in transformers.
#[test]
fn mixtral_experts_are_merged_one_by_one() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "mixtral", 0);
    let tuned = tmp.path().join("tuned");
    let script = "import sys, torch\nfrom safetensors.torch import load_file, save_file\n\
                  import shutil\nshutil.copytree(sys.argv[1], sys.argv[2])\n\
                  d = load_file(sys.argv[1] + '/model.safetensors')\ng = torch.Generator().manual_seed(3)\n\
                  for k in d:\n    if '.experts.' in k:\n        e = int(k.split('.experts.')[1].split('.')[0])\n        \
                  d[k] = d[k] + torch.randn(d[k].shape, generator=g) * (1.0 if e == 0 else 1e-3)\n\
                  save_file(d, sys.argv[2] + '/model.safetensors', metadata={'format': 'pt'})\n";
    python_code(script, &[&base, &tuned]);
    let recipe = tmp.path().join("ties.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: ties\nbase_model: {}\nmodels:\n  - model: {}\n    \
             parameters: {{weight: 1.0, density: 0.5}}\ndtype: float32\n",
            base.display(),
            tuned.display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    ok(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    let check = "import sys, json\nfrom safetensors.torch import load_file\n\
                 b, o = load_file(sys.argv[1] + '/model.safetensors'), load_file(sys.argv[2] + '/model.safetensors')\n\
                 print(json.dumps({k: (o[k] != b[k]).float().mean().item() for k in o if '.experts.' in k}))\n";
    let report = python_code(check, &[&base, &out]);
    let changed: Value = serde_json::from_str(&report).unwrap();
    let fractions = changed.as_object().unwrap();
    assert_eq!(
        fractions.len(),
        4 * 4 * 3,
        "w1, w2 and w3 of 4 experts in 4 layers, each a tensor of its own"
    );
    for (name, fraction) in fractions {
        let f = fraction.as_f64().unwrap();
        assert!(
            (0.45..=0.55).contains(&f),
            "{name}: {f} of its entries changed"
        );
    }
    let loaded = hf_oracle(&[&out], false);
    assert!(
        loaded[out.to_str().unwrap()]["transformers"].is_object(),
        "{loaded}"
    );
}

/// Qwen2's q/k/v projections have biases: `extract-lora` saves them whole
/// (peft's `bias: lora_only`), and peft and amalgam's `BASE+ADAPTER` apply
/// the adapter to the same bits; at full rank it rebuilds the fine-tune.
#[test]
fn lora_adapters_carry_bias_changes() {
    let tmp = tempfile::tempdir().unwrap();
    let base = tiny(tmp.path(), "qwen2", 0);
    let tuned = tmp.path().join("tuned");
    let script = "import sys, shutil, torch\nfrom safetensors.torch import load_file, save_file\n\
                  shutil.copytree(sys.argv[1], sys.argv[2])\nd = load_file(sys.argv[1] + '/model.safetensors')\n\
                  g = torch.Generator().manual_seed(1)\n\
                  d = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in d.items()}\n\
                  save_file(d, sys.argv[2] + '/model.safetensors', metadata={'format': 'pt'})\n";
    python_code(script, &[&base, &tuned]);
    let adapter = tmp.path().join("adapter");
    ok([
        "extract-lora".as_ref(),
        base.as_os_str(),
        tuned.as_os_str(),
        adapter.as_os_str(),
        "--rank".as_ref(),
        "32".as_ref(),
    ]);
    let config: Value =
        serde_json::from_slice(&std::fs::read(adapter.join("adapter_config.json")).unwrap())
            .unwrap();
    assert_eq!(config["bias"], "lora_only");
    let applied = applies_as_peft(tmp.path(), "applied", &base, &adapter);
    let check = "import sys\nfrom safetensors.torch import load_file\n\
                 a, b = load_file(sys.argv[1] + '/model.safetensors'), load_file(sys.argv[2] + '/model.safetensors')\n\
                 print(max((a[k] - b[k]).abs().max().item() for k in b))";
    let worst: f64 = python_code(check, &[&applied, &tuned])
        .trim()
        .parse()
        .unwrap();
    assert!(worst < 1e-5, "rebuilt within {worst}");

    // An adapter trained with `lora_bias` (a bias on lora_B, scaled like the
    // matrices) applies as peft applies it.
    let trained = tmp.path().join("trained");
    let script = "import sys, torch\nfrom transformers import AutoModelForCausalLM\n\
                  from peft import LoraConfig, get_peft_model\n\
                  m = get_peft_model(AutoModelForCausalLM.from_pretrained(sys.argv[1]), \
                  LoraConfig(r=4, lora_alpha=6, target_modules=['q_proj', 'v_proj'], lora_bias=True))\n\
                  g = torch.Generator().manual_seed(2)\n\
                  with torch.no_grad():\n    for n, w in m.named_parameters():\n        \
                  if 'lora_' in n: w.copy_(torch.randn(w.shape, generator=g) * 0.1)\n\
                  m.save_pretrained(sys.argv[2])\n";
    python_code(script, &[&base, &trained]);
    applies_as_peft(tmp.path(), "trained-applied", &base, &trained);
}

/// The differential suite across families, as a mergekit user would try it:
/// on tiny random models transformers builds for each family, linear, TIES
/// and slerp give mergekit 0.1.5's tensors (linear within the fused
/// multiply-add mergekit's accumulation rounds once, see the methods table).
#[test]
fn every_family_merges_as_mergekit_merges_it() {
    let tmp = tempfile::tempdir().unwrap();
    let families = [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo2",
        "stablelm",
        "gpt2",
        "starcoder2",
    ];
    let mut cases = vec![];
    for family in families {
        let [base, a, b] = [0, 1, 2].map(|seed| tiny(tmp.path(), family, seed));
        let models = |params: [&str; 2]| {
            format!(
                "models:\n  - model: {}\n    parameters: {{{}}}\n  - model: {}\n    parameters: {{{}}}\n",
                a.display(),
                params[0],
                b.display(),
                params[1]
            )
        };
        for (method, recipe) in [
            (
                "linear",
                format!(
                    "merge_method: linear\n{}",
                    models(["weight: 0.3", "weight: 0.7"])
                ),
            ),
            (
                "ties",
                format!(
                    "merge_method: ties\nbase_model: {}\n{}",
                    base.display(),
                    models(["weight: 1.0, density: 0.5", "weight: 0.5, density: 0.7"])
                ),
            ),
            (
                "slerp",
                format!(
                    "merge_method: slerp\nbase_model: {}\nmodels:\n  - model: {0}\n  - model: {}\n\
                     parameters:\n  t: 0.3\n",
                    a.display(),
                    b.display()
                ),
            ),
        ] {
            let name = format!("{family}-{method}");
            let (recipe, out) = merge_ok(tmp.path(), &name, &recipe);
            cases.push(json!({"name": name, "recipe": recipe, "ours": out}));
        }
    }
    // Values are N(0, 0.5²): one float32 rounding of a result near 2 is 2.4e-7.
    assert_matches(&mergekit_oracle(tmp.path(), &cases), &cases, 5e-7);
}

/// Every family amalgam runs: linear, TIES, slerp, PLeaS (widened to 1.5×)
/// and a passthrough stack of transformers-built models load in amalgam's
/// forward pass and in transformers, with the same logits (a stack of six
/// layers from four, per-layer fields carried along).
#[test]
fn every_family_merge_runs_in_both_forward_passes() {
    use amalgam_nn::{supported_model_types, Decoder};
    use tch::{Device, Kind, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    let mut pairs: Vec<std::ffi::OsString> = vec!["--many".into()];
    let mut labels = vec![];
    for family in supported_model_types() {
        let [base, a, b] = [0, 1, 2].map(|seed| tiny(tmp.path(), family, seed));
        let models = format!(
            "models:\n  - model: {}\n    parameters: {{weight: 0.4, density: 0.6}}\n  - model: {}\n    parameters: {{weight: 0.6, density: 0.8}}\n",
            a.display(),
            b.display()
        );
        let mut outputs = vec![];
        for (method, extra) in [
            ("linear", String::new()),
            ("ties", format!("base_model: {}\n", base.display())),
            (
                "slerp",
                format!("base_model: {}\nparameters:\n  t: 0.3\n", a.display()),
            ),
        ] {
            let recipe = format!("merge_method: {method}\n{extra}{models}");
            outputs.push(merge_ok(tmp.path(), &format!("{family}-{method}-run"), &recipe).1);
        }
        // PLeaS, widened (a wider residual stream, more KV heads, wider FFNs).
        let recipe = format!(
            "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  \
             calibration: random\n  samples: 8\n  seq_len: 16\n  budget: 1.5\n",
            a.display(),
            b.display()
        );
        outputs.push(merge_ok(tmp.path(), &format!("{family}-pleas-run"), &recipe).1);
        let stacked = tmp.path().join(format!("{family}-stack-run"));
        stack(tmp.path(), &a, &b, &stacked, [(0, 3), (1, 4)]);
        assert_eq!(config(&stacked)["num_hidden_layers"], 6, "{family}");
        outputs.push(stacked);
        for out in outputs {
            let model = Decoder::load(&out, Device::Cpu)
                .unwrap_or_else(|e| panic!("{}: {e}", out.display()));
            let vocab = model.config.vocab_size as i64;
            let ids = Tensor::arange(2 * 16, (Kind::Int64, Device::Cpu))
                .remainder(vocab)
                .view([2, 16]);
            let logits = tch::no_grad(|| model.forward(&ids));
            let case = out.with_extension("case.safetensors");
            Tensor::write_safetensors(&[("ids", &ids), ("logits", &logits)], &case).unwrap();
            pairs.extend([out.clone().into_os_string(), case.into_os_string()]);
            labels.push(out.display().to_string());
        }
    }
    let args: Vec<&std::ffi::OsStr> = pairs.iter().map(|p| p.as_os_str()).collect();
    let reports: Vec<Value> = serde_json::from_str(&oracle_ok("hf_logits.py", &args)).unwrap();
    assert_eq!(reports.len(), labels.len());
    for (label, report) in labels.iter().zip(&reports) {
        let scale = report["logit_scale"].as_f64().unwrap().max(1.0);
        let diff = report["max_logit_diff"].as_f64().unwrap();
        assert!(
            diff <= 1e-4 * scale,
            "{label}: transformers differs by {diff}: {report}"
        );
        assert!(
            report["logit_std"].as_f64().unwrap() > 0.1,
            "{label}: {report}"
        );
    }
}

/// `amalgam stitch` on every family: two transformers-built anchors of
/// different depths, random-token calibration, streamed (`--dry-run` states
/// the plan and its peak memory); the family's anchors are the input
/// checkpoints tensor for tensor, and every route runs to finite logits.
/// Anchors whose vocabularies differ are refused, naming the anchor.
#[test]
fn every_family_stitches_streamed() {
    use amalgam_elastic::stitch::StitchedFamily;
    use amalgam_nn::supported_model_types;
    use tch::{Device, Kind, Tensor};
    let tmp = tempfile::tempdir().unwrap();
    for family in supported_model_types() {
        let deep = tiny(tmp.path(), family, 1);
        let shallow = tmp.path().join(format!("{family}-shallow"));
        oracle_ok(
            "tiny_models.py",
            &[
                family.as_ref(),
                shallow.as_os_str(),
                "--layers".as_ref(),
                "3".as_ref(),
            ],
        );
        let recipe = tmp.path().join(format!("{family}-stitch.yml"));
        std::fs::write(
            &recipe,
            format!(
                "kind: stitch\nanchors: [{}, {}]\ncalibration: {{source: random, samples: 6, \
                 seq_len: 16, batch: 4}}\n",
                shallow.display(),
                deep.display()
            ),
        )
        .unwrap();
        let out = tmp.path().join(format!("{family}-family"));
        let args = |extra: &'static str| {
            let mut args = vec!["stitch".as_ref(), recipe.as_os_str(), out.as_os_str()];
            args.extend((!extra.is_empty()).then(|| std::ffi::OsStr::new(extra)));
            args
        };
        let plan = ok(args("--dry-run"));
        assert!(
            plan.contains("peak memory ≈") && plan.contains("streams kept: anchor-0"),
            "{family}: {plan}"
        );
        assert!(!out.exists(), "{family}: a dry run wrote the family");
        ok(args(""));
        let stitched = StitchedFamily::load(&out, Device::Cpu, Kind::Float)
            .unwrap_or_else(|e| panic!("{family}: {e}"));
        for (a, input) in [&shallow, &deep].into_iter().enumerate() {
            let copied = stitched.anchors[a].tensors();
            let original = amalgam_nn::Decoder::load(input, Device::Cpu)
                .unwrap()
                .tensors();
            assert_eq!(copied.len(), original.len(), "{family}");
            for (name, tensor) in &original {
                assert!(tensor.equal(&copied[name]), "{family}: anchor-{a} {name}");
            }
        }
        let routes = amalgam_elastic::stitch::family_routes([3, 4]);
        assert_eq!(stitched.members.len(), 2 + routes.len(), "{family}");
        // A route's size counts every stored tensor it runs (biases, the
        // family's norms), by the input files' own tensor names.
        let stored: Vec<Vec<(String, u64)>> = [&shallow, &deep]
            .iter()
            .map(|dir| {
                let checkpoint = amalgam_checkpoint::Checkpoint::open(dir).unwrap();
                checkpoint
                    .tensors()
                    .iter()
                    .map(|t| (t.name.clone(), t.shape.iter().product::<usize>() as u64))
                    .collect()
            })
            .collect();
        let layer = |name: &str| -> Option<usize> {
            let rest = &name[name.find(".layers.")? + ".layers.".len()..];
            rest[..rest.find('.')?].parse().ok()
        };
        let is_embedding = |name: &str| name.contains("embed_tokens") || name.contains("embed_in");
        for member in &stitched.members[2..] {
            let amalgam_elastic::stitch::Network::Stitched(route, stitch) = &member.network else {
                unreachable!("anchors come first")
            };
            let (front, end) = (&stored[route.front], &stored[route.end]);
            let tied = !end
                .iter()
                .any(|(n, _)| n.contains("lm_head") || n.contains("embed_out"));
            let front_size: u64 = front
                .iter()
                .filter(|(n, _)| match layer(n) {
                    Some(l) => l < route.cut,
                    None => is_embedding(n),
                })
                .map(|(_, size)| size)
                .sum();
            let end_size: u64 = end
                .iter()
                .filter(|(n, _)| match layer(n) {
                    Some(l) => l >= route.resume,
                    None => !is_embedding(n) || tied,
                })
                .map(|(_, size)| size)
                .sum();
            let stitch_size = (stitch.weight.numel() + stitch.bias.numel()) as u64;
            assert_eq!(
                member.parameters,
                front_size + stitch_size + end_size,
                "{family} {}",
                member.name
            );
        }
        let ids = Tensor::arange(2 * 16, (Kind::Int64, Device::Cpu))
            .remainder(96)
            .view([2, 16]);
        for member in &stitched.members {
            use amalgam_nn::eval::LanguageModel;
            let logits = tch::no_grad(|| stitched.scorer(member).logits(&ids));
            assert_eq!(logits.size(), [2, 16, 96], "{family} {}", member.name);
            assert_eq!(
                logits.isfinite().all().int64_value(&[]),
                1,
                "{family} {}",
                member.name
            );
        }
    }
    // A zoo model's byte-level vocabulary is not a transformers tiny model's.
    let zoo = amalgam_zoo::ZooSize::named("micro").unwrap();
    let byte_level = tmp.path().join("byte-level");
    amalgam_nn::Decoder::new(zoo.shape.clone(), Device::Cpu, 0)
        .save_with_tokenizer(&byte_level, &Default::default())
        .unwrap();
    let recipe = tmp.path().join("mixed.yml");
    std::fs::write(
        &recipe,
        format!(
            "kind: stitch\nanchors:\n  - {}\n  - {}\ncalibration: {{source: random}}\n",
            tmp.path().join("llama-1").display(),
            byte_level.display()
        ),
    )
    .unwrap();
    let message = fails([
        "stitch".as_ref(),
        recipe.as_os_str(),
        tmp.path().join("mixed").as_os_str(),
    ]);
    assert!(
        message.contains("mixed.yml:4:5: anchor") && message.contains("share one tokenizer"),
        "{message}"
    );
}
