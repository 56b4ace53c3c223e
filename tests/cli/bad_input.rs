//! Every kind of broken input gets a clear error naming the file (and the
//! tensor, where one is at fault), exit status 1, and no output at all.

use crate::common;

use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

/// A sharded tiny checkpoint to break, in its own temp dir.
fn sharded_checkpoint() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    synth(
        &tmp.path().join("f"),
        &["--finetunes", "0", "--out-shard-size", "200KB"],
    );
    let dir = tmp.path().join("f/base");
    (tmp, dir)
}

fn index(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("model.safetensors.index.json")).unwrap())
        .unwrap()
}

const SHARD: &str = "model-00002-of-00005.safetensors";

/// Splits a safetensors file into (header JSON, data).
fn split(path: &Path) -> (Value, Vec<u8>) {
    let bytes = std::fs::read(path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    (
        serde_json::from_slice(&bytes[8..8 + n]).unwrap(),
        bytes[8 + n..].to_vec(),
    )
}

fn join(path: &Path, header: &Value, data: &[u8]) {
    let mut text = serde_json::to_vec(header).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut bytes = (text.len() as u64).to_le_bytes().to_vec();
    bytes.extend(text);
    bytes.extend(data);
    std::fs::write(path, bytes).unwrap();
}

/// (name, entry) of the shard's tensors in offset order.
fn entries(header: &Value) -> Vec<(String, Value)> {
    let mut list: Vec<(String, Value)> = header
        .as_object()
        .unwrap()
        .iter()
        .filter(|(k, _)| *k != "__metadata__")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    list.sort_by_key(|(_, v)| v["data_offsets"][0].as_u64().unwrap());
    list
}

/// Runs inspect and convert on the broken checkpoint; both must fail with a
/// message containing every one of `needles`, and convert must leave nothing.
fn assert_refused(tmp: &Path, dir: &Path, needles: &[&str]) {
    let out = tmp.join("out");
    let before = listing(tmp);
    for args in [
        vec!["inspect".as_ref(), dir.as_os_str()],
        vec!["convert".as_ref(), dir.as_os_str(), out.as_os_str()],
    ] {
        let err = fails(args);
        for needle in needles {
            assert!(err.contains(needle), "missing {needle:?} in: {err}");
        }
    }
    assert!(!out.exists(), "no output directory");
    assert_eq!(listing(tmp), before, "no staging directory left behind");
}

#[test]
fn truncated_shard() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let (header, _) = split(&path);
    let last = entries(&header).pop().unwrap().0;
    let len = std::fs::metadata(&path).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &[SHARD, &format!("tensor {last}"), "truncated"],
    );
}

#[test]
fn file_shorter_than_a_header() {
    let (tmp, dir) = sharded_checkpoint();
    std::fs::write(dir.join(SHARD), b"\x10\x00").unwrap();
    assert_refused(tmp.path(), &dir, &[SHARD, "too short", "truncated"]);
}

#[test]
fn header_length_beyond_the_file() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let mut bytes = std::fs::read(&path).unwrap();
    let too_long = bytes.len() as u64 + 100;
    bytes[..8].copy_from_slice(&too_long.to_le_bytes());
    std::fs::write(&path, bytes).unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &[
            SHARD,
            &format!("header length {too_long} bytes goes beyond"),
        ],
    );
}

#[test]
fn malformed_header_json() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[8] = b'x';
    std::fs::write(&path, bytes).unwrap();
    assert_refused(tmp.path(), &dir, &[SHARD, "not valid safetensors JSON"]);
}

#[test]
fn offsets_out_of_range() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let (mut header, data) = split(&path);
    let (last, entry) = entries(&header).pop().unwrap();
    // Claim a bigger last tensor than the file holds, consistently with its shape.
    let start = entry["data_offsets"][0].as_u64().unwrap();
    let end = entry["data_offsets"][1].as_u64().unwrap();
    let rows = entry["shape"][0].as_u64().unwrap();
    header[&last]["shape"][0] = (rows * 2).into();
    header[&last]["data_offsets"][1] = (start + 2 * (end - start)).into();
    join(&path, &header, &data);
    assert_refused(
        tmp.path(),
        &dir,
        &[
            SHARD,
            &format!("tensor {last}"),
            "run past the end of the file",
        ],
    );
}

