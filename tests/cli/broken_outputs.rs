//! Nothing broken claims success: a merge that would leave tensors out, make
//! NaN or infinite values from finite inputs, or write a config that does not
//! describe its weights fails with the tensor, model or recipe line named,
//! exit 1, and writes nothing.

use crate::common;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::process::Command;

use common::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};
use serde_json::Value;

/// A tensor as the `safetensors` crate reads it: dtype, shape, little-endian bytes.
type Stored = (Dtype, Vec<usize>, Vec<u8>);

/// Rewrites a single-file checkpoint's tensors with the `safetensors` crate
/// (not amalgam's writer): `edit` changes the map of stored tensors.
fn edit_tensors(dir: &Path, edit: impl FnOnce(&mut BTreeMap<String, Stored>)) {
    let file = dir.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    let mut tensors: BTreeMap<String, Stored> = SafeTensors::deserialize(&bytes)
        .unwrap()
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let stored = (view.dtype(), view.shape().to_vec(), view.data().to_vec());
            (name, stored)
        })
        .collect();
    edit(&mut tensors);
    let views = tensors.iter().map(|(name, (dtype, shape, data))| {
        (name, TensorView::new(*dtype, shape.clone(), data).unwrap())
    });
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), &file).unwrap();
}

/// Sets entry `index` of an F32 tensor.
fn set_f32(tensors: &mut BTreeMap<String, Stored>, name: &str, index: usize, value: f32) {
    let (dtype, _, data) = tensors.get_mut(name).unwrap();
    assert_eq!(*dtype, Dtype::F32, "{name}");
    data[4 * index..4 * index + 4].copy_from_slice(&value.to_le_bytes());
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
    let m = synth_family(tmp.path());
    let out = tmp.path().join("out");
    let r = write_recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    edit_tensors(&m.join("base"), |d| {
        d.remove("model.norm.weight").unwrap();
    });
    refused_unwritten(
        &merge_run(&r, &out, &[]),
        &out,
        &[
            "r.yml:5:",
            "finetune-1` has tensor `model.norm.weight`",
            "base` (whose layout the output follows) lacks",
        ],
    );
    // A tensor missing from the layer the output's layers are modelled on.
    edit_tensors(&m.join("finetune-2"), |d| {
        d.remove("model.layers.0.mlp.up_proj.weight").unwrap();
    });
    let r = write_recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "finetune-2", "finetune-1", "{weight: 1.0}"),
    );
    refused_unwritten(
        &merge_run(&r, &out, &[]),
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
    let m = synth_family(tmp.path());
    let out = tmp.path().join("out");
    let config_path = m.join("finetune-1/config.json");
    let mut config: Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["num_hidden_layers"] = 6.into();
    std::fs::write(&config_path, config.to_string()).unwrap();
    let r = write_recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    refused_unwritten(
        &merge_run(&r, &out, &[]),
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
        refused_unwritten(
            &merge_run(&r, &out, &[]),
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
    let m = synth_family(tmp.path());
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
        let r = write_recipe(
            tmp.path(),
            &format!("r{i}.yml"),
            &linear(&m, "base", "finetune-1", params),
        );
        refused_unwritten(
            &merge_run(&r, &out, &[]),
            &out,
            &[&format!("r{i}.yml:6:"), "must be a finite number"],
        );
    }
}

#[test]
fn non_finite_results_from_finite_inputs_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    let out = tmp.path().join("out");
    // Weights that sum to zero under normalize: 0/0.
    let zero = write_recipe(
        tmp.path(),
        "zero.yml",
        &linear(&m, "base", "finetune-1", "{weight: -1.0}"),
    );
    refused_unwritten(
        &merge_run(&zero, &out, &[]),
        &out,
        &[
            "NaN or infinite values from finite inputs",
            "zero.yml:6:",
            "--allow-nonfinite",
        ],
    );
    // Huge weights overflow.
    let huge = write_recipe(
        tmp.path(),
        "huge.yml",
        &(linear(&m, "base", "finetune-1", "{weight: 1e308}")
            .replace("weight: 1.0", "weight: 1e308")
            + "parameters:\n  normalize: false\n"),
    );
    refused_unwritten(
        &merge_run(&huge, &out, &[]),
        &out,
        &["NaN or infinite values from finite inputs", "huge.yml:"],
    );
    // The escape hatch writes them, and says so.
    let stderr = succeeded(&merge_run(&zero, &out, &["--allow-nonfinite"]));
    assert!(
        stderr.contains("NaN or infinite values written (allowed)"),
        "{stderr}"
    );
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn inputs_that_are_not_finite_may_give_outputs_that_are_not() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    let out = tmp.path().join("out");
    edit_tensors(&m.join("finetune-1"), |d| {
        set_f32(d, "model.norm.weight", 0, f32::NAN)
    });
    let r = write_recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    let stderr = succeeded(&merge_run(&r, &out, &[]));
    assert!(
        stderr.contains("model.norm.weight") && stderr.contains("its inputs hold 1"),
        "{stderr}"
    );
}

#[test]
fn a_cast_that_overflows_is_refused_by_the_writer() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    edit_tensors(&m.join("base"), |d| set_f32(d, "model.norm.weight", 3, 1e6));
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
    refused_unwritten(
        &result,
        &out,
        &["tensor model.norm.weight: 1 of its 64 values are NaN or infinite"],
    );
}

#[test]
fn slerp_outside_zero_to_one_is_a_warning_with_the_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    let r = write_recipe(
        tmp.path(),
        "slerp.yml",
        &format!(
            "merge_method: slerp\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n\
             parameters:\n  t: 1.5\n",
            m.display()
        ),
    );
    let stderr = succeeded(&merge_run(&r, &tmp.path().join("out"), &[]));
    assert!(
        stderr.contains("slerp.yml:6:") && stderr.contains("outside [0, 1]"),
        "{stderr}"
    );
}

#[test]
fn method_and_dtype_errors_name_the_model_and_the_recipe_line() {
    let tmp = tempfile::tempdir().unwrap();
    let m = synth_family(tmp.path());
    let out = tmp.path().join("out");
    let della = write_recipe(
        tmp.path(),
        "della.yml",
        &format!(
            "merge_method: della\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n    \
             parameters:\n      weight: 1.0\n      density: 0.9\n",
            m.display()
        ),
    );
    refused_unwritten(
        &merge_run(&della, &out, &[]),
        &out,
        &[
            "density ± epsilon",
            "`density: 0.9` for model",
            "finetune-1` at",
            "della.yml:7:",
        ],
    );
    // The first 64 U16 halves of the F32 weights.
    edit_tensors(&m.join("finetune-1"), |d| {
        let (dtype, shape, data) = d.get_mut("model.norm.weight").unwrap();
        (*dtype, *shape) = (Dtype::U16, vec![64]);
        data.truncate(128);
    });
    let r = write_recipe(
        tmp.path(),
        "r.yml",
        &linear(&m, "base", "finetune-1", "{weight: 1.0}"),
    );
    refused_unwritten(
        &merge_run(&r, &out, &[]),
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
    let r = write_recipe(
        tmp.path(),
        "nearswap.yml",
        &format!(
            "merge_method: nearswap\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n\
             parameters:\n  t: 0\n",
            m.display()
        ),
    );
    let out = tmp.path().join("out");
    refused_unwritten(
        &merge_run(&r, &out, &[]),
        &out,
        &[
            "NaN or infinite values from finite inputs",
            "`t: 0` at",
            "nearswap.yml:6:",
        ],
    );
}
