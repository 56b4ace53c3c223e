//! A stitching recipe, run: its anchors located and checked (one tokenizer,
//! configs against the stored shapes), the calibration plan and its memory,
//! then the stitches calibrated, the routes trained when the recipe asks,
//! and the family saved.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::memory::{MemoryEstimate, MemoryLimit};
use amalgam_checkpoint::{hub, Checkpoint, Dtype, ModelCard};
use amalgam_nn::calibration::CalibrationText;
use amalgam_nn::text::TextTokenizer;
use amalgam_nn::{Decoder, DecoderConfig, Part};
use amalgam_recipe::{Location, RecipeError, StitchRecipe};
use tch::{Device, Kind};

use super::{
    calibrate, family_routes, members, save_family, training_memory, AnchorOut, AnchorParts,
    CalibrationPlan, StitchedFamily, StitchedMember,
};
use crate::{ElasticError, Result};

/// How far a stitching run is, for progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum StitchProgress {
    /// Calibration starts: this many blocks to walk.
    Calibrating { blocks: usize },
    /// One more block walked.
    Block,
    /// Route training starts: this many steps.
    Training { steps: usize },
    /// Training step `step` (0-based) done, with its loss.
    Step { step: usize, loss: f64 },
    /// A stage is done (calibration or training).
    Done,
}

/// A stitching recipe with its anchors checked and its work planned.
pub struct StitchJob {
    pub recipe: StitchRecipe,
    /// The anchors' directories.
    pub dirs: Vec<PathBuf>,
    pub configs: Vec<DecoderConfig>,
    /// The anchors' stored dtypes.
    pub dtypes: Vec<Dtype>,
    pub plan: CalibrationPlan,
    /// The run's peak memory by phase (calibration, and training if asked).
    pub memory: MemoryEstimate,
}

