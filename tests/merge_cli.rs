//! `amalgam merge` end to end: the shipped recipes, determinism, out_dtype,
//! transformers loading the result, dry runs, and every kind of bad recipe.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// The example models the recipes in recipes/ refer to, under `dir/work/example`.
fn example_models(dir: &Path) {
    synth(
        &dir.join("work/example"),
        &["--finetunes", "2", "--seed", "0"],
    );
}

fn recipes() -> Vec<PathBuf> {
    let mut recipes: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
    recipes.sort();
    recipes
}

/// Runs amalgam in `dir` (recipes use paths relative to the working directory).
/// Runs `amalgam merge ARGS…` in `dir` and expects success.
fn merge_in(dir: &Path, args: &[&std::ffi::OsStr]) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["merge".as_ref()];
    all.extend_from_slice(args);
    let result = amalgam_in(dir, &all);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

fn amalgam_in(dir: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(dir)
        .args(args)
        .arg("-q")
        .output()
        .unwrap()
}

#[test]
fn every_shipped_recipe_runs_and_loads_in_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipes = recipes();
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

fn write_recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

const DARE: &str = "merge_method: dare_ties
base_model: work/example/base
models:
  - model: work/example/finetune-1
    parameters: {weight: 0.5, density: 0.3}
  - model: work/example/finetune-2
    parameters: {weight: 0.5, density: 0.6}
";

#[test]
fn same_seed_same_bytes_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE);
    let run = |out: &str, seed: &str, threads: &str| {
        // A one-byte budget makes every tensor run alone: the same bytes again.
        let budget = if threads == "4" { "1" } else { "4GB" };
        let args = [
            recipe.to_str().unwrap(),
            out,
            "--seed",
            seed,
            "--threads",
            threads,
            "--memory-budget",
            budget,
        ];
        merge_in(tmp.path(), &args.map(std::ffi::OsStr::new));
        std::fs::read(tmp.path().join(out).join("model.safetensors")).unwrap()
    };
    let one = run("t1", "5", "1");
    assert_eq!(one, run("t2", "5", "2"));
    assert_eq!(one, run("t4", "5", "4"));
    assert_ne!(one, run("other-seed", "6", "2"));
}

/// A DARE-TIES merge split into three parts (each a third of the bytes) and
/// joined is the single-process merge byte for byte, every file; the join
/// refuses missing parts, parts of another recipe or seed, and removes the
/// parts when done. So is the Ray driver's, in two parts on a local cluster.
#[test]
fn parts_joined_are_the_single_merge_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE);
    let merge = |out: &str, extra: &[&str]| -> std::process::Output {
        let seed = if extra.contains(&"--seed") {
            &[][..]
        } else {
            &["--seed", "5"][..]
        };
        let mut args = vec!["merge", recipe.to_str().unwrap(), out];
        args.extend(seed);
        args.extend(["--out-shard-size", "300KB"]);
        args.extend(extra);
        let args: Vec<&std::ffi::OsStr> = args.into_iter().map(std::ffi::OsStr::new).collect();
        amalgam_in(tmp.path(), &args)
    };
    let succeeds = |out: &str, extra: &[&str]| {
        let result = merge(out, extra);
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
    };
    let refused = |out: &str, extra: &[&str], needle: &str| {
        let result = merge(out, extra);
        let message = String::from_utf8_lossy(&result.stderr).into_owned();
        assert!(
            !result.status.success() && message.contains(needle),
            "{message}"
        );
    };
    succeeds("one/merged", &[]);
    let one = tmp.path().join("one/merged");
    assert!(
        listing(&one).len() > 6,
        "several shards and an index: {:?}",
        listing(&one)
    );
    succeeds("split/merged", &["--part", "1/3"]);
    succeeds("split/merged", &["--part", "3/3"]);
    refused("split/merged", &["--join"], "missing part-2-of-3");
    refused(
        "split/merged",
        &["--part", "4/3"],
        "expected I/N with 1 ≤ I ≤ N",
    );
    let parts = tmp.path().join("split/merged.parts");
    // Part 2 written with another seed is refused at the join.
    let other = merge("split/merged", &["--part", "2/3", "--seed", "6"]);
    assert!(other.status.success());
    refused("split/merged", &["--join"], "written with another --seed");
    std::fs::remove_dir_all(parts.join("part-2-of-3")).unwrap();
    succeeds("split/merged", &["--part", "2/3"]);
    let sizes: Vec<u64> = listing(&parts)
        .iter()
        .filter(|n| n.starts_with("part-"))
        .map(|n| {
            std::fs::metadata(parts.join(n).join("model.safetensors"))
                .unwrap()
                .len()
        })
        .collect();
    assert_eq!(sizes.len(), 3);
    let (least, most) = (sizes.iter().min().unwrap(), sizes.iter().max().unwrap());
    assert!(
        most - least < most / 2,
        "parts balanced by bytes: {sizes:?}"
    );
    succeeds("split/merged", &["--join"]);
    let split = tmp.path().join("split/merged");
    assert_eq!(listing(&one), listing(&split));
    for name in listing(&one) {
        assert!(
            std::fs::read(one.join(&name)).unwrap() == std::fs::read(split.join(&name)).unwrap(),
            "{name} differs"
        );
    }
    assert!(!parts.exists(), "the parts are removed after the join");
    // The Ray driver (a local cluster, one task per part) writes the same bytes.
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

