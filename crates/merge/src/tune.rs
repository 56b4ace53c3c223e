//! Recipe tuning: a merge recipe's `{tune: [lo, hi]}` parameters searched
//! for the lowest mean loss on scoring windows (the corpus' validation
//! split, for `amalgam tune`). Each trial merges in memory (the merged
//! tensors go straight into the forward pass; of a multi-stage recipe, only
//! the stages before the last are written, to a scratch directory, placed as
//! [`crate::stages`] places them and reused while their text is unchanged).
//! The search is TPE (one estimator per parameter, seeded): same recipe,
//! seed and thread count, same trials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::WriteOptions;
use amalgam_nn::eval::{check_vocabulary, score_windows, Window};
use amalgam_nn::{Decoder, DecoderConfig};
use amalgam_recipe::{Recipe, RecipeError, SearchSpace, Stages, TuneParam};
use rand_tpe::{RngExt, SeedableRng};
use tch::{Device, Tensor};

use crate::executor::{ExecOptions, MergeJob};
use crate::registry::{self, Method};
use crate::stages::{Placement, StageOutput, StageOutputs};
use crate::{MergeError, Result};

/// One trial: the values tried, the loss on each domain and their mean
/// (infinite when the merge made non-finite weights).
pub struct Trial {
    pub values: Vec<f64>,
    pub losses: Vec<f64>,
    pub mean: f64,
}

/// Trials after the first drawn uniformly from the ranges before TPE takes
/// over: its per-parameter estimators need a spread of outcomes to start
/// from (otherwise parameters whose defaults sit at the same relative place
/// of their ranges move in lockstep).
const STARTUP_TRIALS: usize = 5;

/// Rounds a candidate to four decimals (readable recipes), inside its range.
fn round(value: f64, low: f64, high: f64) -> f64 {
    ((value * 1e4).round() / 1e4).clamp(low, high)
}

/// The middle of `[low, high]`, also where `low + high` overflows.
fn midpoint(low: f64, high: f64) -> f64 {
    let mid = (low + high) / 2.0;
    if mid.is_finite() {
        mid
    } else {
        low + (high - low) / 2.0
    }
}

/// The estimator's range for a marker: `[low, high]` with `high` inside (a
/// TPE range excludes its end, and a default, a draw or a rounding may land
/// on `high`). An error naming the marker where the range's width is not a
/// finite number (the estimators and the uniform draws need it).
fn search_range(p: &TuneParam, source: &str) -> Result<tpe::range::Range> {
    tpe::range(p.low, next_up(p.high)).map_err(|e| {
        MergeError::Recipe(RecipeError {
            source_name: source.into(),
            at: p.at,
            message: format!(
                "`tune: [{}, {}]` at {}: {e}: the range is too wide (its width, high minus \
                 low, must be a finite number)",
                p.low, p.high, p.label
            ),
        })
    })
}

/// The least `f64` above `x` (`f64::next_up`, stable only since Rust 1.86).
fn next_up(x: f64) -> f64 {
    if x.is_nan() || x == f64::INFINITY {
        x
    } else if x == 0.0 {
        f64::from_bits(1)
    } else if x > 0.0 {
        f64::from_bits(x.to_bits() + 1)
    } else {
        f64::from_bits(x.to_bits() - 1)
    }
}

/// A recipe's search space, checked: at least one marker, every range
/// searchable, the recipe's stages and models ready (with each marker at its
/// default or midpoint).
pub struct Search {
    pub space: SearchSpace,
    source: String,
    ranges: Vec<tpe::range::Range>,
    /// The first trial's values: each marker's default, else its midpoint.
    first: Vec<f64>,
    /// The input directories of the stages that read no other stage.
    pub inputs: Vec<PathBuf>,
}

/// Where trials are scored.
pub struct Scoring<'w> {
    /// Windows per domain, under the domain's name.
    pub domains: &'w [(String, Vec<Window>)],
    /// Windows per forward pass.
    pub batch: usize,
    pub device: Device,
}

/// A finished search.
pub struct Tuned {
    pub trials: Vec<Trial>,
    /// The first trial of the lowest mean.
    pub best: usize,
}

impl Search {
    /// The search space of the recipe `text` (called `source` in messages).
    pub fn new(text: &str, source: &str) -> Result<Self> {
        let space = SearchSpace::parse(text, source)?;
        if space.params.is_empty() {
            return Err(MergeError::Search(format!(
                "{source}: no `{{tune: [low, high]}}` marker: nothing to tune"
            )));
        }
        let ranges = space
            .params
            .iter()
            .map(|p| search_range(p, source))
            .collect::<Result<Vec<_>>>()?;
        let first: Vec<f64> = space
            .params
            .iter()
            .map(|p| p.default.unwrap_or_else(|| midpoint(p.low, p.high)))
            .collect();
        let inputs = check(&space.instantiate(&first), source)?;
        Ok(Search {
            space,
            source: source.to_owned(),
            ranges,
            first,
            inputs,
        })
    }

