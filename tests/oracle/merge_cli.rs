//! `amalgam merge` end to end, as transformers and Ray see it: every shipped
//! recipe's result loads, the multi-stage and moe examples run, PLeaS
//! calibrates on text with the model's own tokenizer, and the Ray driver
//! writes the single merge's bytes.

use std::path::Path;
use std::process::Command;

use crate::common::*;

#[test]
fn every_shipped_recipe_runs_and_loads_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipes = shipped_recipes();
    assert_eq!(recipes.len(), 20, "one recipe per method");
    let mut outputs = vec![];
    for recipe in &recipes {
        let name = recipe.file_stem().unwrap().to_str().unwrap();
        let out = tmp.path().join(format!("merged-{name}"));
        let result = amalgam_in(
            tmp.path(),
            &["merge".as_ref(), recipe.as_os_str(), out.as_os_str()],
        );
        assert!(
            result.status.success(),
            "{name}: {}",
            String::from_utf8_lossy(&result.stderr)
        );
        let card = std::fs::read_to_string(out.join("README.md")).unwrap();
        assert!(
            card.contains(&format!("merge_method: {name}")),
            "{name}: the card carries the recipe"
        );
        assert!(
            card.contains("finetune-1` | model.safetensors | `"),
            "{name}: the card hashes the inputs"
        );
        outputs.push(out);
    }
    let dirs: Vec<&Path> = outputs.iter().map(|p| p.as_path()).collect();
    let oracle = hf_oracle(&dirs, false);
    for dir in &dirs {
        let ours = tensor_digests(&inspect_json(dir, true));
        let theirs = oracle[dir.to_str().unwrap()]["transformers"]
            .as_object()
            .unwrap();
        for (name, (_, _, sha)) in &ours {
            assert_eq!(
                theirs[name]["sha256"],
                sha.as_str(),
                "{} {name}",
                dir.display()
            );
        }
    }
}

/// The toolbox examples in `recipes/multi-stage/` and `recipes/moe/` run on
/// the example models, and their outputs load in transformers.
#[test]
fn shipped_multi_stage_and_moe_examples_run() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes");
    let staged = tmp.path().join("staged");
    merge_in(
        tmp.path(),
        &[
            root.join("multi-stage/soup-then-ties.yml").as_os_str(),
            staged.as_os_str(),
        ],
    );
    let mixture = tmp.path().join("mixture");
    let result = amalgam_in(
        tmp.path(),
        &[
            "moe".as_ref(),
            root.join("moe/mixtral.yml").as_os_str(),
            mixture.as_os_str(),
        ],
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    // transformers loads both (the oracle fails otherwise), every stored weight used.
    let loaded = hf_oracle(&[&staged, &mixture], false);
    for dir in [&staged, &mixture] {
        let report = &loaded[dir.to_str().unwrap()];
        let stored: u64 = report["safetensors"]
            .as_object()
            .unwrap()
            .values()
            .map(|t| {
                t["shape"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|d| d.as_u64().unwrap())
                    .product::<u64>()
            })
            .sum();
        assert_eq!(
            report["parameters"].as_u64().unwrap(),
            stored,
            "{}",
            dir.display()
        );
    }
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(mixture.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["model_type"], "mixtral");
}

/// PLeaS calibrates on a text file (plain, or `.jsonl` with
/// `calibration_field`) tokenized with the two models' tokenizer — Llama 2's
/// real one here — and refuses models whose tokenizers differ, at the line.
#[test]
fn pleas_calibrates_on_text_with_the_models_tokenizer() {
    let tmp = tempfile::tempdir().unwrap();
    let a = model_with_tokenizer(tmp.path(), "llama", "llama2", 32000, 0);
    let b = model_with_tokenizer(tmp.path(), "llama", "llama2", 32000, 1);
    let prose = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/corpus/texts/prose.txt"),
    )
    .unwrap();
    let sample: String = prose.chars().take(4000).collect();
    let text = tmp.path().join("calibration.txt");
    std::fs::write(&text, &sample).unwrap();
    let jsonl = tmp.path().join("calibration.jsonl");
    let lines: Vec<String> = sample
        .split("\n\n")
        .map(|d| serde_json::json!({"body": d}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n")).unwrap();
    let recipe = |b: &std::path::Path, calibration: &str| {
        format!(
            "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  \
             calibration: {calibration}\n  samples: 8\n  seq_len: 24\n",
            a.display(),
            b.display()
        )
    };
    for (name, calibration) in [
        ("text", text.display().to_string()),
        (
            "jsonl",
            format!("{}\n  calibration_field: body", jsonl.display()),
        ),
    ] {
        let (_, out) = merge_ok(
            tmp.path(),
            &format!("pleas-{name}"),
            &recipe(&b, &calibration),
        );
        let merged = amalgam_nn::Decoder::load(&out, tch::Device::Cpu).unwrap();
        let ids = tch::Tensor::arange(16, (tch::Kind::Int64, tch::Device::Cpu)).view([1, 16]);
        let logits = tch::no_grad(|| merged.forward(&ids));
        assert!(
            logits.isfinite().all().int64_value(&[]) == 1,
            "{name}: finite logits"
        );
    }

    // Two ids swapped in B's tokenizer: not the same tokenizer any more.
    let swapped = tmp.path().join("b-swapped");
    copy_dir(&b, &swapped);
    let path = swapped.join("tokenizer.json");
    let mut tokenizer: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let (x, y) = (vocab["▁the"].clone(), vocab["▁and"].clone());
    vocab.insert("▁the".into(), y);
    vocab.insert("▁and".into(), x);
    std::fs::write(&path, serde_json::to_vec(&tokenizer).unwrap()).unwrap();
    let bad = tmp.path().join("swapped.yml");
    std::fs::write(&bad, recipe(&swapped, &text.display().to_string())).unwrap();
    let message = fails([
        "merge".as_ref(),
        bad.as_os_str(),
        tmp.path().join("swapped-out").as_os_str(),
    ]);
    assert!(
        message.contains("swapped.yml:6:") && message.contains("have different tokenizers"),
        "{message}"
    );
}

/// The Ray driver (a local cluster, one task per part, two parts) writes the
/// single-process merge's bytes, every file.
#[test]
fn the_ray_driver_writes_the_single_merge_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE_RECIPE);
    let args = [
        "merge",
        recipe.to_str().unwrap(),
        "one/merged",
        "--seed",
        "5",
        "--out-shard-size",
        "300KB",
    ]
    .map(std::ffi::OsStr::new);
    let single = amalgam_in(tmp.path(), &args);
    assert!(
        single.status.success(),
        "{}",
        String::from_utf8_lossy(&single.stderr)
    );
    let one = tmp.path().join("one/merged");
    let driver = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/ray-merge.py");
    let ray = Command::new(python())
        .arg(&driver)
        .args([recipe.to_str().unwrap(), "ray/merged", "--parts", "2"])
        .args(["--amalgam", env!("CARGO_BIN_EXE_amalgam")])
        .arg("--cwd")
        .arg(tmp.path())
        .args(["--", "--seed", "5", "--out-shard-size", "300KB", "-q"])
        .current_dir(tmp.path())
        .output()
        .unwrap();
    assert!(
        ray.status.success(),
        "{}",
        String::from_utf8_lossy(&ray.stderr)
    );
    let by_ray = tmp.path().join("ray/merged");
    assert_eq!(listing(&one), listing(&by_ray));
    for name in listing(&one) {
        assert!(
            std::fs::read(one.join(&name)).unwrap() == std::fs::read(by_ray.join(&name)).unwrap(),
            "{name} differs (Ray)"
        );
    }
}