#[test]
fn out_dtype_saves_the_math_result_cast_once() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let f32_recipe = "merge_method: task_arithmetic\nbase_model: work/example/base\nmodels:\n  - model: work/example/finetune-1\n    parameters: {weight: 0.7}\ndtype: float32\n";
    let a = write_recipe(tmp.path(), "f32.yml", f32_recipe);
    let b = write_recipe(
        tmp.path(),
        "bf16.yml",
        &format!("{f32_recipe}out_dtype: bfloat16\n"),
    );
    for (recipe, out) in [(&a, "f32"), (&b, "bf16")] {
        merge_in(tmp.path(), &[recipe.as_os_str(), out.as_ref()]);
    }
    ok([
        "convert".as_ref(),
        tmp.path().join("f32").as_os_str(),
        tmp.path().join("f32-cast").as_os_str(),
        "--dtype".as_ref(),
        "bfloat16".as_ref(),
    ]);
    let direct = inspect_json(&tmp.path().join("bf16"), true);
    assert_eq!(
        direct["dtypes"]
            .as_object()
            .unwrap()
            .keys()
            .collect::<Vec<_>>(),
        ["BF16"]
    );
    assert_eq!(
        tensor_digests(&direct),
        tensor_digests(&inspect_json(&tmp.path().join("f32-cast"), true))
    );
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(tmp.path().join("bf16/config.json")).unwrap())
            .unwrap();
    assert_eq!(config["torch_dtype"], "bfloat16");
}

#[test]
fn dry_run_prints_the_plan_and_writes_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE);
    let result = amalgam_in(
        tmp.path(),
        &[
            "merge".as_ref(),
            recipe.as_os_str(),
            "out".as_ref(),
            "--dry-run".as_ref(),
            "--json".as_ref(),
        ],
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let plan: serde_json::Value = serde_json::from_slice(&result.stdout).unwrap();
    assert_eq!(plan["tensor_count"], 39);
    assert_eq!(plan["bytes_written"], 887_040);
    assert_eq!(plan["bytes_read"], 3 * 887_040);
    assert!(plan["peak_memory_estimate"].as_u64().unwrap() > 0);
    let first = &plan["tensors"][0];
    assert_eq!(first["inputs"][0]["params"]["density"], 0.3);
    assert!(!tmp.path().join("out").exists());
}

/// Each bad recipe: exit 1, a message naming the recipe line (and the model),
/// and no output directory.
#[test]
fn bad_recipes_name_the_line_and_the_model_and_write_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let cases: &[(&str, &str, &[&str])] = &[
        (
            "missing weight",
            "merge_method: ties\nbase_model: work/example/base\nmodels:\n  - model: work/example/finetune-1\n    parameters: {density: 0.5}\n",
            &["bad.yml:4:12:", "missing parameter `weight` for model `work/example/finetune-1`"],
        ),
        (
            "density outside (0, 1]",
            "merge_method: ties\nbase_model: work/example/base\nmodels:\n  - model: work/example/finetune-1\n    parameters: {weight: 1, density: 1.5}\n",
            &["bad.yml:5:29:", "parameter `density` for model `work/example/finetune-1`: density must be in (0, 1], got 1.5"],
        ),
        (
            "unknown method",
            "merge_method: tiez\nbase_model: work/example/base\nmodels:\n  - model: work/example/finetune-1\n",
            &["bad.yml:1:15:", "unknown merge method `tiez`", "ties"],
        ),
        (
            "layer_range beyond the model",
            "merge_method: passthrough\nslices:\n  - sources:\n      - model: work/example/finetune-1\n        layer_range: [2, 9]\n",
            &["bad.yml:5:22:", "layer_range [2, 9] goes beyond model `work/example/finetune-1`, which has 4 layers"],
        ),
        (
            "method needing a base without one",
            "merge_method: task_arithmetic\nmodels:\n  - model: work/example/finetune-1\n    parameters: {weight: 1}\n",
            &["bad.yml:1:15:", "merge method `task_arithmetic` needs a `base_model`"],
        ),
        (
            "a hub id instead of a directory",
            "merge_method: linear\nmodels:\n  - model: meta-llama/Llama-3.1-8B\n    parameters: {weight: 1}\n",
            &[
                "bad.yml:3:12:",
                "model `meta-llama/Llama-3.1-8B` is not in the Hugging Face cache",
                "never downloads",
                "`hf download meta-llama/Llama-3.1-8B`",
            ],
        ),
        (
            "an unknown key",
            "merge_method: linear\nmodels:\n  - model: work/example/finetune-1\n    parameter: {weight: 1}\n",
            &["bad.yml:4:5:", "unknown key `parameter`", "did you mean `parameters`?"],
        ),
        (
            "a broken input checkpoint",
            "merge_method: linear\nmodels:\n  - model: work/example\n    parameters: {weight: 1}\n",
            &["bad.yml:3:12:", "model `work/example`", "no weights found"],
        ),
    ];
    for (what, text, needles) in cases {
        let recipe = write_recipe(tmp.path(), "bad.yml", text);
        let result = amalgam_in(
            tmp.path(),
            &["merge".as_ref(), recipe.as_os_str(), "out".as_ref()],
        );
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{what}: {stderr}");
        for needle in *needles {
            assert!(
                stderr.contains(needle),
                "{what}: missing {needle:?} in {stderr}"
            );
        }
        assert!(!tmp.path().join("out").exists(), "{what}: nothing written");
    }
}

