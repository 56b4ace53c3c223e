//! Every recipe kind on hostile text: merge recipes parsed and planned (any
//! method in the registry, models of two to five layers, tied or not), PLeaS
//! parameters, extraction recipes resolved and planned against a tiny model,
//! stitching recipes parsed, tune markers found and replaced (the result
//! must be valid YAML without markers), multi-stage documents split and
//! ordered (every stage once, each after the stages it uses). A plan that
//! resolves must be whole.
#![no_main]

mod common;

use std::sync::OnceLock;

use amalgam_checkpoint::arch::locate;
use amalgam_checkpoint::family::{self, Place};
use amalgam_checkpoint::synthetic::LlamaShape;
use amalgam_checkpoint::{Checkpoint, Dtype};
use amalgam_elastic::matformer::{self, Extraction, ModelLayout};
use amalgam_merge::registry;
use amalgam_recipe::{
    ExtractRecipe, InventoryTensor, LayerRef, ModelInventory, Plan, PleasRecipe, Recipe,
    SearchSpace, Stages, StitchRecipe,
};
use libfuzzer_sys::fuzz_target;

/// A model for a recipe path: its layer count and tying follow the path,
/// so recipes over several models meet different shapes.
fn inventory(path: &str) -> ModelInventory {
    let shape = LlamaShape {
        layers: 2 + path.len() % 4,
        tied: path.contains("tied"),
        ..LlamaShape::TINY
    };
    let tensors = shape
        .specs(Dtype::BF16)
        .into_iter()
        .map(|spec| {
            let (place, vocab) = family::placement(Some(family::llama()), &spec.name);
            InventoryTensor {
                layer: locate(&spec.name).map(|(index, digits)| LayerRef { index, digits }),
                vocab,
                before_layers: place == Some(Place::BeforeLayers),
                tied_alias: false,
                buffer: false,
                shape: spec.shape,
                name: spec.name,
            }
        })
        .collect();
    ModelInventory {
        tensors,
        layers: shape.layers,
    }
}

fn tiny() -> &'static (Checkpoint, ModelLayout) {
    static TINY: OnceLock<(Checkpoint, ModelLayout)> = OnceLock::new();
    TINY.get_or_init(|| {
        let checkpoint = Checkpoint::open(common::tiny_model("recipe", u64::MAX)).unwrap();
        let layout = ModelLayout::read(&checkpoint).unwrap();
        (checkpoint, layout)
    })
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(recipe) = Recipe::parse(text, "fuzz.yml") {
        if recipe.merge_method == "pleas" {
            let _ = PleasRecipe::from_recipe(&recipe);
        } else if let Some(method) = registry::per_tensor(&recipe.merge_method) {
            let inventories: Vec<ModelInventory> = recipe
                .referenced_models()
                .iter()
                .map(|m| inventory(&m.path))
                .collect();
            if let Ok(plan) = Plan::resolve(&recipe, &method.spec(), &inventories) {
                assert!(!plan.tensors.is_empty(), "a plan writes something");
                for tensor in &plan.tensors {
                    assert!(!tensor.inputs.is_empty(), "{} has inputs", tensor.name);
                    for input in &tensor.inputs {
                        assert_eq!(input.shape.len(), tensor.shape.len(), "{}", tensor.name);
                    }
                }
            }
        }
    }
    if let Ok(extract) = ExtractRecipe::parse(text, "fuzz.yml") {
        let (checkpoint, layout) = tiny();
        if let Ok(spec) = matformer::resolve(&extract, checkpoint, layout) {
            let _ = Extraction::plan(checkpoint, layout, spec);
        }
    }
    let _ = StitchRecipe::parse(text, "fuzz.yml");
    if let Ok(stages) = Stages::parse(text, "fuzz.yml") {
        assert!(!stages.run_order.is_empty(), "an empty recipe is an error");
        assert!(stages.final_stage() < stages.run_order.len());
        for (i, stage) in stages.run_order.iter().enumerate() {
            assert!(
                stage.uses.iter().all(|&j| j < i),
                "stage {i} runs after its inputs"
            );
            if let Some(name) = stage.name() {
                assert!(
                    !name.contains('/') && name != ".." && name != ".",
                    "{name:?}"
                );
            }
        }
    }
    if let Ok(space) = SearchSpace::parse(text, "fuzz.yml") {
        let values: Vec<f64> = space.params.iter().map(|p| p.low).collect();
        let replaced = space.instantiate(&values);
        let again = SearchSpace::parse(&replaced, "fuzz.yml").expect("replaced text parses");
        assert!(again.params.is_empty(), "every marker replaced");
    }
});
