//! Hostile LoRA adapters (`model: BASE+ADAPTER`): configs and tensors that
//! would divide by zero, overflow, or panic are errors naming the adapter's
//! file and the key or tensor; an adapter whose finite values compute NaN or
//! ±inf is refused like a merge that does, unless non-finite values are
//! allowed; `extract` never writes a rank peft refuses.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::synthetic::{generate_family, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{count_nonfinite, Checkpoint, Dtype, WriteOptions};
use amalgam_merge::executor::{ExecOptions, MergeJob};
use amalgam_merge::lora::extract::{extract, ExtractOptions};
use amalgam_merge::registry;
use amalgam_recipe::Recipe;
use serde_json::{json, Value};
use tch::Kind;

const HIDDEN: usize = 16;
const Q_PROJ: &str = "model.layers.0.self_attn.q_proj";

/// A base and one fine-tune: 1 layer, hidden 16 (q_proj is 16 × 16), F32.
fn family(root: &Path) -> PathBuf {
    let options = FamilyOptions {
        shape: LlamaShape {
            hidden: HIDDEN,
            layers: 1,
            intermediate: 8,
            vocab: 40,
            heads: 2,
            kv_heads: 1,
            tied: false,
        },
        dtype: Dtype::F32,
        seed: 5,
        finetunes: 1,
        write: WriteOptions::default(),
    };
    generate_family(root, &options, &|_| {}).unwrap();
    root.join("base")
}

/// peft's config for a rank-`r` adapter of the q projections, edited.
fn config(r: u64, edit: impl FnOnce(&mut Value)) -> Value {
    let mut config = json!({
        "peft_type": "LORA", "r": r, "lora_alpha": r, "use_rslora": false,
        "target_modules": ["q_proj"], "fan_in_fan_out": false,
        "rank_pattern": {}, "alpha_pattern": {}, "use_dora": false,
    });
    edit(&mut config);
    config
}

/// An F32 tensor of the adapter file: (name after peft's prefix, shape, value of every entry).
type Spec<'a> = (&'a str, Vec<usize>, Vec<f32>);

fn filled(name: &str, shape: Vec<usize>, value: f32) -> Spec<'_> {
    let count = shape.iter().product();
    (name, shape, vec![value; count])
}

/// lora_A and lora_B of q_proj at rank `r`, every entry `value`.
fn q_pair(r: usize, value: f32) -> Vec<Spec<'static>> {
    vec![
        filled(
            "model.layers.0.self_attn.q_proj.lora_A.weight",
            vec![r, HIDDEN],
            value,
        ),
        filled(
            "model.layers.0.self_attn.q_proj.lora_B.weight",
            vec![HIDDEN, r],
            value,
        ),
    ]
}

/// Writes an adapter directory as peft's save_pretrained does.
fn adapter(dir: &Path, config: &Value, tensors: &[Spec<'_>]) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(config).unwrap(),
    )
    .unwrap();
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(name, shape, values)| {
            let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (format!("base_model.model.{name}"), shape.clone(), data)
        })
        .collect();
    let views = bytes.iter().map(|(name, shape, data)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data)
                .unwrap();
        (name.clone(), view)
    });
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
    dir.to_path_buf()
}

/// A weight-1 linear merge of `base+adapter` alone into `out`.
fn merge(base: &Path, adapter: &Path, out: &Path, allow_nonfinite: bool) -> Result<(), String> {
    let text = format!(
        "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
        base.display(),
        adapter.display()
    );
    let recipe = Recipe::parse(&text, "r.yml").map_err(|e| e.to_string())?;
    let method = registry::per_tensor(&recipe.merge_method).expect("linear is registered");
    let job = MergeJob::prepare(recipe, method).map_err(|e| e.to_string())?;
    let exec = ExecOptions {
        seed: 7,
        device: tch::Device::Cpu,
        threads: 1,
        memory_budget: 1 << 30,
        write: WriteOptions {
            allow_nonfinite,
            ..WriteOptions::default()
        },
    };
    job.execute(out, &exec, &|_| {})
        .map(drop)
        .map_err(|e| e.to_string())
}

/// The merge fails, writes nothing, and its message holds every one of `needles`.
fn refused(base: &Path, adapter: &Path, needles: &[&str]) -> String {
    let out = adapter.with_extension("out");
    let message = merge(base, adapter, &out, false)
        .err()
        .unwrap_or_else(|| panic!("{} was applied", adapter.display()));
    for needle in needles {
        assert!(message.contains(needle), "no {needle:?} in: {message}");
    }
    assert!(!out.exists(), "a refused merge wrote {}", out.display());
    message
}

