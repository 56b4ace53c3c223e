//! `amalgam stitch`: join two anchors into an SN-Net family.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_checkpoint::ModelCard;
use amalgam_elastic::stitch::{StitchJob, StitchProgress, StitchedFamily};
use amalgam_recipe::StitchRecipe;
use anyhow::{Context, Result};
use tch::Kind;

/// Stitch two anchors into a family of networks (SN-Net).
///
/// Two anchors (any supported families, one shared tokenizer, any widths and
/// depths) make a family of networks: each anchor, and every SN-Net route
/// from one anchor's first blocks into the other's later blocks through a
/// linear stitching layer fitted by least squares on calibration text —
/// streamed, one block in memory — then optionally trained (`train:` in the
/// recipe, one route sampled per step). Evaluate it with `amalgam eval
/// FAMILY` (all routes, or `--route NAME`); `amalgam stitch export` writes
/// one route as a family of its own.
#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
    amalgam stitch recipes/stitch/zoo.yml work/family\n  \
    amalgam stitch recipes/stitch/zoo.yml work/family --dry-run\n  \
    amalgam eval work/family --by-model\n  \
    amalgam stitch export 1:3-0:1 work/family work/route"
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<StitchCommand>,
    /// The recipe (YAML, `kind: stitch`).
    #[arg(required = true)]
    recipe: Option<PathBuf>,
    /// The family's directory (must not exist or be empty, unless --force).
    #[arg(required = true)]
    output: Option<PathBuf>,
    /// Old spelling of `amalgam stitch export ROUTE FAMILY OUT`.
    #[arg(long, value_name = "ROUTE", hide = true)]
    export: Option<String>,
    #[command(flatten)]
    replace: crate::options::Force,
    /// Print the plan (anchors, routes, calibration, which streams are kept)
    /// and its peak memory, and stop.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    device: crate::options::DeviceOption,
    #[command(flatten)]
    max_memory: crate::options::MaxMemory,
}

#[derive(clap::Subcommand)]
enum StitchCommand {
    Export(Export),
}

/// Write one route of a stitched family as a family of its own, holding
/// only the blocks it runs.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  amalgam stitch export 1:3-0:1 work/family work/route")]
struct Export {
    /// The route, as the family names it (`amalgam eval FAMILY` lists them).
    route: String,
    /// The stitched family.
    family: PathBuf,
    /// The output directory (must not exist or be empty, unless --force).
    output: PathBuf,
    #[command(flatten)]
    replace: crate::options::Force,
    #[command(flatten)]
    device: crate::options::DeviceOption,
}

pub fn run(mut args: Args, quiet: bool) -> Result<()> {
    let (recipe, output) = match (args.command.take(), args.recipe.take(), args.output.take()) {
        (Some(StitchCommand::Export(export)), _, _) => return run_export(export, quiet),
        (None, Some(recipe), Some(output)) => (recipe, output),
        _ => unreachable!("clap requires RECIPE and OUTPUT without a subcommand"),
    };
    if let Some(route) = args.export.take() {
        let export = Export {
            route,
            family: recipe,
            output,
            replace: args.replace.clone(),
            device: args.device,
        };
        return run_export(export, quiet);
    }
    run_stitch(&args, &recipe, &output, quiet)
}

/// `amalgam stitch export` (and the old `--export`).
fn run_export(args: Export, quiet: bool) -> Result<()> {
    let route = &args.route;
    let family = StitchedFamily::load(&args.family, args.device.resolve()?, Kind::Float)?;
    let exported = family
        .export(route)
        .with_context(|| args.family.display().to_string())?;
    let card = ModelCard {
        title: format!("Part of the stitched route {route}"),
        summary: format!(
            "Exported by `amalgam stitch export` from {}: the blocks route {route} runs.",
            args.family.display()
        ),
        ..Default::default()
    };
    exported.save(&args.output, args.replace.force, &card)?;
    if !quiet {
        println!("exported route {route} into {}", args.output.display());
    }
    Ok(())
}

/// A family built from the recipe at `recipe_path` into `out`.
fn run_stitch(args: &Args, recipe_path: &Path, out: &Path, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let text = crate::resources::read_recipe(recipe_path)?;
    let recipe = StitchRecipe::parse(&text, &recipe_path.display().to_string())?;
    let device = args.device.resolve()?;
    let job = StitchJob::prepare(recipe, args.max_memory.limit().as_ref())?;
    if args.dry_run {
        print_plan(&job);
        return Ok(());
    }
    let mut bar = None;
    let members = job.run(out, args.replace.force, device, &mut |event| match event {
        StitchProgress::Calibrating { blocks } => {
            bar = Some(crate::progress::steps(
                blocks as u64,
                "calibrating stitches",
                quiet,
            ))
        }
        StitchProgress::Training { steps } => {
            bar = Some(crate::progress::steps(
                steps as u64,
                "training routes",
                quiet,
            ))
        }
        StitchProgress::Block => bar.iter().for_each(|b| b.inc(1)),
        StitchProgress::Step { step, loss } => {
            if let Some(bar) = &bar {
                bar.set_position(step as u64 + 1);
                if step % 10 == 0 {
                    bar.set_message(format!("loss {loss:.3}"));
                }
            }
        }
        StitchProgress::Done => bar.take().iter().for_each(|b| b.finish_and_clear()),
    })?;
    if !quiet {
        println!(
            "stitched {} networks into {} in {:.1} s",
            members.len(),
            out.display(),
            started.elapsed().as_secs_f64()
        );
        for m in &members {
            println!(
                "{}\t{} parameters\t{} FLOPs/token",
                m.name, m.parameters, m.flops_per_token
            );
        }
    }
    Ok(())
}

/// What `--dry-run` prints: the anchors, the routes, the calibration and
/// the peak memory by phase.
fn print_plan(job: &StitchJob) {
    let StitchJob {
        recipe,
        dirs,
        configs,
        dtypes,
        plan,
        memory,
    } = job;
    let gb = |bytes: u64| bytes as f64 / 1e9;
    for (a, ((dir, config), dtype)) in dirs.iter().zip(configs).zip(dtypes).enumerate() {
        println!(
            "anchor-{a}: {} ({}, {} blocks, hidden {}, {dtype:?})",
            dir.display(),
            config.architecture.model_type,
            config.num_hidden_layers(),
            config.hidden_size
        );
    }
    let ways = |front: usize| plan.routes.iter().filter(|r| r.front == front).count();
    println!(
        "routes: {} ({} from anchor-0 into anchor-1, {} from anchor-1 into anchor-0)",
        plan.routes.len(),
        ways(0),
        ways(1)
    );
    println!(
        "calibration: {} × {} tokens from `{}`, {} per forward pass; ridge {} (relative to \
         the mean diagonal of XᵀX)",
        recipe.calibration.samples,
        recipe.calibration.seq_len,
        recipe.calibration.source,
        recipe.calibration.batch,
        recipe.ridge
    );
    println!(
        "streams kept: anchor-{}'s at {} block boundaries ({:.2} GB); anchor-{} walked block \
         by block",
        plan.kept,
        plan.kept_boundaries.len(),
        gb(plan.kept_stream_bytes),
        1 - plan.kept
    );
    if let Some(t) = &recipe.train {
        println!("training: {} steps with both anchors whole in F32", t.steps);
    }
    println!("{memory}");
}
