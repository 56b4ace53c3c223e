use super::*;
use crate::Recipe;

fn llama(layers: usize, vocab: usize) -> ModelInventory {
    let mut tensors = vec![InventoryTensor {
        name: "model.embed_tokens.weight".into(),
        shape: vec![vocab, 8],
        layer: None,
        vocab: true,
        before_layers: true,
        tied_alias: false,
        buffer: false,
    }];
    for i in 0..layers {
        for (suffix, shape) in [
            ("self_attn.q_proj.weight", vec![8, 8]),
            ("mlp.up_proj.weight", vec![16, 8]),
        ] {
            let prefix = "model.layers.";
            tensors.push(InventoryTensor {
                name: format!("{prefix}{i}.{suffix}"),
                shape,
                layer: Some(LayerRef {
                    index: i,
                    digits: prefix.len()..prefix.len() + i.to_string().len(),
                }),
                vocab: false,
                before_layers: false,
                tied_alias: false,
                buffer: false,
            });
        }
    }
    for (name, shape, vocab) in [
        ("model.norm.weight", vec![8], false),
        ("lm_head.weight", vec![vocab, 8], true),
    ] {
        tensors.push(InventoryTensor {
            name: name.into(),
            shape,
            layer: None,
            vocab,
            before_layers: false,
            tied_alias: false,
            buffer: false,
        });
    }
    ModelInventory { tensors, layers }
}

fn check_density(value: &Scalar) -> Result<(), String> {
    match value.as_f64() {
        Some(d) if d > 0.0 && d <= 1.0 => Ok(()),
        _ => Err(format!("density must be in (0, 1], got {value}")),
    }
}

fn ties() -> MethodSpec {
    MethodSpec {
        name: "ties",
        base: BasePolicy::Required,
        params: vec![
            ParamSpec {
                name: "weight",
                kind: ParamKind::Number,
                scope: ParamScope::PerNonBase,
                default: None,
                check: None,
                warn: None,
            },
            ParamSpec {
                name: "density",
                kind: ParamKind::Number,
                scope: ParamScope::PerNonBase,
                default: Some(Scalar::Number(1.0)),
                check: Some(check_density),
                warn: None,
            },
            ParamSpec {
                name: "lambda",
                kind: ParamKind::Number,
                scope: ParamScope::Shared,
                default: Some(Scalar::Number(1.0)),
                check: None,
                warn: None,
            },
        ],
        min_models: 1,
        max_models: None,
    }
}

fn passthrough() -> MethodSpec {
    MethodSpec {
        name: "passthrough",
        base: BasePolicy::Optional,
        params: vec![],
        min_models: 1,
        max_models: Some(1),
    }
}

fn plan(text: &str, method: &MethodSpec, inventories: &[ModelInventory]) -> Result<Plan, String> {
    let recipe = Recipe::parse(text, "r.yml").map_err(|e| e.to_string())?;
    Plan::resolve(&recipe, method, inventories).map_err(|e| e.to_string())
}

const TIES: &str = "merge_method: ties
base_model: base
models:
  - model: a
    parameters:
      weight: [0, 1]
      density:
        - filter: mlp
          value: 0.5
  - model: b
    parameters:
      weight: 1
parameters:
  density: 0.9
  lambda: 2
";

