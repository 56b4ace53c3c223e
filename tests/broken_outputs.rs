//! Nothing broken claims success: a merge that would leave tensors out, make
//! NaN or infinite values from finite inputs, or write a config that does not
//! describe its weights fails with the tensor, model or recipe line named,
//! exit 1, and writes nothing.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;
use serde_json::Value;

/// A tiny family (base + 2 fine-tunes, single files) under `dir/m`.
fn family(dir: &Path) -> PathBuf {
    synth(&dir.join("m"), &["--finetunes", "2"]);
    dir.join("m")
}

fn recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// `amalgam merge RECIPE OUT` (no -q: warnings are part of what is tested).
fn merge(recipe: &Path, out: &Path, extra: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()])
        .args(extra)
        .output()
        .unwrap()
}

fn refused(result: &std::process::Output, out: &Path, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    assert!(!out.exists(), "nothing written");
}

fn succeeded(result: &std::process::Output) -> String {
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(result.status.success(), "{stderr}");
    stderr
}

/// Rewrites a single-file checkpoint's tensors with Python's safetensors
/// (an independent writer): `edit` is a statement over the dict `d`.
fn edit_tensors(dir: &Path, edit: &str) {
    let file = dir.join("model.safetensors");
    let script = format!(
        "import sys\nfrom safetensors.numpy import load_file, save_file\nd = load_file(sys.argv[1])\n\
         {edit}\nsave_file(d, sys.argv[1], metadata={{'format': 'pt'}})\n"
    );
    python_ok(["-c".as_ref(), script.as_str().as_ref(), file.as_os_str()]);
}

fn linear(m: &Path, first: &str, second: &str, params: &str) -> String {
    format!(
        "merge_method: linear\nmodels:\n  - model: {0}/{first}\n    parameters: {{weight: 1.0}}\n  \
         - model: {0}/{second}\n    parameters: {params}\n",
        m.display()
    )
}

#[test]
fn tensors_the_first_model_lacks_are_not_silently_dropped() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    let r = recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    edit_tensors(&m.join("base"), "del d['model.norm.weight']");
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "r.yml:5:",
            "finetune-1` has tensor `model.norm.weight`",
            "base` (whose layout the output follows) lacks",
        ],
    );
    // A tensor missing from the layer the output's layers are modelled on.
    edit_tensors(
        &m.join("finetune-2"),
        "del d['model.layers.0.mlp.up_proj.weight']",
    );
    let r = recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "finetune-2", "finetune-1", "{weight: 1.0}"),
    );
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "has tensor `model.layers.1.mlp.up_proj.weight`",
            "the output's layers are built from layer 0 of model",
            "model.layers.0.mlp.up_proj.weight",
        ],
    );
}

#[test]
fn a_config_that_disagrees_with_the_weights_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    let config_path = m.join("finetune-1/config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 6.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let r = recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "r.yml:5:",
            "finetune-1/config.json",
            "`num_hidden_layers` is 6 but the weights hold 4 layers",
        ],
    );
    for bad in [Value::from(-1), Value::from("4"), Value::from(4.5)] {
        config["num_hidden_layers"] = bad.clone();
        std::fs::write(&config_path, config.to_string()).unwrap();
        refused(
            &merge(&r, &out, &[]),
            &out,
            &[
                "config.json",
                "`num_hidden_layers` must be a positive integer",
            ],
        );
    }
}

#[test]
fn non_finite_parameters_are_refused_at_their_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    for (i, params) in [
        "{weight: .nan}",
        "{weight: .inf}",
        "{weight: -.inf}",
        "{weight: \"nan\"}",
        "{weight: [1.0, .nan]}",
    ]
    .iter()
    .enumerate()
    {
        let r = recipe(
            tmp.path(),
            &format!("r{i}.yml"),
            &linear(&m, "base", "finetune-1", params),
        );
        refused(
            &merge(&r, &out, &[]),
            &out,
            &[&format!("r{i}.yml:6:"), "must be a finite number"],
        );
    }
}

