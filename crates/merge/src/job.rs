//! From a recipe to a [`MergeJob`]: open every model it names (checkpoints,
//! adapters applied), describe them to the planner, plan, map vocabularies,
//! and check everything a run would trip over before anything is written.

use amalgam_checkpoint::arch::locate;
use amalgam_checkpoint::family::{self, Place};
use amalgam_checkpoint::Checkpoint;
use amalgam_recipe::{InventoryTensor, LayerRef, MethodSpec, ModelInventory, Plan, Recipe};

use crate::executor::MergeJob;
use crate::source::Source;
use crate::{vocabulary, MergeError, MergeMethod, Result};

impl MergeJob {
    /// Prepares `recipe` for `method`: every error here names the recipe
    /// line (or the model, tensor or file) it comes from.
    pub fn prepare(recipe: Recipe, method: &'static dyn MergeMethod) -> Result<Self> {
        let referenced = recipe.referenced_models();
        let sources = referenced
            .iter()
            .map(|m| Source::open(&recipe, m))
            .collect::<Result<Vec<_>>>()?;
        let inventories = referenced
            .iter()
            .zip(&sources)
            .map(|(model, source)| {
                inventory(&source.checkpoint).map_err(|e| {
                    MergeError::Recipe(
                        recipe.error(model.at, format!("model `{}`: {e}", model.path)),
                    )
                })
            })
            .collect::<Result<Vec<ModelInventory>>>()?;
        let spec = method.spec();
        let mut plan = Plan::resolve(&recipe, &spec, &inventories)?;
        let mut tokenizer_json = None;
        if let Some(spec) = &recipe.tokenizer {
            // The written tokenizer's vocabulary decides the embedding rows.
            let vocabulary = vocabulary::plan(&recipe, spec, &plan, &sources)?;
            plan.align_vocabulary(vocabulary.alignment);
            tokenizer_json = vocabulary.tokenizer_json;
        }
        warn_unknown_parameters(&recipe, &spec);
        for advice in &plan.warnings {
            tracing::warn!("{advice}");
        }
        let job = Self {
            recipe,
            plan,
            sources,
            method,
            tokenizer_json,
        };
        job.check_dtypes()?;
        // The output's config must describe the merged tensors: checked before a
        // dry run prints the plan, as before a real run writes anything.
        job.output_config()?;
        Ok(job)
    }
}

impl MergeJob {
    /// Every directory the job reads: checkpoints and adapters (an output may
    /// not be, contain or lie inside any of them).
    pub fn input_dirs(&self) -> Vec<std::path::PathBuf> {
        self.sources
            .iter()
            .flat_map(|s| {
                std::iter::once(s.dir().to_path_buf())
                    .chain(s.adapter.as_ref().map(|a| a.dir().to_path_buf()))
            })
            .collect()
    }
}

/// mergekit ignores parameters a method does not use; say so instead.
fn warn_unknown_parameters(recipe: &Recipe, spec: &MethodSpec) {
    let levels = std::iter::once(&recipe.parameters)
        .chain(recipe.models.iter().map(|m| &m.parameters))
        .chain(recipe.slices.iter().flat_map(|s| {
            std::iter::once(&s.parameters).chain(s.sources.iter().map(|src| &src.parameters))
        }));
    for params in levels {
        for (name, _, at) in &params.0 {
            if !spec.params.iter().any(|p| p.name == name) {
                tracing::warn!(
                    "{}:{at}: `{}` does not use parameter `{name}`; ignored",
                    recipe.source_name,
                    spec.name
                );
            }
        }
    }
}

/// What the planner needs of an input checkpoint: its tensors (layer, role;
/// a tied head as an alias of the embedding) and its layer count.
pub fn inventory(checkpoint: &Checkpoint) -> amalgam_checkpoint::Result<ModelInventory> {
    let family = family::of(checkpoint.config());
    let mut tensors: Vec<InventoryTensor> = checkpoint
        .tensors()
        .iter()
        .map(|t| {
            let (place, vocab) = family::placement(family, &t.name);
            InventoryTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                layer: locate(&t.name).map(|(index, digits)| LayerRef { index, digits }),
                vocab,
                before_layers: place == Some(Place::BeforeLayers),
                tied_alias: false,
                buffer: family::is_buffer(family, &t.name),
            }
        })
        .collect();
    let head = family::head_name(family);
    let has_head = tensors.iter().any(|t| t.name == head);
    if checkpoint.is_tied() && !has_head {
        if let Ok(embedding) = checkpoint.entry(&head) {
            tensors.push(InventoryTensor {
                name: head,
                shape: embedding.shape.clone(),
                layer: None,
                vocab: true,
                before_layers: false,
                tied_alias: true,
                buffer: false,
            });
        }
    }
    let layers = checkpoint.layers()?;
    Ok(ModelInventory { tensors, layers })
}

/// A model's identity for random streams: a hash of its path as the recipe writes it.
pub fn model_id(path: &str) -> u64 {
    amalgam_checkpoint::stream_seed(0, path, 0)
}