#[test]
fn models_form_appends_the_base_and_interpolates_gradients() {
    let inv = vec![llama(4, 32), llama(4, 32), llama(4, 32)];
    let p = plan(TIES, &ties(), &inv).unwrap();
    assert_eq!(p.models, ["base", "a", "b"]);
    assert_eq!(p.layout_model, 0);
    assert_eq!(p.layers, 4);
    assert_eq!(p.tensors.len(), 1 + 4 * 2 + 2);
    assert_eq!(p.tensors[0].name, "model.embed_tokens.weight");
    assert_eq!(p.tensors.last().unwrap().name, "lm_head.weight");
    for tensor in &p.tensors {
        // a, b, then the appended base
        let order: Vec<usize> = tensor.inputs.iter().map(|i| i.model).collect();
        assert_eq!(order, [1, 2, 0]);
        assert_eq!(tensor.base, Some(2));
        assert!(
            tensor.inputs[2].params.is_empty(),
            "the base gets no per-non-base parameters"
        );
        assert_eq!(tensor.params["lambda"].number(), 2.0);
    }
    // layer 2 of 4: t = 2/3; weight gradient [0, 1] → 2/3
    let up = p
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.2.mlp.up_proj.weight")
        .unwrap();
    assert!((up.t - 2.0 / 3.0).abs() < 1e-12);
    assert!((up.inputs[0].params["weight"].number() - 2.0 / 3.0).abs() < 1e-12);
    // filters match the input name: mlp → 0.5 from the model; attention falls to the top level
    assert_eq!(up.inputs[0].params["density"].number(), 0.5);
    let q = p
        .tensors
        .iter()
        .find(|t| t.name == "model.layers.2.self_attn.q_proj.weight")
        .unwrap();
    assert_eq!(q.inputs[0].params["density"].number(), 0.9);
    assert_eq!(
        q.inputs[0].params["density"].at,
        Some(Location {
            line: 14,
            column: 3
        })
    );
    // outside the layers, t = 0
    assert_eq!(p.tensors[0].inputs[0].params["weight"].number(), 0.0);
}

#[test]
fn missing_weight_names_the_model_line() {
    let text = TIES.replace("      weight: 1\n", "      density: 0.5\n");
    let err = plan(&text, &ties(), &[llama(2, 32), llama(2, 32), llama(2, 32)]).unwrap_err();
    assert_eq!(err, "r.yml:10:12: missing parameter `weight` for model `b` (tensor `model.embed_tokens.weight`), required by `ties`");
}

/// A required parameter given without a value (`t: []`) is reported at its
/// own line, not at `merge_method:` as missing.
#[test]
fn a_required_parameter_without_a_value_points_at_its_line() {
    let slerp = MethodSpec {
        name: "slerp",
        base: BasePolicy::Required,
        params: vec![ParamSpec {
            name: "t",
            kind: ParamKind::Number,
            scope: ParamScope::Shared,
            default: None,
            check: None,
            warn: None,
        }],
        min_models: 1,
        max_models: Some(1),
    };
    let models = "merge_method: slerp\nbase_model: a\nmodels:\n  - model: a\n  - model: b\n";
    let two = [llama(2, 32), llama(2, 32)];
    let err = plan(&format!("{models}parameters:\n  t: []\n"), &slerp, &two).unwrap_err();
    assert_eq!(
        err,
        "r.yml:7:3: parameter `t` is an empty list for tensor `model.embed_tokens.weight`, and \
         `slerp` requires it: give a value (a number, or a list of at least one)"
    );
    let filtered = format!("{models}parameters:\n  t:\n    - filter: mlp\n      value: 0.5\n");
    let err = plan(&filtered, &slerp, &two).unwrap_err();
    assert!(
        err.starts_with("r.yml:7:3: parameter `t` gives no value (no entry's filter matches it"),
        "{err}"
    );
    let err = plan(&format!("{models}parameters:\n  t: 0.5\n"), &slerp, &two);
    assert!(err.is_ok(), "{err:?}");
    let per_model = TIES.replace("      weight: 1\n", "      weight: []\n");
    let err = plan(
        &per_model,
        &ties(),
        &[llama(2, 32), llama(2, 32), llama(2, 32)],
    )
    .unwrap_err();
    assert!(
        err.starts_with("r.yml:12:7: parameter `weight` for model `b` is an empty list"),
        "{err}"
    );
}

#[test]
fn density_outside_range_points_at_the_setting() {
    let text = TIES.replace("density: 0.9", "density: 1.5");
    let err = plan(&text, &ties(), &[llama(2, 32), llama(2, 32), llama(2, 32)]).unwrap_err();
    assert_eq!(
        err,
        "r.yml:14:3: parameter `density` for model `a`: density must be in (0, 1], got 1.5"
    );
}