#[test]
fn overlapping_offsets() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let (mut header, data) = split(&path);
    let list = entries(&header);
    let (first, second) = (&list[0], &list[1]);
    // Move the second tensor back so it overlaps the first by 8 bytes.
    let start = second.1["data_offsets"][0].as_u64().unwrap() - 8;
    let end = second.1["data_offsets"][1].as_u64().unwrap() - 8;
    header[&second.0]["data_offsets"] = serde_json::json!([start, end]);
    join(&path, &header, &data);
    assert!(first.1["data_offsets"][1].as_u64().unwrap() > start);
    assert_refused(
        tmp.path(),
        &dir,
        &[SHARD, &format!("tensor {}", second.0), "overlap"],
    );
}

#[test]
fn size_disagrees_with_shape() {
    let (tmp, dir) = sharded_checkpoint();
    let path = dir.join(SHARD);
    let (mut header, data) = split(&path);
    let (name, _) = entries(&header).remove(0);
    header[&name]["dtype"] = "F16".into();
    join(&path, &header, &data);
    assert_refused(
        tmp.path(),
        &dir,
        &[SHARD, &format!("tensor {name}"), "needs"],
    );
}

#[test]
fn index_and_shard_disagree_on_a_tensor() {
    let (tmp, dir) = sharded_checkpoint();
    let mut index = index(&dir);
    let (name, _) = entries(&split(&dir.join(SHARD)).0).remove(0);
    index["weight_map"][&name] = "model-00003-of-00005.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &[
            "model.safetensors.index.json",
            &format!("tensor {name}"),
            SHARD,
            "model-00003-of-00005",
        ],
    );
}

#[test]
fn index_names_a_tensor_no_shard_holds() {
    let (tmp, dir) = sharded_checkpoint();
    let mut index = index(&dir);
    index["weight_map"]["model.layers.9.ghost.weight"] = SHARD.into();
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &["tensor model.layers.9.ghost.weight", "does not contain it"],
    );
}

#[test]
fn shard_named_by_the_index_is_missing() {
    let (tmp, dir) = sharded_checkpoint();
    let (name, _) = entries(&split(&dir.join(SHARD)).0).remove(0);
    std::fs::remove_file(dir.join(SHARD)).unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &["model.safetensors.index.json", SHARD, "is missing"],
    );
    // The message names a tensor the missing shard holds.
    let err = fails(["inspect".as_ref(), dir.as_os_str()]);
    assert!(err.contains("holding tensor"), "{err}");
    let _ = name;
}

#[test]
fn index_that_is_not_json() {
    let (tmp, dir) = sharded_checkpoint();
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        "{\"weight_map\": ",
    )
    .unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &["model.safetensors.index.json", "invalid index"],
    );
}

#[test]
fn index_pointing_outside_the_directory() {
    let (tmp, dir) = sharded_checkpoint();
    let mut index = index(&dir);
    index["weight_map"]["model.norm.weight"] = "../f/base/model-00001-of-00005.safetensors".into();
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).unwrap();
    assert_refused(
        tmp.path(),
        &dir,
        &[
            "model.safetensors.index.json",
            "not a file name in the checkpoint directory",
        ],
    );
}

#[test]
fn unreadable_config_json() {
    let (tmp, dir) = sharded_checkpoint();
    std::fs::write(dir.join("config.json"), "{\"model_type\": llama}").unwrap();
    assert_refused(tmp.path(), &dir, &["config.json", "not valid JSON"]);
    std::fs::remove_file(dir.join("config.json")).unwrap();
    assert_refused(tmp.path(), &dir, &["config.json", "cannot read"]);
}