    /// Runs `trials` trials (at least one), seeded by `seed` (which also
    /// seeds the merges' random methods), writing earlier stages under
    /// `stages_dir`; `on_trial(done, best mean so far)` after each.
    pub fn run(
        &self,
        trials: usize,
        seed: u64,
        scoring: &Scoring<'_>,
        stages_dir: &Path,
        on_trial: &mut dyn FnMut(usize, f64),
    ) -> Result<Tuned> {
        let space = &self.space;
        let mut optimisers: Vec<tpe::TpeOptimizer> = self
            .ranges
            .iter()
            .map(|range| tpe::TpeOptimizer::new(tpe::parzen_estimator(), *range))
            .collect();
        let mut rng = rand_tpe::rngs::StdRng::seed_from_u64(seed);
        let mut done: Vec<Trial> = vec![];
        for index in 0..trials.max(1) {
            let values = if index == 0 {
                self.first.clone()
            } else {
                let mut ask = |o: &mut tpe::TpeOptimizer, p: &TuneParam| {
                    let value = if index <= STARTUP_TRIALS {
                        rng.random_range(p.low..=p.high)
                    } else {
                        let Ok(value) = o.ask(&mut rng);
                        value
                    };
                    round(value, p.low, p.high)
                };
                optimisers
                    .iter_mut()
                    .zip(&space.params)
                    .map(|(o, p)| ask(o, p))
                    .collect()
            };
            let text = space.instantiate(&values);
            let losses = match merged(&text, &self.source, seed, scoring.device, stages_dir)? {
                Some(model) => scoring
                    .domains
                    .iter()
                    .map(|(name, w)| {
                        score_windows(&model, None, name, w, scoring.batch, &mut |_| {})
                    })
                    .map(|s| {
                        if s.loss.is_finite() {
                            s.loss
                        } else {
                            f64::INFINITY
                        }
                    })
                    .collect(),
                None => vec![f64::INFINITY; scoring.domains.len()],
            };
            let mean = losses.iter().sum::<f64>() / losses.len() as f64;
            for ((o, p), v) in optimisers.iter_mut().zip(&space.params).zip(&values) {
                o.tell(*v, mean)
                    .map_err(|e| MergeError::Search(format!("the search, at {}: {e}", p.label)))?;
            }
            done.push(Trial {
                values,
                losses,
                mean,
            });
            let best = done.iter().map(|t| t.mean).fold(f64::INFINITY, f64::min);
            on_trial(index + 1, best);
        }
        // The first of equal means is the best.
        let best = (0..done.len())
            .min_by(|&a, &b| done[a].mean.total_cmp(&done[b].mean))
            .expect("at least one trial");
        if !done[best].mean.is_finite() {
            return Err(MergeError::Search(format!(
                "every trial's merge made non-finite weights or losses: narrow the tune \
                 ranges in {}",
                self.source
            )));
        }
        Ok(Tuned { trials: done, best })
    }

    /// The best trial's recipe, with a header saying which trial it was,
    /// its loss, the defaults' and how to merge it.
    pub fn best_recipe(&self, tuned: &Tuned, domains: &[&str], seed: u64) -> String {
        let (best, trials) = (tuned.best, &tuned.trials);
        let header = format!(
            "# amalgam tune: trial {best} of {} (seed {seed}), mean validation loss {:.4} on {} \
             (trial 0, each marker's default or midpoint: {:.4}).\n\
             # Merge it with `amalgam merge --seed {seed}`.\n",
            trials.len(),
            trials[best].mean,
            domains.join(", "),
            trials[0].mean,
        );
        header + &self.space.instantiate(&trials[best].values)
    }

    /// Every trial as a Markdown table, the best marked.
    pub fn table(&self, tuned: &Tuned, domains: &[&str]) -> String {
        trials_table(&self.space, domains, &tuned.trials, tuned.best)
    }
}

/// The job of one stage's recipe, which must be a per-tensor merge.
fn per_tensor_job(recipe: Recipe) -> Result<MergeJob> {
    match registry::of_recipe(&recipe)? {
        Method::PerTensor(method) => Ok(MergeJob::prepare(recipe, method)?),
        Method::WholeModel(_) => Err(whole_model(&recipe)),
    }
}

fn whole_model(recipe: &Recipe) -> MergeError {
    MergeError::Recipe(recipe.error(
        recipe.merge_method_at,
        format!(
            "`{}` runs on whole models; tune searches per-tensor methods",
            recipe.merge_method
        ),
    ))
}

/// A recipe text's stages, checked before anything is written: every
/// method known and per-tensor, the stages that read no other stage
/// prepared. Returns the input directories of those.
fn check(text: &str, source: &str) -> Result<Vec<PathBuf>> {
    let stages = Stages::parse(text, source)?;
    let mut inputs = vec![];
    for stage in stages.run_order {
        match registry::of_recipe(&stage.recipe)? {
            Method::WholeModel(_) => return Err(whole_model(&stage.recipe)),
            Method::PerTensor(method) if stage.uses.is_empty() => {
                inputs.extend(MergeJob::prepare(stage.recipe, method)?.input_dirs())
            }
            Method::PerTensor(_) => {}
        }
    }
    Ok(inputs)
}

