//! Differential tests against Hugging Face `transformers` and Python
//! `safetensors` (from the project venv): what they load from checkpoints that
//! amalgam generated or wrote must be bit-identical to what amalgam reads.

use crate::common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// Python dtype names for safetensors dtypes.
fn torch_dtype(dtype: &str) -> &'static str {
    match dtype {
        "F32" => "float32",
        "F16" => "float16",
        "BF16" => "bfloat16",
        other => panic!("unexpected dtype {other}"),
    }
}

fn assert_same_tensors(dir: &Path, oracle: &Value) {
    let ours = inspect_json(dir, true);
    let digests = tensor_digests(&ours);
    let from_safetensors = oracle["safetensors"].as_object().unwrap();
    let from_transformers = oracle["transformers"].as_object().unwrap();
    assert_eq!(from_safetensors.len(), digests.len(), "{}", dir.display());
    for (name, (dtype, shape, sha)) in &digests {
        for (library, tensors) in [
            ("safetensors", from_safetensors),
            ("transformers", from_transformers),
        ] {
            let theirs = &tensors[name];
            assert_eq!(theirs["dtype"], torch_dtype(dtype), "{library} {name}");
            assert_eq!(&theirs["shape"], shape, "{library} {name}");
            assert_eq!(
                theirs["sha256"],
                sha.as_str(),
                "{library} {name} in {}",
                dir.display()
            );
        }
    }
    // transformers holds nothing we don't (a tied head is the embedding).
    for (name, theirs) in from_transformers {
        let ours = match digests.get(name) {
            Some(d) => d,
            None => {
                assert_eq!(
                    name,
                    "lm_head.weight",
                    "unexpected transformers tensor in {}",
                    dir.display()
                );
                assert_eq!(ours["tie_word_embeddings"], true);
                &digests["model.embed_tokens.weight"]
            }
        };
        assert_eq!(theirs["sha256"], ours.2.as_str(), "transformers {name}");
    }
    assert_eq!(
        oracle["parameters"],
        ours["parameters"],
        "{}",
        dir.display()
    );
}

#[test]
fn generated_and_written_checkpoints_load_in_transformers_with_identical_tensors() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path();
    synth(
        &root.join("f32"),
        &["--finetunes", "1", "--out-shard-size", "300KB"],
    );
    synth(
        &root.join("f16"),
        &["--finetunes", "0", "--dtype", "float16"],
    );
    synth(
        &root.join("bf16-tied"),
        &["--finetunes", "0", "--dtype", "bfloat16", "--tied"],
    );
    let resharded = root.join("resharded");
    ok([
        "convert".as_ref(),
        root.join("f32/finetune-1").as_os_str(),
        resharded.as_os_str(),
        "--out-shard-size".as_ref(),
        "150KB".as_ref(),
    ]);
    let cast = root.join("cast-bf16");
    ok([
        "convert".as_ref(),
        root.join("f32/base").as_os_str(),
        cast.as_os_str(),
        "--dtype".as_ref(),
        "bfloat16".as_ref(),
    ]);

    let dirs = [
        root.join("f32/base"),
        root.join("f32/finetune-1"),
        root.join("f16/base"),
        root.join("bf16-tied/base"),
        resharded,
        cast,
    ];
    let refs: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
    let oracle = hf_oracle(&refs, false);
    for dir in &dirs {
        assert_same_tensors(dir, &oracle[dir.to_str().unwrap()]);
    }
}

#[test]
fn tinyllama_shape_has_201_tensors_and_1_1b_parameters_in_1gb_shards() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("tinyllama");
    synth(
        &family,
        &[
            "--shape",
            "tinyllama",
            "--finetunes",
            "0",
            "--dtype",
            "bfloat16",
            "--out-shard-size",
            "1GB",
        ],
    );
    let base = family.join("base");
    let report = inspect_json(&base, false);
    assert_eq!(report["tensor_count"], 201);
    assert_eq!(report["parameters"], 1_100_048_384u64);
    assert_eq!(report["shards"].as_array().unwrap().len(), 3);
    assert_eq!(report["layers"], 22);
    let oracle = hf_oracle(&[&base], true);
    assert_eq!(
        oracle[base.to_str().unwrap()]["parameters"],
        1_100_048_384u64,
        "transformers agrees"
    );
}