#[test]
fn non_finite_results_from_finite_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    // Weights that sum to zero under normalize: 0/0.
    let zero = recipe(
        tmp.path(),
        "zero.yml",
        &linear(&m, "base", "finetune-1", "{weight: -1.0}"),
    );
    refused(
        &merge(&zero, &out, &[]),
        &out,
        &[
            "NaN or infinite values from finite inputs",
            "zero.yml:6:",
            "--allow-nonfinite",
        ],
    );
    // Huge weights overflow.
    let huge = recipe(
        tmp.path(),
        "huge.yml",
        &(linear(&m, "base", "finetune-1", "{weight: 1e308}")
            .replace("weight: 1.0", "weight: 1e308")
            + "parameters:\n  normalize: false\n"),
    );
    refused(
        &merge(&huge, &out, &[]),
        &out,
        &["NaN or infinite values from finite inputs", "huge.yml:"],
    );
    // The escape hatch writes them, and says so.
    let stderr = succeeded(&merge(&zero, &out, &["--allow-nonfinite"]));
    assert!(stderr.contains("--allow-nonfinite"), "{stderr}");
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn inputs_that_are_not_finite_may_give_outputs_that_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    edit_tensors(
        &m.join("finetune-1"),
        "import numpy as np\nd['model.norm.weight'][0] = np.nan",
    );
    let r = recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    let stderr = succeeded(&merge(&r, &out, &[]));
    assert!(
        stderr.contains("model.norm.weight") && stderr.contains("its inputs hold 1"),
        "{stderr}"
    );
}

#[test]
fn a_cast_that_overflows_is_refused_by_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    edit_tensors(&m.join("base"), "d['model.norm.weight'][3] = 1e6");
    let out = tmp.path().join("out");
    let result = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args([
            "convert".as_ref(),
            m.join("base").as_os_str(),
            out.as_os_str(),
        ])
        .args(["--dtype", "float16"])
        .output()
        .unwrap();
    refused(
        &result,
        &out,
        &["tensor model.norm.weight: 1 of its 64 values are NaN or infinite"],
    );
}

#[test]
fn slerp_outside_zero_to_one_is_a_warning_with_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let r = recipe(
        tmp.path(),
        "slerp.yml",
        &format!(
            "merge_method: slerp\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n\
             parameters:\n  t: 1.5\n",
            m.display()
        ),
    );
    let stderr = succeeded(&merge(&r, &tmp.path().join("out"), &[]));
    assert!(
        stderr.contains("slerp.yml:6:") && stderr.contains("outside [0, 1]"),
        "{stderr}"
    );
}

/// Passthrough of layers from models of different FFN widths: one integer
/// `intermediate_size` cannot describe it (transformers would refuse it).
/// Per-layer config lists follow the stacked layers, and the result loads.
#[test]
fn passthrough_writes_configs_that_describe_the_stack() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let narrow = tmp.path().join("narrow");
    let extract = recipe(
        tmp.path(),
        "narrow.yml",
        &format!(
            "kind: extract\nmodel: {}/base\nffn_widths: M\n",
            m.display()
        ),
    );
    ok(["extract".as_ref(), extract.as_os_str(), narrow.as_os_str()]);
    let stack = |a: &Path, b: &Path| {
        format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {}\n        \
             layer_range: [0, 3]\n  - sources:\n      - model: {}\n        layer_range: [1, 4]\n",
            a.display(),
            b.display()
        )
    };
    let out = tmp.path().join("out");
    let r = recipe(tmp.path(), "mixed.yml", &stack(&m.join("base"), &narrow));
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "different FFN widths",
            "layer 0: 160",
            "layer 3: 40",
            "would not load",
        ],
    );
    // A dry run says so too: the plan is only printed when the run would work.
    refused(
        &merge(&r, &out, &["--dry-run"]),
        &out,
        &["different FFN widths"],
    );

    // Per-layer lists: four entries in, six out, each from its source layer.
    let types = [
        "full_attention",
        "chunked_attention",
        "sliding_attention",
        "sliding_attention",
    ];
    for member in ["base", "finetune-1"] {
        let path = m.join(member).join("config.json");
        let mut config: Value = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
        config["layer_types"] = serde_json::json!(types);
        std::fs::write(&path, config.to_string()).unwrap();
    }
    let r = recipe(
        tmp.path(),
        "stack.yml",
        &stack(&m.join("base"), &m.join("finetune-1")),
    );
    succeeded(&merge(&r, &out, &[]));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["num_hidden_layers"], 6);
    let expected: Vec<&str> = [0, 1, 2, 1, 2, 3].iter().map(|&l| types[l]).collect();
    assert_eq!(config["layer_types"], serde_json::json!(expected));
    // transformers builds the six-layer model from it and loads every tensor.
    let oracle = hf_oracle(&[&out], false);
    assert!(oracle[out.to_str().unwrap()]["transformers"]
        .as_object()
        .is_some_and(|t| t.contains_key("model.layers.5.mlp.up_proj.weight")));
}