#[test]
fn not_a_checkpoint_directory() {
    let tmp = tempfile::tempdir().unwrap();
    let empty = tmp.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    assert_refused(tmp.path(), &empty, &["empty", "no weights found"]);
    let missing = tmp.path().join("missing");
    let err = fails(["inspect".as_ref(), missing.as_os_str()]);
    assert!(
        err.contains("missing") && err.contains("is not a local directory"),
        "{err}"
    );
}

/// PLeaS recipes with mistakes name their line; nothing is written. A good
/// one runs on synthetic models (untied head, a vocabulary that is not the
/// byte tokenizer's) with random-token calibration.
#[test]
fn pleas_recipes_name_their_mistakes() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "1"]);
    let recipe = |name: &str, body: &str| {
        let path = tmp.path().join(format!("{name}.yml"));
        let (a, b) = (tmp.path().join("f/base"), tmp.path().join("f/finetune-1"));
        std::fs::write(
            &path,
            format!(
                "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\n{body}",
                a.display(),
                b.display()
            ),
        )
        .unwrap();
        path
    };
    let out = tmp.path().join("out");
    for (name, body, needles) in [
        (
            "text",
            "parameters:\n  calibration: prose\n",
            &["text.yml:6:", "byte tokenizer", "(`random`)"][..],
        ),
        (
            "unknown",
            "parameters:\n  calibration: poetry\n",
            &["unknown.yml:6:", "unknown calibration `poetry`"][..],
        ),
        (
            "budget",
            "parameters:\n  budget: 2.5\n",
            &["budget.yml:6:", "`budget` is a number from 1 to 2"][..],
        ),
        (
            "per-model",
            "parameters:\n  densty: 0.5\n",
            &["per-model.yml:6:", "unknown pleas parameter `densty`"][..],
        ),
        (
            "union",
            "tokenizer_source: union\n",
            &[
                "union.yml:5:",
                "pleas keeps the vocabulary its two models share",
            ][..],
        ),
    ] {
        let path = recipe(name, body);
        let message = fails(["merge".as_ref(), path.as_os_str(), out.as_os_str()]);
        for needle in needles {
            assert!(message.contains(needle), "{name}: {message}");
        }
        assert!(!out.exists(), "{name}: nothing written");
    }
    let good = recipe(
        "good",
        "parameters:\n  calibration: random\n  samples: 8\n  seq_len: 16\n  budget: 1.3\n",
    );
    ok(["merge".as_ref(), good.as_os_str(), out.as_os_str()]);
    let config: Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    let base: Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("f/base/config.json")).unwrap())
            .unwrap();
    let grew = |key: &str| config[key].as_u64().unwrap() > base[key].as_u64().unwrap();
    assert!(
        grew("num_key_value_heads") && grew("intermediate_size"),
        "{config}"
    );
    assert_eq!(config["tie_word_embeddings"], false);
    assert_eq!(config["torch_dtype"], "float32", "the inputs' dtype");

    // The written dtype, tokenizer files and chat template follow the recipe.
    let b = tmp.path().join("f/finetune-1");
    std::fs::write(b.join("tokenizer_config.json"), "{\"marker\": \"b\"}").unwrap();
    let styled = recipe(
        "styled",
        &format!(
            "out_dtype: bfloat16\ntokenizer_source: {}\nchat_template: chatml\n\
             parameters:\n  calibration: random\n  samples: 8\n  seq_len: 16\n",
            b.display()
        ),
    );
    let styled_out = tmp.path().join("styled-out");
    ok(["merge".as_ref(), styled.as_os_str(), styled_out.as_os_str()]);
    let written = amalgam_checkpoint::Checkpoint::open(&styled_out).unwrap();
    assert!(written
        .tensors()
        .iter()
        .all(|t| t.dtype == amalgam_checkpoint::Dtype::BF16));
    assert_eq!(written.config().dtype(), Some("bfloat16"));
    let tokenizer_config =
        std::fs::read_to_string(styled_out.join("tokenizer_config.json")).unwrap();
    assert!(
        tokenizer_config.contains("\"marker\""),
        "{tokenizer_config}"
    );
    assert!(
        std::fs::read_to_string(styled_out.join("chat_template.jinja"))
            .unwrap()
            .contains("<|im_start|>")
    );
}

