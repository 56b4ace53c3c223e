//! A base whose `config.json` a loader rejects, or that disagrees with its
//! weights, gives no output: `convert` and `merge` (every command that
//! writes a model ends in the same check) fail with exit 1 naming the
//! config key and the tensor that disagrees, and write nothing. Before,
//! each of these wrote a model that did not load or computed NaN, exit 0.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::{json, Value};

/// A tiny synthetic family (base + 1 fine-tune) under `dir/m`.
fn family(dir: &Path) -> PathBuf {
    synth(&dir.join("m"), &["--finetunes", "1"]);
    dir.join("m")
}

/// What a test does to the base's config, what the error must name.
struct Case {
    edit: fn(&mut Value),
    needles: &'static [&'static str],
}

const Q: &str = "model.layers.0.self_attn.q_proj.weight";

fn cases() -> Vec<Case> {
    vec![
        Case {
            edit: |c| drop(c.as_object_mut().unwrap().remove("model_type")),
            needles: &["names no `model_type`"],
        },
        Case {
            edit: |c| c["model_type"] = "llamma".into(),
            needles: &["`model_type` \"llamma\" is no model type transformers knows"],
        },
        Case {
            edit: |c| c["model_type"] = json!(["llama"]),
            needles: &["`model_type` must be a string"],
        },
        Case {
            edit: |c| c["rms_norm_eps"] = json!(-1e-5),
            needles: &["`rms_norm_eps` must be a positive number"],
        },
        Case {
            edit: |c| c["rms_norm_eps"] = json!("1e-5"),
            needles: &["`rms_norm_eps` must be a positive number"],
        },
        Case {
            edit: |c| c["rope_scaling"] = json!({"rope_type": "linear", "factor": 0}),
            needles: &["`rope_scaling`", "`factor` must be a positive number"],
        },
        Case {
            edit: |c| c["rope_scaling"] = json!({"type": "stretchy", "factor": 2.0}),
            needles: &["`rope_scaling`", "\"stretchy\""],
        },
        Case {
            edit: |c| c["num_attention_heads"] = 8.into(),
            needles: &[Q, "`num_attention_heads` 8"],
        },
        Case {
            edit: |c| c["head_dim"] = 8.into(),
            needles: &[Q, "`head_dim` 8"],
        },
        Case {
            edit: |c| c["num_key_value_heads"] = 4.into(),
            needles: &[
                "model.layers.0.self_attn.k_proj.weight",
                "`num_key_value_heads` 4",
            ],
        },
        Case {
            edit: |c| c["hidden_size"] = 48.into(),
            needles: &["`hidden_size` is 48", "model.embed_tokens.weight"],
        },
        // A `text_config` turned the whole check off.
        Case {
            edit: |c| {
                c["text_config"] = json!({"num_hidden_layers": 12});
                c["num_hidden_layers"] = 12.into();
            },
            needles: &["`num_hidden_layers` is 12 but the weights hold 4 layers"],
        },
        Case {
            edit: |c| {
                c["text_config"] = json!({"num_hidden_layers": 12});
                c["num_key_value_heads"] = 1.into();
            },
            needles: &[
                "model.layers.0.self_attn.k_proj.weight",
                "`num_key_value_heads` 1",
            ],
        },
        // Transformers would load these with random q/k/v biases.
        Case {
            edit: |c| c["model_type"] = "qwen2".into(),
            needles: &[
                "`model_type` qwen2 has this bias",
                "model.layers.0.self_attn.q_proj.bias",
            ],
        },
    ]
}

/// Exit 1, every needle in the error, nothing written.
fn refused(args: &[&std::ffi::OsStr], out: &Path, needles: &[&str], what: &str) {
    let result = amalgam(args);
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "{what}: no {needle:?} in {stderr}");
    }
    assert!(!out.exists(), "{what}: wrote {}", out.display());
}

#[test]
fn convert_refuses_a_hostile_config() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let base = m.join("base");
    let out = tmp.path().join("out");
    let pristine = std::fs::read(base.join("config.json")).unwrap();
    ok(["convert".as_ref(), base.as_os_str(), out.as_os_str()]);
    std::fs::remove_dir_all(&out).unwrap();
    for (i, case) in cases().into_iter().enumerate() {
        std::fs::write(base.join("config.json"), &pristine).unwrap();
        edit_json(&base.join("config.json"), case.edit);
        let what = format!("case {i}");
        let args = ["convert".as_ref(), base.as_os_str(), out.as_os_str()];
        refused(&args, &out, case.needles, &what);
        // Each is the output check's refusal (convert checks nothing else).
        let stderr = String::from_utf8(amalgam(args).stderr).unwrap();
        assert!(
            stderr.contains("config.json would not match the weights"),
            "{what}: {stderr}"
        );
    }
}

#[test]
fn merges_refuse_a_base_with_a_hostile_config() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let base = m.join("base");
    let out = tmp.path().join("out");
    let recipe = tmp.path().join("r.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: task_arithmetic\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n    \
             parameters: {{weight: 0.5}}\n",
            m.display()
        ),
    )
    .unwrap();
    let pristine = std::fs::read(base.join("config.json")).unwrap();
    let args = ["merge".as_ref(), recipe.as_os_str(), out.as_os_str()];
    ok(args);
    std::fs::remove_dir_all(&out).unwrap();
    for (i, case) in cases().into_iter().enumerate() {
        std::fs::write(base.join("config.json"), &pristine).unwrap();
        edit_json(&base.join("config.json"), case.edit);
        refused(&args, &out, case.needles, &format!("case {i}"));
    }
}
