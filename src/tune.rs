//! `amalgam tune RECIPE OUT`: searches a merge recipe's `{tune: [lo, hi]}`
//! parameters for the lowest mean loss on the corpus' validation split.
//! Each trial merges in memory (the merged tensors go straight into the
//! forward pass; of a multi-stage recipe, only the stages before the last
//! are written, to a scratch directory, and reused while their recipe is
//! unchanged) and is scored on the validation split
//! only, so the evaluation split stays unseen. The search is TPE (one
//! estimator per parameter, seeded): same recipe, seed and thread count, same
//! trials.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{OutputDir, ScratchDir, WriteOptions};
use amalgam_merge::executor::{ExecOptions, MergeJob};
use amalgam_merge::registry::{self, Method};
use amalgam_merge::stages::{Placement, StageOutput, StageOutputs};
use amalgam_merge::MergeError;
use amalgam_nn::data::Split;
use amalgam_nn::eval::{check_vocabulary, score_windows, EvalOptions};
use amalgam_nn::evaluation::{corpus_domain_windows, corpus_domains};
use amalgam_nn::{Decoder, DecoderConfig};
use amalgam_recipe::{Recipe, SearchSpace, Stages, TuneParam};
use anyhow::{anyhow, bail, Context, Result};
use rand_tpe::{RngExt, SeedableRng};
use tch::{Device, Tensor};

/// Search a recipe's `{tune: [lo, hi]}` parameters against validation loss.
///
/// Writes OUT/best.yml (the recipe with the best trial's values: an
/// ordinary recipe for `amalgam merge --seed S`) and OUT/trials.md (every
/// trial's values and per-domain validation losses); prints the trials table.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    amalgam tune recipes/zoo/ties-tune.yml work/tuned --domains german,c,spanish,perl --trials 30\n  \
    amalgam merge work/tuned/best.yml work/ties-tuned --seed 0\n\n\
    A marker replaces a number anywhere in a merge recipe, on one line:\n  \
    parameters: {weight: {tune: [0, 1.5]}, density: {tune: [0.1, 1], default: 0.5}}\n\
    The first trial takes each marker's default (the middle of its range if it has none),\n\
    so the best recipe is never worse on validation than the defaults.")]
pub struct Args {
    /// The recipe with tune markers (a merge recipe of per-tensor methods;
    /// with several stages, markers may sit in any of them).
    recipe: PathBuf,
    /// Output directory for best.yml and trials.md (must not exist or be
    /// empty, unless --force).
    output: PathBuf,
    /// What a trial minimises: the mean of the domains' validation losses.
    #[arg(long, default_value = "mean-loss", value_parser = ["mean-loss"])]
    objective: String,
    /// Comma-separated domains with a validation split (the study domains:
    /// german, spanish, italian, c, perl, cpp).
    #[arg(long, value_delimiter = ',', required = true)]
    domains: Vec<String>,
    /// How many merges to try.
    #[arg(long, default_value_t = 20)]
    trials: usize,
    /// Seeds the search and the merges' random methods (DARE, DELLA).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    windows: crate::options::Windows,
    /// At most this many windows per domain.
    #[arg(long, default_value_t = 64)]
    max_windows: usize,
    #[command(flatten)]
    device: crate::options::DeviceOption,
    #[command(flatten)]
    replace: crate::options::Force,
}

/// One trial: the values tried, the loss on each domain and their mean
/// (infinite when the merge made non-finite weights).
struct Trial {
    values: Vec<f64>,
    losses: Vec<f64>,
    mean: f64,
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
        anyhow!(
            "{source}:{}: `tune: [{}, {}]` at {}: {e}: the range is too wide (its width, high \
             minus low, must be a finite number)",
            p.at,
            p.low,
            p.high,
            p.label
        )
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

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let text = crate::resources::read_recipe(&args.recipe)?;
    let source = args.recipe.display().to_string();
    let space = SearchSpace::parse(&text, &source)?;
    if space.params.is_empty() {
        bail!("{source}: no `{{tune: [low, high]}}` marker: nothing to tune");
    }
    let ranges = space
        .params
        .iter()
        .map(|p| search_range(p, &source))
        .collect::<Result<Vec<_>>>()?;
    if args.trials == 0 {
        bail!("--trials must be at least 1");
    }
    if args.windows.seq_len < 2 || args.max_windows == 0 {
        bail!("--seq-len must be at least 2 and --max-windows at least 1");
    }
    let domains = corpus_domains(&args.domains, Split::Validation)?;
    let device = args.device.resolve()?;
    let options = EvalOptions {
        seq_len: args.windows.seq_len,
        max_windows: args.max_windows,
        batch: args.windows.batch.max(1),
    };
    let windows = corpus_domain_windows(&domains, Split::Validation, &options)?;
    let first: Vec<f64> = space
        .params
        .iter()
        .map(|p| p.default.unwrap_or_else(|| midpoint(p.low, p.high)))
        .collect();
    // The recipe and its models are checked before the output is created.
    let inputs = check(&space.instantiate(&first), &source)?;
    let out = OutputDir::create(&args.output, args.replace.force, &inputs)?;
    // The stages before the final one, written as trials need them.
    let stages = ScratchDir::create(&args.output)?;