fn nonfinite_values(dir: &Path) -> u64 {
    let merged = Checkpoint::open(dir).unwrap();
    merged
        .tensors()
        .iter()
        .map(|e| count_nonfinite(e.dtype, &merged.read_bytes(e).unwrap()))
        .sum()
}

/// Rank 0 (plain or rsLoRA) divides the scale by zero: every adapted
/// weight would be NaN. Refused at the config, naming the file and `r`.
#[test]
fn rank_zero_is_refused_at_the_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    for rslora in [false, true] {
        let dir = adapter(
            &tmp.path().join(format!("rank0-{rslora}")),
            &config(0, |c| {
                c["lora_alpha"] = json!(8);
                c["use_rslora"] = json!(rslora)
            }),
            &q_pair(0, 0.5),
        );
        refused(
            &base,
            &dir,
            &["r.yml:3:", "adapter_config.json", "`r`", "is 0"],
        );
    }
    // In `rank_pattern` too.
    let dir = adapter(
        &tmp.path().join("pattern0"),
        &config(4, |c| c["rank_pattern"] = json!({ Q_PROJ: 0 })),
        &q_pair(4, 0.5),
    );
    refused(&base, &dir, &["adapter_config.json", "rank_pattern"]);
}

/// An alpha beyond F32's range makes an infinite scale: refused at the config.
#[test]
fn an_alpha_beyond_f32_is_refused_at_the_adapter_config() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    let dir = adapter(
        &tmp.path().join("alpha"),
        &config(4, |c| c["lora_alpha"] = json!(1e300)),
        &q_pair(4, 0.01),
    );
    refused(&base, &dir, &["adapter_config.json", "`lora_alpha`", "F32"]);
}

/// Finite adapters whose `W + scale·B·A` overflows: the adapted weight is
/// computed, so its NaN and ±inf are the merge's making, an error naming
/// the tensor unless non-finite values are allowed.
#[test]
fn finite_adapters_that_compute_nonfinite_weights_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    let cases = [
        // Huge values: B·A = 4e40, beyond F32.
        ("values", config(4, |_| {}), q_pair(4, 1e20)),
        // A huge alpha within F32's range: scale 2.5e37 × 400.
        (
            "alpha",
            config(4, |c| c["lora_alpha"] = json!(1e38)),
            q_pair(4, 10.0),
        ),
    ];
    for (name, config, tensors) in cases {
        let dir = adapter(&tmp.path().join(name), &config, &tensors);
        refused(
            &base,
            &dir,
            &[
                &format!("{Q_PROJ}.weight"),
                "the merge made",
                "from finite inputs",
            ],
        );
        let out = tmp.path().join(format!("{name}-allowed"));
        merge(&base, &dir, &out, true).unwrap();
        assert_eq!(nonfinite_values(&out), (HIDDEN * HIDDEN) as u64, "{name}");
    }
}

/// NaN the adapter itself holds is its input's, as a checkpoint's own NaN
/// is: written (with a warning), not blamed on the merge.
#[test]
fn nonfinite_values_an_adapter_holds_are_its_own() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    let mut tensors = q_pair(4, 0.01);
    tensors[0].2[0] = f32::NAN;
    let dir = adapter(&tmp.path().join("nan"), &config(4, |_| {}), &tensors);
    let out = tmp.path().join("out");
    merge(&base, &dir, &out, false).unwrap();
    // One NaN in A's first row: B·A's first column.
    assert_eq!(nonfinite_values(&out), HIDDEN as u64);
}

/// LoRA matrices that are not 2-D: an error naming the file and the
/// tensor, before any tensor is computed (no index out of bounds).
#[test]
fn lora_matrices_of_zero_or_one_dimension_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    let a = "model.layers.0.self_attn.q_proj.lora_A.weight";
    let b = "model.layers.0.self_attn.q_proj.lora_B.weight";
    let cases = [
        (a, filled(a, vec![], 0.5), q_pair(4, 0.5)[1].clone()),
        (a, filled(a, vec![HIDDEN], 0.5), q_pair(4, 0.5)[1].clone()),
        (b, q_pair(4, 0.5)[0].clone(), filled(b, vec![HIDDEN], 0.5)),
        (b, q_pair(4, 0.5)[0].clone(), filled(b, vec![], 0.5)),
    ];
    for (k, (bad, first, second)) in cases.into_iter().enumerate() {
        let dir = adapter(
            &tmp.path().join(format!("dims-{k}")),
            &config(4, |_| {}),
            &[first, second],
        );
        refused(&base, &dir, &["adapter_model.safetensors", bad, "2-D"]);
    }
}