/// Configs that would make a forward pass divide by zero or allocate
/// without bound are refused, by `eval`, `stitch` and `pleas` alike, with
/// exit status 1 (an error, never a panic or an abort).
#[test]
fn hostile_configs_are_errors_not_panics() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "1"]);
    let base = tmp.path().join("f/base");
    let bad = tmp.path().join("bad");
    for (key, value, needle) in [
        (
            "num_attention_heads",
            Value::from(0),
            "`num_attention_heads` must be a positive",
        ),
        ("num_key_value_heads", Value::from(3), "not a multiple of 3"),
        ("hidden_size", Value::from(100_000_000), "needs about"),
        ("head_dim", Value::from(1u64 << 30), "needs about"),
        (
            "num_hidden_layers",
            Value::from(7),
            "no tensor model.layers.4",
        ),
        (
            "intermediate_size",
            Value::from(-5),
            "`intermediate_size` must be a positive",
        ),
        (
            "rms_norm_eps",
            Value::from("tiny"),
            "`rms_norm_eps` must be a positive number",
        ),
    ] {
        let _ = std::fs::remove_dir_all(&bad);
        copy_dir(&base, &bad);
        edit_json(&bad.join("config.json"), |config| config[key] = value);
        let stitch = tmp.path().join("stitch.yml");
        std::fs::write(
            &stitch,
            format!(
                "kind: stitch\nanchors: [{}, {}]\ncalibration: {{samples: 2, seq_len: 8}}\n",
                bad.display(),
                base.display()
            ),
        )
        .unwrap();
        let pleas = tmp.path().join("pleas.yml");
        std::fs::write(
            &pleas,
            format!(
                "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  \
                 calibration: random\n  samples: 2\n  seq_len: 8\n",
                bad.display(),
                tmp.path().join("f/finetune-1").display()
            ),
        )
        .unwrap();
        let out = tmp.path().join("out");
        for args in [
            vec!["eval".as_ref(), bad.as_os_str()],
            vec!["stitch".as_ref(), stitch.as_os_str(), out.as_os_str()],
            vec!["merge".as_ref(), pleas.as_os_str(), out.as_os_str()],
        ] {
            let message = fails(&args);
            assert!(message.contains(needle), "{key}: {args:?}: {message}");
            assert!(!out.exists());
        }
    }
    // Sizes from the recipe are estimated before anything is allocated.
    let pleas = tmp.path().join("pleas.yml");
    std::fs::write(
        &pleas,
        format!(
            "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  \
             calibration: random\n  samples: 64\n  seq_len: 1000000000\n",
            base.display(),
            tmp.path().join("f/finetune-1").display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let message = fails(["merge".as_ref(), pleas.as_os_str(), out.as_os_str()]);
    assert!(
        message.contains("needs about") && message.contains("GB"),
        "{message}"
    );
}

#[test]
fn absurd_thread_counts_are_capped_with_a_warning() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "1"]);
    let recipe = tmp.path().join("r.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: linear\nmodels:\n  - model: {0}/f/base\n    parameters: {{weight: 1}}\n  \
             - model: {0}/f/finetune-1\n    parameters: {{weight: 1}}\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()])
        .args(["--threads", "5000"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{stderr}");
    assert!(stderr.contains("--threads 5000 capped at"), "{stderr}");
}

#[test]
fn eval_names_the_flag_that_is_wrong() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "0"]);
    let base = tmp.path().join("f/base");
    let message = fails([
        "eval".as_ref(),
        base.as_os_str(),
        "--max-windows".as_ref(),
        "0".as_ref(),
    ]);
    assert!(
        message.contains("--max-windows must be at least 1"),
        "{message}"
    );
}
