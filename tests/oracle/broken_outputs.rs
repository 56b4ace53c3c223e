//! Broken outputs the oracle sees: passthrough stacks write configs that
//! describe their layers, and transformers builds the stacked model from them.

use std::path::Path;

use crate::common::*;
use serde_json::Value;

/// Passthrough of layers from models of different FFN widths: one integer
/// `intermediate_size` cannot describe it (transformers would refuse it).
/// Per-layer config lists follow the stacked layers, and the result loads.
#[test]
fn passthrough_writes_configs_that_describe_the_stack() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    let narrow = tmp.path().join("narrow");
    let extract = write_recipe(
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
    let r = write_recipe(tmp.path(), "mixed.yml", &stack(&m.join("base"), &narrow));
    refused_unwritten(
        &merge_run(&r, &out, &[]),
        &out,
        &[
            "different FFN widths",
            "layer 0: 160",
            "layer 3: 40",
            "would not load",
        ],
    );
    // A dry run says so too: the plan is only printed when the run would work.
    refused_unwritten(
        &merge_run(&r, &out, &["--dry-run"]),
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
    let r = write_recipe(
        tmp.path(),
        "stack.yml",
        &stack(&m.join("base"), &m.join("finetune-1")),
    );
    succeeded(&merge_run(&r, &out, &[]));
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
    let r = write_recipe(
        tmp.path(),
        "stack.yml",
        &format!(
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: {0}\n        \
             layer_range: [0, 3]\n  - sources:\n      - model: {0}\n        layer_range: [1, 4]\n",
            gpt2.display()
        ),
    );
    let out = tmp.path().join("out");
    succeeded(&merge_run(&r, &out, &[]));
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["n_layer"], 6, "{config}");
    assert!(config.get("num_hidden_layers").is_none(), "{config}");
    let oracle = hf_oracle(&[&out], false);
    assert!(oracle[out.to_str().unwrap()]["transformers"]
        .as_object()
        .is_some_and(|t| t.contains_key("transformer.h.5.mlp.c_fc.weight")));
}
