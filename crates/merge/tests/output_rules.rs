//! The output rules, for random recipes over random small models (proptest):
//! a merge either fails with an error and writes nothing, or its output opens,
//! its config describes its tensors, every value is finite (the inputs are),
//! and every tensor the inputs contribute is in it under the expected name.

use std::collections::BTreeSet;
use std::path::Path;

use amalgam_checkpoint::arch::layer_index;
use amalgam_checkpoint::synthetic::{generate_family, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{
    config_mismatch, count_nonfinite, Checkpoint, Dtype, TensorSpec, WriteOptions,
};
use amalgam_merge::executor::{ExecOptions, MergeJob};
use amalgam_merge::registry;
use amalgam_recipe::Recipe;
use proptest::prelude::*;
use proptest::test_runner::RngSeed;

#[derive(Debug, Clone)]
struct Models {
    shape: LlamaShape,
    dtype: Dtype,
    finetunes: usize,
    seed: u64,
}

fn models() -> impl Strategy<Value = Models> {
    (
        (1usize..=3, any::<bool>(), 1usize..=2, 0usize..3),
        (
            prop::sample::select(vec![Dtype::F32, Dtype::BF16, Dtype::F16]),
            1usize..=3,
        ),
        any::<u64>(),
    )
        .prop_map(
            |((layers, tied, kv_heads, width), (dtype, finetunes), seed)| Models {
                shape: LlamaShape {
                    hidden: 16,
                    layers,
                    intermediate: [8, 24, 40][width],
                    vocab: 40,
                    heads: 2,
                    kv_heads,
                    tied,
                },
                dtype,
                finetunes,
                seed,
            },
        )
}

/// A recipe: a method and parameters over the family's models, in mergekit's
/// `models:` form, or passthrough slices of random layer ranges.
#[derive(Debug, Clone)]
enum Form {
    Models {
        method: &'static str,
        base: bool,
        weights: Vec<f64>,
        density: f64,
        t: f64,
        normalize: bool,
        out_dtype: Option<&'static str>,
    },
    Slices(Vec<(usize, usize, usize)>),
}

const METHODS: &[&str] = &[
    "linear",
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "model_stock",
    "karcher",
    "slerp",
    "nuslerp",
    "multislerp",
    "nearswap",
    "ram",
    "ramplus_tl",
    "arcee_fusion",
];

fn form() -> impl Strategy<Value = Form> {
    let models = (
        prop::sample::select(METHODS),
        any::<bool>(),
        prop::collection::vec(prop::sample::select(vec![-1.0, 0.0, 0.5, 1.0, 1e30]), 4),
        prop::sample::select(vec![0.1, 0.5, 1.0]),
        prop::sample::select(vec![0.0, 0.3, 1.0]),
        any::<bool>(),
        prop::sample::select(vec![None, Some("float16"), Some("bfloat16")]),
    )
        .prop_map(
            |(method, base, weights, density, t, normalize, out_dtype)| Form::Models {
                method,
                base,
                weights,
                density,
                t,
                normalize,
                out_dtype,
            },
        );
    let slices =
        prop::collection::vec((0usize..4, 0usize..3, 1usize..=3), 1..4).prop_map(Form::Slices);
    prop_oneof![3 => models, 1 => slices]
}

fn recipe_text(root: &Path, models: &Models, form: &Form) -> String {
    let member = |k: usize| {
        if k == 0 {
            format!("{}/base", root.display())
        } else {
            format!("{}/finetune-{k}", root.display())
        }
    };
    match form {
        Form::Models {
            method,
            base,
            weights,
            density,
            t,
            normalize,
            out_dtype,
        } => {
            let mut text = format!("merge_method: {method}\n");
            if *base {
                text += &format!("base_model: {}\n", member(0));
            }
            text += "models:\n";
            let first = usize::from(*base);
            for (k, weight) in weights
                .iter()
                .enumerate()
                .take(models.finetunes + 1)
                .skip(first)
            {
                text += &format!(
                    "  - model: {}\n    parameters: {{weight: {weight}, density: {density}}}\n",
                    member(k)
                );
            }
            text += &format!("parameters: {{t: {t}, normalize: {normalize}, epsilon: 0.05}}\n");
            if let Some(dtype) = out_dtype {
                text += &format!("out_dtype: {dtype}\n");
            }
            text
        }
        Form::Slices(slices) => {
            let mut text = "merge_method: passthrough\nslices:\n".to_owned();
            for &(model, start, len) in slices {
                let model = model.min(models.finetunes);
                let start = start.min(models.shape.layers - 1);
                let end = (start + len).min(models.shape.layers);
                text += &format!(
                    "  - sources:\n      - model: {}\n        layer_range: [{start}, {end}]\n",
                    member(model)
                );
            }
            text
        }
    }
}

/// The tensor names the output must hold, worked out from the base's names
/// and the layers stacked (every input of a family has the same names).
fn expected_names(base: &Checkpoint, layers: usize) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for entry in base.tensors() {
        match layer_index(&entry.name) {
            None => {
                names.insert(entry.name.clone());
            }
            Some(0) => {
                for layer in 0..layers {
                    names.insert(entry.name.replacen(".0.", &format!(".{layer}."), 1));
                }
            }
            Some(_) => {}
        }
    }
    names
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, rng_seed: RngSeed::Fixed(20_261_201), ..ProptestConfig::default() })]

    #[test]
    fn a_merge_fails_cleanly_or_writes_a_whole_finite_loadable_model(
        models in models(),
        form in form(),
    ) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("family");
        let options = FamilyOptions {
            shape: models.shape,
            dtype: models.dtype,
            seed: models.seed,
            finetunes: models.finetunes,
            write: WriteOptions::default(),
        };
        generate_family(&root, &options, &|_| {}).unwrap();
        let text = recipe_text(&root, &models, &form);
        let out = tmp.path().join("out");
        let result = (|| -> Result<usize, String> {
            let recipe = Recipe::parse(&text, "r.yml").map_err(|e| e.to_string())?;
            let method = registry::per_tensor(&recipe.merge_method).expect("a registered method");
            let job = MergeJob::prepare(recipe, method).map_err(|e| e.to_string())?;
            let exec = ExecOptions {
                seed: 7,
                device: tch::Device::Cpu,
                threads: 2,
                memory_budget: 1 << 30,
                write: WriteOptions::default(),
            };
            job.execute(&out, &exec, &|_| {}).map_err(|e| e.to_string())?;
            Ok(job.plan.layers)
        })();
        match result {
            Err(message) => {
                prop_assert!(!out.exists(), "a failed merge wrote {}: {message}", out.display());
            }
            Ok(layers) => {
                let merged = Checkpoint::open(&out).map_err(|e| TestCaseError::fail(e.to_string()))?;
                let specs: Vec<TensorSpec> = merged
                    .tensors()
                    .iter()
                    .map(|t| TensorSpec::new(&t.name, t.dtype, t.shape.clone()))
                    .collect();
                prop_assert_eq!(config_mismatch(merged.config(), &specs), None, "{}", text);
                for entry in merged.tensors() {
                    let bytes = merged.read_bytes(entry).unwrap();
                    prop_assert_eq!(count_nonfinite(entry.dtype, &bytes), 0, "{} in {}", entry.name, text);
                }
                let base = Checkpoint::open(root.join("base")).unwrap();
                let names: BTreeSet<String> =
                    merged.tensors().iter().map(|t| t.name.clone()).collect();
                prop_assert_eq!(names, expected_names(&base, layers), "{}", text);
                prop_assert!(merged.tensors().iter().all(|t| layer_index(&t.name).is_none_or(|l| l < layers)));
            }
        }
    }
}
