//! `amalgam tune RECIPE OUT`: searches a merge recipe's `{tune: [lo, hi]}`
//! parameters ([`amalgam_merge::tune`]) for the lowest mean loss on the
//! corpus' validation split only, so the evaluation split stays unseen.

use std::path::PathBuf;

use amalgam_checkpoint::{OutputDir, ScratchDir};
use amalgam_merge::tune::{Scoring, Search};
use amalgam_nn::data::Split;
use amalgam_nn::eval::EvalOptions;
use amalgam_nn::evaluation::{corpus_domain_windows, corpus_domains};
use anyhow::{bail, Context, Result};

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

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let text = crate::resources::read_recipe(&args.recipe)?;
    let search = Search::new(&text, &args.recipe.display().to_string())?;
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
    let names: Vec<&str> = domains.iter().map(|d| d.name()).collect();
    let scored: Vec<(String, _)> = names.iter().map(|n| n.to_string()).zip(windows).collect();
    // The recipe and its models were checked before the output is created.
    let out = OutputDir::create(&args.output, args.replace.force, &search.inputs)?;
    // The stages before the final one, written as trials need them.
    let stages = ScratchDir::create(&args.output)?;
    let bar = crate::progress::steps(args.trials as u64, "tune", quiet);
    let scoring = Scoring {
        domains: &scored,
        batch: options.batch,
        device,
    };
    let tuned = search.run(
        args.trials,
        args.seed,
        &scoring,
        stages.path(),
        &mut |done, best| {
            bar.set_position(done as u64);
            bar.set_message(format!("best {best:.4}"));
        },
    )?;
    bar.finish_and_clear();
    let table = search.table(&tuned, &names);
    std::fs::write(
        out.staging().join("best.yml"),
        search.best_recipe(&tuned, &names, args.seed),
    )
    .context("writing best.yml")?;
    std::fs::write(out.staging().join("trials.md"), &table).context("writing trials.md")?;
    let dir = out.commit()?;
    print!("{table}");
    let (best, trials) = (tuned.best, &tuned.trials);
    tracing::info!(
        "best: trial {best}, mean validation loss {:.4} (defaults {:.4}); {}",
        trials[best].mean,
        trials[0].mean,
        dir.join("best.yml").display()
    );
    Ok(())
}
