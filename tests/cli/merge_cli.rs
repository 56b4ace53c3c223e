//! `amalgam merge` end to end: determinism, out_dtype, split merges, dry
//! runs, devices, and every kind of bad recipe.

use crate::common;

use std::path::Path;

use common::*;

#[test]
fn same_seed_same_bytes_whatever_the_thread_count() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE_RECIPE);
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
/// parts when done.
#[test]
fn parts_joined_are_the_single_merge_byte_for_byte() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE_RECIPE);
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
    refused("split/merged", &["--join"], "written with another seed");
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
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE_RECIPE);
    let plan = dry_run_plan(tmp.path(), &recipe, &[]);
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