#[test]
fn wrong_parameter_type_is_reported() {
    let text = TIES.replace("lambda: 2", "lambda: lots");
    let err = plan(&text, &ties(), &[llama(2, 32), llama(2, 32), llama(2, 32)]).unwrap_err();
    assert!(
        err.contains("r.yml:15:3: parameter `lambda` must be a number, got \"lots\""),
        "{err}"
    );
}

#[test]
fn method_needing_a_base_without_one() {
    let text = "merge_method: ties\nmodels:\n  - model: a\n    parameters: {weight: 1}\n";
    let err = plan(text, &ties(), &[llama(2, 32)]).unwrap_err();
    assert_eq!(err, "r.yml:1:15: merge method `ties` needs a `base_model`");
}

#[test]
fn layer_range_beyond_the_model() {
    let text = "merge_method: passthrough\nslices:\n  - sources:\n      - model: a\n        layer_range: [0, 6]\n";
    let err = plan(text, &passthrough(), &[llama(4, 32)]).unwrap_err();
    assert_eq!(
        err,
        "r.yml:5:22: layer_range [0, 6] goes beyond model `a`, which has 4 layers"
    );
}

#[test]
fn shape_mismatch_names_both_models() {
    let mut odd = llama(2, 32);
    odd.tensors[1].shape = vec![8, 4];
    let err = plan(TIES, &ties(), &[llama(2, 32), odd, llama(2, 32)]).unwrap_err();
    assert_eq!(err, "r.yml:4:12: tensor `model.layers.0.self_attn.q_proj.weight`: model `a` has shape [8, 4] but model `base` has [8, 8]");
}

#[test]
fn vocabulary_tensors_are_cut_to_the_base() {
    let p = plan(TIES, &ties(), &[llama(2, 32), llama(2, 40), llama(2, 36)]).unwrap();
    assert_eq!(p.tensors[0].shape, vec![32, 8]);
    assert_eq!(p.tensors.last().unwrap().shape, vec![32, 8]);
}

#[test]
fn passthrough_slices_stack_and_renumber_layers() {
    let text = "merge_method: passthrough
slices:
  - sources:
      - model: a
        layer_range: [0, 3]
  - sources:
      - model: b
        layer_range: [1, 4]
";
    let p = plan(text, &passthrough(), &[llama(4, 32), llama(4, 32)]).unwrap();
    assert_eq!(p.layers, 6);
    let q: Vec<(String, usize, String)> = p
        .tensors
        .iter()
        .filter(|t| t.name.contains("q_proj"))
        .map(|t| {
            (
                t.name.clone(),
                t.inputs[0].model,
                t.inputs[0].tensor.clone(),
            )
        })
        .collect();
    assert_eq!(
        q[3],
        (
            "model.layers.3.self_attn.q_proj.weight".into(),
            1,
            "model.layers.1.self_attn.q_proj.weight".into()
        )
    );
    assert_eq!(q[5].2, "model.layers.3.self_attn.q_proj.weight");
    // pre-layer weights from the first slice, post-layer from the last
    assert_eq!(p.tensors[0].inputs[0].model, 0);
    assert_eq!(p.tensors.last().unwrap().inputs[0].model, 1);
}

#[test]
fn model_counts_are_enforced() {
    let text = "merge_method: passthrough\nmodels:\n  - model: a\n  - model: b\n";
    let err = plan(text, &passthrough(), &[llama(2, 32), llama(2, 32)]).unwrap_err();
    assert_eq!(
        err,
        "r.yml:1:15: merge method `passthrough` takes exactly 1 models, got 2"
    );
}

#[test]
fn with_layer_rewrites_only_the_block_index() {
    let inventory = llama(12, 32);
    let by_name = |name: &str| inventory.get(name).unwrap();
    assert_eq!(
        with_layer(by_name("model.layers.0.mlp.up_proj.weight"), 11),
        "model.layers.11.mlp.up_proj.weight"
    );
    assert_eq!(
        with_layer(by_name("model.layers.10.mlp.up_proj.weight"), 0),
        "model.layers.0.mlp.up_proj.weight"
    );
    assert_eq!(
        with_layer(by_name("model.norm.weight"), 3),
        "model.norm.weight"
    );
}