    let mut optimisers: Vec<tpe::TpeOptimizer> = ranges
        .into_iter()
        .map(|range| tpe::TpeOptimizer::new(tpe::parzen_estimator(), range))
        .collect();
    let mut rng = rand_tpe::rngs::StdRng::seed_from_u64(args.seed);
    let bar = crate::progress::steps(args.trials as u64, "tune", quiet);
    let mut trials: Vec<Trial> = vec![];
    for index in 0..args.trials {
        let values = if index == 0 {
            first.clone()
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
        let losses = match merged(
            &space.instantiate(&values),
            &source,
            args.seed,
            device,
            stages.path(),
        )? {
            Some(model) => windows
                .iter()
                .zip(&domains)
                .map(|(w, d)| score_windows(&model, None, d.name(), w, options.batch, &mut |_| {}))
                .map(|s| {
                    if s.loss.is_finite() {
                        s.loss
                    } else {
                        f64::INFINITY
                    }
                })
                .collect(),
            None => vec![f64::INFINITY; domains.len()],
        };
        let mean = losses.iter().sum::<f64>() / losses.len() as f64;
        for ((o, p), v) in optimisers.iter_mut().zip(&space.params).zip(&values) {
            o.tell(*v, mean)
                .with_context(|| format!("the search, at {}", p.label))?;
        }
        trials.push(Trial {
            values,
            losses,
            mean,
        });
        let best = trials.iter().map(|t| t.mean).fold(f64::INFINITY, f64::min);
        bar.set_position(index as u64 + 1);
        bar.set_message(format!("best {best:.4}"));
    }
    bar.finish_and_clear();

    // The first of equal means is the best.
    let best = (0..trials.len())
        .min_by(|&a, &b| trials[a].mean.total_cmp(&trials[b].mean))
        .expect("at least one trial");
    if !trials[best].mean.is_finite() {
        bail!(
            "every trial's merge made non-finite weights or losses: narrow the tune ranges \
             in {source}"
        );
    }
    let names: Vec<&str> = domains.iter().map(|d| d.name()).collect();
    let header = format!(
        "# amalgam tune: trial {best} of {} (seed {}), mean validation loss {:.4} on {} \
         (trial 0, each marker's default or midpoint: {:.4}).\n\
         # Merge it with `amalgam merge --seed {}`.\n",
        trials.len(),
        args.seed,
        trials[best].mean,
        names.join(", "),
        trials[0].mean,
        args.seed
    );
    let table = trials_table(&space, &names, &trials, best);
    std::fs::write(
        out.staging().join("best.yml"),
        header + &space.instantiate(&trials[best].values),
    )
    .context("writing best.yml")?;
    std::fs::write(out.staging().join("trials.md"), &table).context("writing trials.md")?;
    let dir = out.commit()?;
    print!("{table}");
    tracing::info!(
        "best: trial {best}, mean validation loss {:.4} (defaults {:.4}); {}",
        trials[best].mean,
        trials[0].mean,
        dir.join("best.yml").display()
    );
    Ok(())
}

/// The job of one stage's recipe, which must be a per-tensor merge.
fn per_tensor_job(recipe: Recipe) -> Result<MergeJob> {
    match registry::of_recipe(&recipe)? {
        Method::PerTensor(method) => Ok(MergeJob::prepare(recipe, method)?),
        Method::WholeModel(_) => Err(whole_model(&recipe)),
    }
}

fn whole_model(recipe: &Recipe) -> anyhow::Error {
    recipe
        .error(
            recipe.merge_method_at,
            format!(
                "`{}` runs on whole models; tune searches per-tensor methods",
                recipe.merge_method
            ),
        )
        .into()
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
        let threads = crate::resources::threads(None);
        let options = ExecOptions {
            seed,
            device: Device::Cpu,
            threads,
            memory_budget: job
                .default_memory_budget(threads, crate::resources::half_the_available_memory()),
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
