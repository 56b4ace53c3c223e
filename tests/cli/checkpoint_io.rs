//! Reading and writing checkpoints through the CLI: round trips, sharding,
//! tied embeddings, refusals.

use crate::common;

use common::*;

#[test]
fn convert_round_trip_is_bit_exact_for_each_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    for dtype in ["float32", "float16", "bfloat16"] {
        let family = tmp.path().join(dtype);
        synth(&family, &["--dtype", dtype, "--finetunes", "0"]);
        let base = family.join("base");
        let sharded = tmp.path().join(format!("{dtype}-sharded"));
        let single = tmp.path().join(format!("{dtype}-single"));
        ok([
            "convert".as_ref(),
            base.as_os_str(),
            sharded.as_os_str(),
            "--out-shard-size".as_ref(),
            "100KB".as_ref(),
        ]);
        ok(["convert".as_ref(), sharded.as_os_str(), single.as_os_str()]);

        let original = inspect_json(&base, true);
        let resharded = inspect_json(&sharded, true);
        let back = inspect_json(&single, true);
        assert_eq!(
            tensor_digests(&original),
            tensor_digests(&resharded),
            "{dtype}"
        );
        assert_eq!(tensor_digests(&original), tensor_digests(&back), "{dtype}");
        assert!(
            resharded["shards"].as_array().unwrap().len() > 2,
            "{dtype}: sharded"
        );
        assert_eq!(back["shards"].as_array().unwrap().len(), 1);

        let files = listing(&sharded);
        assert!(files.contains(&"model.safetensors.index.json".to_owned()));
        assert!(
            files.contains(&"generation_config.json".to_owned()),
            "copied: {files:?}"
        );
        let index: serde_json::Value = serde_json::from_slice(
            &std::fs::read(sharded.join("model.safetensors.index.json")).unwrap(),
        )
        .unwrap();
        let total: u64 = resharded["dtypes"]
            .as_object()
            .unwrap()
            .values()
            .map(|d| d["bytes"].as_u64().unwrap())
            .sum();
        assert_eq!(index["metadata"]["total_size"].as_u64(), Some(total));
        assert_eq!(index["weight_map"].as_object().unwrap().len(), 39);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(single.join("config.json")).unwrap()).unwrap();
        assert_eq!(config["torch_dtype"], dtype);
    }
}

#[test]
fn convert_casts_floats_and_records_the_input_in_the_card() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "0"]);
    let base = tmp.path().join("f/base");
    let out = tmp.path().join("bf16");
    ok([
        "convert".as_ref(),
        base.as_os_str(),
        out.as_os_str(),
        "--dtype".as_ref(),
        "bf16".as_ref(),
    ]);
    let report = inspect_json(&out, false);
    assert_eq!(
        report["dtypes"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["BF16"]
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");

    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    // The card's digest of the input weights is the SHA-256 of the file.
    use sha2::Digest;
    let digest: String =
        sha2::Sha256::digest(std::fs::read(base.join("model.safetensors")).unwrap())
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
    assert!(
        card.contains(&format!("| model.safetensors | `{digest}` |")),
        "{card}"
    );
}

#[test]
fn tied_embeddings_are_kept_tied_and_untied_heads_are_kept() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("tied"), &["--tied", "--finetunes", "0"]);
    synth(&tmp.path().join("untied"), &["--finetunes", "0"]);
    let tied = inspect_json(&tmp.path().join("tied/base"), false);
    let untied = inspect_json(&tmp.path().join("untied/base"), false);
    assert_eq!(tied["tie_word_embeddings"], true);
    assert_eq!(tied["tensor_count"], 38);
    assert_eq!(untied["tie_word_embeddings"], false);
    assert_eq!(untied["tensor_count"], 39);
    assert_eq!(
        untied["parameters"].as_u64().unwrap() - tied["parameters"].as_u64().unwrap(),
        384 * 64,
        "the tied model stores the head once"
    );
    let copy = tmp.path().join("tied-copy");
    ok([
        "convert".as_ref(),
        tmp.path().join("tied/base").as_os_str(),
        copy.as_os_str(),
    ]);
    let report = inspect_json(&copy, false);
    assert_eq!(report["tie_word_embeddings"], true);
    assert_eq!(report["tensor_count"], 38);
}

#[test]
fn pickle_checkpoints_are_refused_and_left_alone() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("pickled");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    // Not a real pickle: amalgam must refuse by name without opening it.
    std::fs::write(dir.join("pytorch_model.bin"), b"\x80\x02}q\x00.").unwrap();
    let out = tmp.path().join("out");
    for args in [
        vec!["inspect".as_ref(), dir.as_os_str()],
        vec!["convert".as_ref(), dir.as_os_str(), out.as_os_str()],
    ] {
        let err = fails(args);
        assert!(
            err.contains("refusing pickle checkpoint file pytorch_model.bin"),
            "{err}"
        );
        assert!(
            err.contains("safe_serialization=True"),
            "says how to convert: {err}"
        );
    }
    assert_eq!(
        std::fs::read(dir.join("pytorch_model.bin")).unwrap(),
        b"\x80\x02}q\x00."
    );
    assert!(!out.exists());
}

#[test]
fn outputs_never_overwrite_inputs_or_non_empty_directories() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "0"]);
    let base = tmp.path().join("f/base");
    let before = listing(&base);
    let err = fails([
        "convert".as_ref(),
        base.as_os_str(),
        base.as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(
        err.contains("refusing to write over input checkpoint"),
        "{err}"
    );
    let err = fails([
        "convert".as_ref(),
        base.as_os_str(),
        tmp.path().join("f").as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(
        err.contains("refusing to write over input checkpoint"),
        "{err}"
    );
    assert_eq!(listing(&base), before);

    let out = tmp.path().join("busy");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("notes.txt"), "mine").unwrap();
    let err = fails(["convert".as_ref(), base.as_os_str(), out.as_os_str()]);
    assert!(err.contains("busy") && err.contains("--force"), "{err}");
    assert_eq!(listing(&out), ["notes.txt"]);
    ok([
        "convert".as_ref(),
        base.as_os_str(),
        out.as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(!out.join("notes.txt").exists());
    assert_eq!(
        listing(tmp.path()),
        ["busy", "f"],
        "no staging directories left"
    );
}

#[test]
fn synth_is_deterministic_by_seed() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("a"), &["--seed", "5", "--finetunes", "1"]);
    synth(&tmp.path().join("b"), &["--seed", "5", "--finetunes", "1"]);
    synth(&tmp.path().join("c"), &["--seed", "6", "--finetunes", "1"]);
    for member in ["base", "finetune-1"] {
        let a = std::fs::read(tmp.path().join("a").join(member).join("model.safetensors")).unwrap();
        let b = std::fs::read(tmp.path().join("b").join(member).join("model.safetensors")).unwrap();
        let c = std::fs::read(tmp.path().join("c").join(member).join("model.safetensors")).unwrap();
        assert_eq!(a, b, "{member}");
        assert_ne!(a, c, "{member}");
    }
}