impl StitchJob {
    /// Locates the anchors (local directories, or Hub ids in the local
    /// cache), checks that they share one tokenizer, plans the routes and
    /// the calibration, refuses a run whose memory exceeds `limit`, and
    /// checks both configs against the stored shapes (reading one block).
    /// Every error about an anchor names its recipe line.
    pub fn prepare(recipe: StitchRecipe, limit: Option<&MemoryLimit>) -> Result<Self> {
        let dirs = recipe
            .anchors
            .iter()
            .map(|(path, at)| hub::locate(path).map_err(|e| anchor_error(&recipe, path, at, e)))
            .collect::<Result<Vec<_>>>()?;
        let mut configs = vec![];
        let mut dtypes = vec![];
        for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
            let checkpoint =
                Checkpoint::open(dir).map_err(|e| anchor_error(&recipe, path, at, e))?;
            let config =
                DecoderConfig::from_model_config(checkpoint.config(), &dir.join("config.json"))
                    .map_err(|e| anchor_error(&recipe, path, at, e))?;
            dtypes.push(checkpoint.weights_dtype());
            configs.push(config);
        }
        let (second, second_at) = &recipe.anchors[1];
        if configs[0].vocab_size != configs[1].vocab_size {
            return Err(anchor_error(
                &recipe,
                second,
                second_at,
                format!(
                    "a vocabulary of {} tokens, the other anchor's has {}: stitched anchors \
                     share one tokenizer",
                    configs[1].vocab_size, configs[0].vocab_size
                ),
            ));
        }
        if let (Ok(a), Ok(b)) = (TextTokenizer::load(&dirs[0]), TextTokenizer::load(&dirs[1])) {
            if !a.same_vocabulary(&b) {
                return Err(anchor_error(
                    &recipe,
                    second,
                    second_at,
                    "a different tokenizer from the other anchor's (tokens or ids differ): \
                     stitched anchors share one tokenizer",
                ));
            }
        }
        let pair = [&configs[0], &configs[1]];
        let routes = family_routes(pair.map(DecoderConfig::num_hidden_layers));
        if routes.is_empty() {
            return Err(ElasticError::Model {
                path: PathBuf::from(&recipe.source_name),
                message: "no stitch positions: each anchor needs at least two blocks".into(),
            });
        }
        let kinds = compute_kinds(&dtypes);
        let plan = CalibrationPlan::new(
            pair,
            kinds,
            routes,
            recipe.calibration.samples,
            recipe.calibration.seq_len,
            recipe.calibration.batch,
        );
        let training = recipe
            .train
            .as_ref()
            .map(|t| training_memory(pair, plan.stitch_parameters, t));
        let memory = plan
            .memory
            .clone()
            .phase("route training", training.unwrap_or(0));
        if let Some(limit) = limit {
            limit
                .check(&memory, "this stitching recipe")
                .map_err(ElasticError::Memory)?;
        }
        // Configs against the stored shapes (reading nothing but one block).
        for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
            Decoder::load_part(dir, Device::Cpu, Kind::Float, Some(&Part::block(0)))
                .map_err(|e| anchor_error(&recipe, path, at, e))?;
        }
        Ok(StitchJob {
            recipe,
            dirs,
            configs,
            dtypes,
            plan,
            memory,
        })
    }

    /// Calibrates every stitch on `device`, trains the routes when the
    /// recipe asks, and saves the family into `out` (replacing what is
    /// there only with `force`; never over, into or around an anchor).
    /// Returns the family's networks.
    pub fn run(
        &self,
        out: &Path,
        force: bool,
        device: Device,
        progress: &mut dyn FnMut(StitchProgress),
    ) -> Result<Vec<StitchedMember>> {
        let recipe = &self.recipe;
        let dirs = &self.dirs;
        // Before the long work.
        amalgam_checkpoint::check_output(out, force, dirs)?;
        let kinds = compute_kinds(&self.dtypes);
        let text_source = |seed: u64| {
            let longest = recipe
                .train
                .as_ref()
                .map_or(0, |t| t.seq_len)
                .max(recipe.calibration.seq_len);
            let models: Vec<&Path> = dirs.iter().map(|d| d.as_path()).collect();
            CalibrationText::open(
                &recipe.calibration.source,
                &recipe.calibration.field,
                self.configs[0].vocab_size,
                &models,
                longest,
                seed,
            )
            .map_err(|e| {
                ElasticError::Recipe(RecipeError {
                    source_name: recipe.source_name.clone(),
                    at: recipe.calibration.source_at,
                    message: e.to_string(),
                })
            })
        };
        let batches = text_source(recipe.calibration.seed)?.batches(
            recipe.calibration.samples,
            recipe.calibration.batch,
            recipe.calibration.seq_len,
        );
        let sources: Vec<Box<AnchorParts<'_>>> = dirs
            .iter()
            .zip(kinds)
            .map(|(dir, kind)| -> Box<AnchorParts<'_>> {
                Box::new(move |part: &Part| Ok(Decoder::load_part(dir, device, kind, Some(part))?))
            })
            .collect();
        progress(StitchProgress::Calibrating {
            blocks: self.plan.blocks(),
        });
        let stitches = calibrate(
            &self.plan,
            [sources[0].as_ref(), sources[1].as_ref()],
            &batches,
            recipe.ridge,
            &mut || progress(StitchProgress::Block),
        )?;
        progress(StitchProgress::Done);
        let pair = [&self.configs[0], &self.configs[1]];
        let members = members(pair, &self.plan.routes, stitches);
        let card = ModelCard {
            title: "An anchor of a stitched family".into(),
            summary: format!(
                "Saved by `amalgam stitch` as an anchor of the family in this directory's \
                 parent ({} networks; see family.json).",
                members.len()
            ),
            recipe: Some(recipe.text.clone()),
            inputs: vec![],
        };
        let Some(train) = &recipe.train else {
            let anchors: Vec<AnchorOut<'_>> =
                dirs.iter().map(|d| AnchorOut::Checkpoint(d)).collect();
            save_family(out, force, &anchors, &members, &card)?;
            return Ok(members);
        };
        let anchors = recipe
            .anchors
            .iter()
            .zip(dirs)
            .map(|((path, at), dir)| {
                Decoder::load(dir, device).map_err(|e| anchor_error(recipe, path, at, e))
            })
            .collect::<Result<Vec<_>>>()?;
        let mut family = StitchedFamily {
            anchors,
            members,
            dirs: dirs.clone(),
        };
        progress(StitchProgress::Training { steps: train.steps });
        let losses = family.train(train, &mut text_source(train.seed)?, &mut |step, loss| {
            progress(StitchProgress::Step { step, loss })
        })?;
        progress(StitchProgress::Done);
        let tail = &losses[losses.len().saturating_sub(20)..];
        tracing::info!(
            "trained the routes for {} steps; final loss {:.3}",
            train.steps,
            tail.iter().sum::<f64>() / tail.len().max(1) as f64
        );
        // Frozen anchors are copied from their checkpoints, bit for bit.
        let anchors: Vec<AnchorOut<'_>> = family
            .anchors
            .iter()
            .zip(dirs)
            .map(|(model, dir)| match train.anchor_lr_scale > 0.0 {
                true => AnchorOut::Model {
                    model,
                    files_from: dir,
                },
                false => AnchorOut::Checkpoint(dir),
            })
            .collect();
        save_family(out, force, &anchors, &family.members, &card)?;
        Ok(family.members)
    }
}

/// An error about the anchor `path`, at its recipe line.
fn anchor_error(
    recipe: &StitchRecipe,
    path: &str,
    at: &Location,
    e: impl std::fmt::Display,
) -> ElasticError {
    ElasticError::Recipe(RecipeError {
        source_name: recipe.source_name.clone(),
        at: *at,
        message: format!("anchor `{path}`: {e}"),
    })
}

/// Anchors stored in BF16 compute in BF16 (so do the routes through them);
/// others in F32.
fn compute_kinds(dtypes: &[Dtype]) -> [Kind; 2] {
    let kind = |d: &Dtype| match d {
        Dtype::BF16 => Kind::BFloat16,
        _ => Kind::Float,
    };
    [kind(&dtypes[0]), kind(&dtypes[1])]
}