/// The recipe merged as a model on `device`, or `None` when a merge made
/// non-finite weights. The final stage merges in memory (its tensors go
/// straight into the forward pass); the stages before it are written under
/// `stages_dir` and placed as `amalgam merge` places them, so a stage whose
/// recipe the trial leaves unchanged is reused from an earlier trial.
fn merged(
    text: &str,
    source: &str,
    seed: u64,
    device: Device,
    stages_dir: &Path,
) -> Result<Option<Decoder>> {
    let stages = Stages::parse(text, source)?;
    let placed = StageOutputs::new(&stages, stages_dir, Path::new("(in memory)"));
    placed.refuse_outputs_over_inputs(&stages)?;
    let mut last = None;
    for (i, stage) in stages.run_order.into_iter().enumerate() {
        let mut recipe = stage.recipe;
        placed.resolve_models(&mut recipe);
        let replace = match placed.placement(i, &recipe)? {
            Placement::Final => {
                last = Some(per_tensor_job(recipe)?);
                continue;
            }
            Placement::Reuse => continue,
            Placement::Write { replace } => replace,
        };
        let job = per_tensor_job(recipe)?;
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
        let options = ExecOptions {
            seed,
            device: Device::Cpu,
            threads,
            memory_budget: job.default_memory_budget(threads, crate::half_the_available_memory()),
            write: WriteOptions {
                force: replace,
                inputs: job.input_dirs(),
                ..WriteOptions::default()
            },
        };
        let out = &placed.outputs[i];
        match job.execute(out, &options, &|_| {}) {
            Err(MergeError::NonFinite { tensor, .. }) => {
                tracing::warn!(
                    "stage {}: {tensor}: non-finite values; the trial scores infinity",
                    placed.label(i)
                );
                return Ok(None);
            }
            written => written?,
        };
        StageOutput::mark(out)?;
    }
    let job = last.expect("every recipe has a final stage");
    let config = DecoderConfig::from_model_config(
        &job.output_config()?,
        Path::new("(the merged model's config.json)"),
    )?;
    let mut tensors = BTreeMap::new();
    for planned in &job.plan.tensors {
        let tensor: Tensor = job.compute(planned, seed, Device::Cpu)?;
        if tensor.isfinite().all().int64_value(&[]) == 0 {
            tracing::warn!(
                "{}: non-finite values; the trial scores infinity",
                planned.name
            );
            return Ok(None);
        }
        tensors.insert(planned.name.clone(), tensor);
    }
    let model = Decoder::from_tensors(config, &tensors, device)?;
    check_vocabulary(&model)?;
    Ok(Some(model))
}

/// The trials as a Markdown table, the best marked.
fn trials_table(space: &SearchSpace, domains: &[&str], trials: &[Trial], best: usize) -> String {
    let mut table = String::from("| trial |");
    for p in &space.params {
        write!(table, " {} |", p.label).unwrap();
    }
    for d in domains {
        write!(table, " {d} loss |").unwrap();
    }
    table.push_str(" mean loss |\n|---|");
    table.push_str(&"---|".repeat(space.params.len() + domains.len() + 1));
    table.push('\n');
    for (i, trial) in trials.iter().enumerate() {
        let mark = if i == best { " (best)" } else { "" };
        write!(table, "| {i}{mark} |").unwrap();
        for v in &trial.values {
            write!(table, " {v} |").unwrap();
        }
        for loss in trial.losses.iter().chain([&trial.mean]) {
            write!(table, " {loss:.4} |").unwrap();
        }
        table.push('\n');
    }
    table
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_up_is_the_next_float() {
        for x in [0.0, -0.0, 1.0, -1.0, 1.5, 1e-300, -1e300, f64::MIN_POSITIVE] {
            let up = next_up(x);
            assert!(up > x, "{x}");
            assert!((x..up).contains(&x) && !(x..up).contains(&up));
        }
        assert_eq!(next_up(f64::MAX), f64::INFINITY);
    }

    #[test]
    fn a_range_includes_its_high_end() {
        let space = SearchSpace::parse("w: {tune: [0, 1], default: 1}\n", "r.yml").unwrap();
        let range = search_range(&space.params[0], "r.yml").unwrap();
        let mut optimiser = tpe::TpeOptimizer::new(tpe::parzen_estimator(), range);
        optimiser.tell(1.0, 0.5).unwrap();
        optimiser.tell(0.0, 0.5).unwrap();
    }

    #[test]
    fn a_range_too_wide_is_an_error_naming_the_marker() {
        for marker in ["[-1e308, 1e308]", "[0, 1.7976931348623157e308]"] {
            let text = format!("a: 1\nw: {{tune: {marker}}}\n");
            let space = SearchSpace::parse(&text, "r.yml").unwrap();
            let error = search_range(&space.params[0], "r.yml")
                .unwrap_err()
                .to_string();
            assert!(
                error.contains("r.yml:2:") && error.contains("too wide"),
                "{error}"
            );
        }
        let mid = midpoint(1e308, 1.7e308);
        assert!(mid.is_finite() && (1e308..1.7e308).contains(&mid), "{mid}");
    }
}
