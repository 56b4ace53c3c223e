//! Recipes: the YAML schemas (mergekit-compatible for merges, multi-stage
//! recipes and mergekit-moe configs; `kind: extract` for nested submodels;
//! `kind: stitch` for SN-Net families; `merge_method: pleas`'s own
//! parameters; tune markers for `amalgam tune`), validation with line and column, and resolution of
//! parameters into a [`Plan`]. Pure data: no
//! tensors, no I/O — the caller describes its models as [`ModelInventory`]s
//! and the merge method as a [`MethodSpec`].

mod calibration;
mod chat_template;
mod dtype;
mod error;
mod extract;
mod moe;
mod params;
mod plan;
mod pleas;
mod schema;
mod stages;
mod stitch;
mod tokenizer;
mod tune;
mod yaml;

pub use calibration::{Calibration, CalibrationBlock};
pub use chat_template::ChatTemplate;
pub use dtype::FloatDtype;
pub use error::{Location, RecipeError};
pub use extract::{Budget, ExtractRecipe, Width, WidthChoice};
pub use moe::{Expert, GateMode, MoeRecipe, MAX_PROMPTS, MAX_PROMPT_BYTES};
pub use params::{Conditional, Scalar, Setting};
pub use plan::{
    BasePolicy, InputTransform, InventoryTensor, LayerRef, MethodSpec, ModelInventory, ParamKind,
    ParamScope, ParamSpec, Plan, PlannedInput, PlannedTensor, Resolved, VocabularyAlignment,
};
pub use pleas::{PleasMatching, PleasRecipe};
pub use schema::{ModelDef, ModelRef, Params, Recipe, SliceDef, SourceDef};
pub use stages::{Stage, Stages};

/// The most bytes of a recipe file read (real ones are a few KB): a FIFO or
/// a huge file is refused, not read.
pub const MAX_RECIPE_BYTES: u64 = 16 << 20;
pub use stitch::{StitchRecipe, StitchTraining};
pub use tokenizer::{TokenRef, TokenRule, TokenSource, TokenizerSource, TokenizerSpec};
pub use tune::{SearchSpace, TuneParam};