#[test]
fn method_and_dtype_errors_name_the_model_and_the_recipe_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let out = tmp.path().join("out");
    let della = recipe(
        tmp.path(),
        "della.yml",
        &format!(
            "merge_method: della\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n    \
             parameters:\n      weight: 1.0\n      density: 0.9\n",
            m.display()
        ),
    );
    refused(
        &merge(&della, &out, &[]),
        &out,
        &[
            "density ± epsilon",
            "`density: 0.9` for model",
            "finetune-1` at",
            "della.yml:7:",
        ],
    );
    edit_tensors(
        &m.join("finetune-1"),
        "import numpy as np\nd['model.norm.weight'] = d['model.norm.weight'].view(np.uint16)[:64]",
    );
    let r = recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "r.yml:5:",
            "finetune-1",
            "model.norm.weight",
            "stored as U16",
        ],
    );
}

/// Found by the property test over random recipes: nearswap at t = 0 in half
/// precision computes ∞ · 0 where the models agree (as mergekit does); the
/// NaNs are refused, not written.
#[test]
fn nearswap_at_zero_in_half_precision_is_refused_not_written() {
    let tmp = tempfile::tempdir().unwrap();
    synth(
        &tmp.path().join("m"),
        &["--finetunes", "1", "--dtype", "float16"],
    );
    let m = tmp.path().join("m");
    let r = recipe(
        tmp.path(),
        "nearswap.yml",
        &format!(
            "merge_method: nearswap\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n\
             parameters:\n  t: 0\n",
            m.display()
        ),
    );
    let out = tmp.path().join("out");
    refused(
        &merge(&r, &out, &[]),
        &out,
        &[
            "NaN or infinite values from finite inputs",
            "`t: 0` at",
            "nearswap.yml:6:",
        ],
    );
}

/// GPT-2 names its layer count `n_layer` (transformers maps
/// `num_hidden_layers` to it): a passthrough stack updates that key and adds
/// no second spelling, and transformers builds the 6-layer model from it.
#[test]
fn gpt2_stacks_keep_the_familys_own_config_keys() {
    let tmp = tempfile::tempdir().unwrap();
    let gpt2 = tmp.path().join("gpt2");
    let script = "import sys, torch\nfrom transformers import GPT2Config, GPT2LMHeadModel\n\
                  torch.manual_seed(0)\n\
                  c = GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=64)\n\
                  GPT2LMHeadModel(c).save_pretrained(sys.argv[1])\n";
    python_ok(["-c".as_ref(), script.as_ref(), gpt2.as_os_str()]);
    let r = recipe(
        tmp.path(),
        "stack.yml",
        &format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {0}\n        \
             layer_range: [0, 3]\n  - sources:\n      - model: {0}\n        layer_range: [1, 4]\n",
            gpt2.display()
        ),
    );
    let out = tmp.path().join("out");
    succeeded(&merge(&r, &out, &[]));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["n_layer"], 6, "{config}");
    assert!(config.get("num_hidden_layers").is_none(), "{config}");
    let oracle = hf_oracle(&[&out], false);
    assert!(oracle[out.to_str().unwrap()]["transformers"]
        .as_object()
        .is_some_and(|t| t.contains_key("transformer.h.5.mlp.c_fc.weight")));
}