#[test]
fn shape_and_layer_count_mismatches_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    synth(
        &tmp.path().join("work/narrow"),
        &["--finetunes", "0", "--intermediate", "128"],
    );
    synth(
        &tmp.path().join("work/short"),
        &["--finetunes", "0", "--layers", "3"],
    );
    let cases = [
        ("work/narrow/base", "tensor `model.layers.0.mlp.gate_proj.weight`: model `work/narrow/base` has shape [128, 64] but model `work/example/finetune-1` has [160, 64]"),
        ("work/short/base", "models have different layer counts (work/example/finetune-1 has 4, work/short/base has 3)"),
    ];
    for (other, message) in cases {
        let text = format!("merge_method: linear\nmodels:\n  - model: work/example/finetune-1\n    parameters: {{weight: 1}}\n  - model: {other}\n    parameters: {{weight: 1}}\n");
        let recipe = write_recipe(tmp.path(), "bad.yml", &text);
        let result = amalgam_in(
            tmp.path(),
            &["merge".as_ref(), recipe.as_os_str(), "out".as_ref()],
        );
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("bad.yml:5:12:") && stderr.contains(message),
            "{stderr}"
        );
        assert!(!tmp.path().join("out").exists());
    }
}

#[test]
fn devices_are_checked_before_anything_is_written() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/linear.yml");
    let result = amalgam_in(
        tmp.path(),
        &[
            "merge".as_ref(),
            recipe.as_os_str(),
            "out".as_ref(),
            "--device".as_ref(),
            "tpu".as_ref(),
        ],
    );
    assert!(String::from_utf8_lossy(&result.stderr).contains("unknown --device \"tpu\""));
    assert!(!tmp.path().join("out").exists());
    let result = amalgam_in(
        tmp.path(),
        &[
            "merge".as_ref(),
            recipe.as_os_str(),
            "out".as_ref(),
            "--device".as_ref(),
            "cuda".as_ref(),
        ],
    );
    if !result.status.success() {
        // No GPU here (CI never has one): a clear refusal, nothing written.
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert!(stderr.contains("libtorch sees no CUDA GPU"), "{stderr}");
        assert!(!tmp.path().join("out").exists());
    }
}

/// On a CUDA GPU, every element-wise method gives the CPU's bytes (the
/// kernels round as the fused loops do; DARE and DELLA draw the same masks).
/// Skipped, saying so, where there is no GPU (CI). The CPU side of the same
/// equality is `libtorch_kernels_give_the_fused_loops_bits` in the merge
/// crate's property tests.
#[test]
fn cuda_merges_are_the_cpu_merges_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let methods = [
        ("linear", ""),
        ("task_arithmetic", ""),
        ("ties", "density: 0.4, "),
        ("dare_ties", "density: 0.4, "),
        ("dare_linear", "density: 0.6, "),
        ("breadcrumbs_ties", "density: 0.5, "),
        ("della", "density: 0.5, "),
    ];
    for (method, density) in methods {
        let base = if method == "linear" {
            ""
        } else {
            "base_model: work/example/base\n"
        };
        let recipe = format!("merge_method: {method}\n{base}models:\n  - model: work/example/finetune-1\n    parameters: {{{density}weight: 0.6}}\n  - model: work/example/finetune-2\n    parameters: {{{density}weight: 0.5}}\n");
        let recipe = write_recipe(tmp.path(), &format!("{method}.yml"), &recipe);
        let run = |device: &str| {
            let out = tmp.path().join(format!("{method}-{device}"));
            let args = [
                recipe.as_os_str(),
                out.as_os_str(),
                "--device".as_ref(),
                device.as_ref(),
            ];
            let result = amalgam_in(tmp.path(), &[&["merge".as_ref()][..], &args].concat());
            (result, out)
        };
        let (result, on_gpu) = run("cuda");
        if !result.status.success() {
            let stderr = String::from_utf8_lossy(&result.stderr);
            assert!(stderr.contains("libtorch sees no CUDA GPU"), "{stderr}");
            eprintln!("skipped: no CUDA GPU on this machine");
            return;
        }
        let (result, on_cpu) = run("cpu");
        assert!(
            result.status.success(),
            "{}",
            String::from_utf8_lossy(&result.stderr)
        );
        assert_eq!(
            std::fs::read(on_gpu.join("model.safetensors")).unwrap(),
            std::fs::read(on_cpu.join("model.safetensors")).unwrap(),
            "{method}"
        );
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
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/prose.txt"),
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