/// The matrices' rank is the config's (`r`, `rank_pattern`): the scale is
/// computed from it, as peft computes it.
#[test]
fn lora_ranks_must_be_the_configs() {
    let tmp = tempfile::tempdir().unwrap();
    let base = family(&tmp.path().join("family"));
    let dir = adapter(&tmp.path().join("r"), &config(4, |_| {}), &q_pair(2, 0.5));
    refused(
        &base,
        &dir,
        &["adapter_model.safetensors", Q_PROJ, "rank 4"],
    );
    // A rank the pattern gives is the one that counts.
    let dir = adapter(
        &tmp.path().join("pattern"),
        &config(4, |c| c["rank_pattern"] = json!({"q_proj": 2})),
        &q_pair(2, 0.5),
    );
    merge(&base, &dir, &tmp.path().join("out"), false).unwrap();
}

/// Writes what `extract` made as an adapter directory (F32 tensors).
fn save_extracted(dir: &Path, extracted: &amalgam_merge::lora::extract::Extracted) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("adapter_config.json"),
        serde_json::to_vec(&extracted.config).unwrap(),
    )
    .unwrap();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = extracted
        .tensors
        .iter()
        .map(|(name, t)| {
            let values = Vec::<f32>::try_from(t.to_kind(Kind::Float).flatten(0, -1)).unwrap();
            let shape = t.size().iter().map(|&d| d as usize).collect();
            let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (name.clone(), shape, bytes)
        })
        .collect();
    let views = data.iter().map(|(name, shape, bytes)| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), bytes)
                .unwrap();
        (name.clone(), view)
    });
    std::fs::write(
        dir.join("adapter_model.safetensors"),
        safetensors::serialize(views, None).unwrap(),
    )
    .unwrap();
}

/// A rank beyond i64 (the CLI's `--rank` is a usize) is full rank, not a
/// panic on a negative narrow.
#[test]
fn extract_with_a_huge_rank_is_full_rank() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = family(&tmp.path().join("family"));
    let base = Checkpoint::open(&base_dir).unwrap();
    let finetune = Checkpoint::open(tmp.path().join("family/finetune-1")).unwrap();
    let options = ExtractOptions {
        rank: usize::MAX,
        embed_lora: false,
        sv_epsilon: 0.0,
        modules_to_save: vec![],
        seed: 1,
    };
    let extracted = extract(&base, &finetune, &options, "base", &|_| {}).unwrap();
    let q = extracted
        .modules
        .iter()
        .find(|m| m.module == Q_PROJ)
        .unwrap();
    assert_eq!(q.rank, Some(HIDDEN));
    assert!(q.relative_error.unwrap() < 1e-5, "{q:?}");
}

/// Singular values all below `sv_epsilon` (a module that did not change,
/// or a large epsilon) keep rank 1: rank 0 is refused by peft and by
/// amalgam's own `BASE+ADAPTER`.
#[test]
fn extract_never_writes_rank_zero() {
    let tmp = tempfile::tempdir().unwrap();
    let base_dir = family(&tmp.path().join("family"));
    let base = Checkpoint::open(&base_dir).unwrap();
    let finetune = Checkpoint::open(tmp.path().join("family/finetune-1")).unwrap();
    let options = ExtractOptions {
        rank: 4,
        embed_lora: false,
        sv_epsilon: 1e30,
        modules_to_save: vec![],
        seed: 1,
    };
    // The base against itself: every change is zero.
    for finetune in [&finetune, &base] {
        let extracted = extract(&base, finetune, &options, "base", &|_| {}).unwrap();
        for module in &extracted.modules {
            assert_ne!(module.rank, Some(0), "{module:?}");
        }
        assert_eq!(extracted.config["r"], 1);
        let dir = tmp.path().join("extracted");
        save_extracted(&dir, &extracted);
        let out = tmp.path().join("applied");
        merge(&base_dir, &dir, &out, false).unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&out).unwrap();
    }
}
