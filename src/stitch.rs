//! `amalgam stitch`: join two anchors into an SN-Net family.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_checkpoint::{hub, Checkpoint, Dtype, ModelCard};
use amalgam_elastic::stitch::{
    calibrate, family_routes, members, save_family, training_memory, AnchorOut, AnchorParts,
    CalibrationPlan, StitchedFamily,
};
use amalgam_nn::calibration::CalibrationText;
use amalgam_nn::text::TextTokenizer;
use amalgam_nn::{Decoder, DecoderConfig, Part};
use amalgam_recipe::StitchRecipe;
use anyhow::{anyhow, Context, Result};
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
    let located =
        |path: &str, at, e: String| anyhow!("{}:{at}: anchor `{path}`: {e}", recipe.source_name);
    // Local directories, or Hub ids found in the local Hugging Face cache.
    let dirs = recipe
        .anchors
        .iter()
        .map(|(path, at)| hub::locate(path).map_err(|e| located(path, at, e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let mut configs = vec![];
    let mut dtypes = vec![];
    for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
        let checkpoint = Checkpoint::open(dir).map_err(|e| located(path, at, e.to_string()))?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &dir.join("config.json"))
                .map_err(|e| located(path, at, e.to_string()))?;
        dtypes.push(checkpoint.weights_dtype());
        configs.push(config);
    }
    let (second, second_at) = &recipe.anchors[1];
    if configs[0].vocab_size != configs[1].vocab_size {
        return Err(located(
            second,
            second_at,
            format!(
                "a vocabulary of {} tokens, the other anchor's has {}: stitched anchors share \
                 one tokenizer",
                configs[1].vocab_size, configs[0].vocab_size
            ),
        ));
    }
    if let (Ok(a), Ok(b)) = (TextTokenizer::load(&dirs[0]), TextTokenizer::load(&dirs[1])) {
        if !a.same_vocabulary(&b) {
            return Err(located(
                second,
                second_at,
                "a different tokenizer from the other anchor's (tokens or ids differ): \
                 stitched anchors share one tokenizer"
                    .into(),
            ));
        }
    }
    // Anchors stored in BF16 compute in BF16 (so do the routes through them).
    let kinds: Vec<Kind> = dtypes
        .iter()
        .map(|d| {
            if *d == Dtype::BF16 {
                Kind::BFloat16
            } else {
                Kind::Float
            }
        })
        .collect();
    let pair = [&configs[0], &configs[1]];
    let routes = family_routes(pair.map(DecoderConfig::num_hidden_layers));
    if routes.is_empty() {
        return Err(anyhow!(
            "{}: no stitch positions: each anchor needs at least two blocks",
            recipe.source_name
        ));
    }
    let plan = CalibrationPlan::new(
        pair,
        [kinds[0], kinds[1]],
        routes,
        recipe.calibration.samples,
        recipe.calibration.seq_len,
        recipe.calibration.batch,
    );
    let training = recipe
        .train
        .as_ref()
        .map(|t| training_memory(pair, plan.stitch_parameters, t));
    let estimate = plan
        .memory
        .clone()
        .phase("route training", training.unwrap_or(0));
    args.max_memory.check(&estimate, "this stitching recipe")?;
    // Configs against the stored shapes (reading nothing but one block).
    for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
        Decoder::load_part(dir, tch::Device::Cpu, Kind::Float, Some(&Part::block(0)))
            .map_err(|e| located(path, at, e.to_string()))?;
    }
    if args.dry_run {
        print_plan(&recipe, &dirs, &configs, &dtypes, &plan, &estimate);
        return Ok(());
    }
    // Before the long work: never over, into or around an anchor.
    amalgam_checkpoint::check_output(out, args.replace.force, &dirs)?;
    let text_source = |seed: u64| {
        let longest = recipe
            .train
            .as_ref()
            .map_or(0, |t| t.seq_len)
            .max(recipe.calibration.seq_len);
        let models: Vec<&std::path::Path> = dirs.iter().map(|d| d.as_path()).collect();
        CalibrationText::open(
            &recipe.calibration.source,
            &recipe.calibration.field,
            configs[0].vocab_size,
            &models,
            longest,
            seed,
        )
        .map_err(|e| {
            anyhow!(
                "{}:{}: {e}",
                recipe.source_name,
                recipe.calibration.source_at
            )
        })
    };
    let batches = text_source(recipe.calibration.seed)?.batches(
        recipe.calibration.samples,
        recipe.calibration.batch,
        recipe.calibration.seq_len,
    );
    let sources: Vec<Box<AnchorParts<'_>>> = dirs
        .iter()
        .zip(&kinds)
        .map(|(dir, &kind)| -> Box<AnchorParts<'_>> {
            Box::new(move |part: &Part| Ok(Decoder::load_part(dir, device, kind, Some(part))?))
        })
        .collect();
    let bar = crate::progress::steps(plan.blocks() as u64, "calibrating stitches", quiet);
    let stitches = calibrate(
        &plan,
        [sources[0].as_ref(), sources[1].as_ref()],
        &batches,
        recipe.ridge,
        &mut || bar.inc(1),
    )?;
    bar.finish_and_clear();
    let members = members(pair, &plan.routes, stitches);
    let card = ModelCard {
        title: "An anchor of a stitched family".into(),
        summary: format!(
            "Saved by `amalgam stitch` as an anchor of the family in this directory's parent \
             ({} networks; see family.json).",
            members.len()
        ),
        recipe: Some(recipe.text.clone()),
        inputs: vec![],
    };
    let (count, members) = match &recipe.train {
        None => {
            let anchors = dirs
                .iter()
                .map(|d| AnchorOut::Checkpoint(d))
                .collect::<Vec<_>>();
            save_family(out, args.replace.force, &anchors, &members, &card)?;
            (members.len(), members)
        }
        Some(train) => {
            let anchors = recipe
                .anchors
                .iter()
                .zip(&dirs)
                .map(|((path, at), dir)| {
                    Decoder::load(dir, device).map_err(|e| located(path, at, e.to_string()))
                })
                .collect::<Result<Vec<_>>>()?;
            let mut family = StitchedFamily {
                anchors,
                members,
                dirs: dirs.clone(),
            };
            let bar = crate::progress::steps(train.steps as u64, "training routes", quiet);
            let losses =
                family.train(train, &mut text_source(train.seed)?, &mut |step, loss| {
                    bar.set_position(step as u64 + 1);
                    if step % 10 == 0 {
                        bar.set_message(format!("loss {loss:.3}"));
                    }
                })?;
            bar.finish_and_clear();
            let tail = &losses[losses.len().saturating_sub(20)..];
            tracing::info!(
                "trained the routes for {} steps; final loss {:.3}",
                train.steps,
                tail.iter().sum::<f64>() / tail.len().max(1) as f64
            );
            // Frozen anchors are copied from their checkpoints, bit for bit.
            let anchors = family
                .anchors
                .iter()
                .zip(&dirs)
                .map(|(model, dir)| match train.anchor_lr_scale > 0.0 {
                    true => AnchorOut::Model {
                        model,
                        files_from: dir,
                    },
                    false => AnchorOut::Checkpoint(dir),
                })
                .collect::<Vec<_>>();
            save_family(out, args.replace.force, &anchors, &family.members, &card)?;
            (family.members.len(), family.members)
        }
    };
    if !quiet {
        println!(
            "stitched {count} networks into {} in {:.1} s",
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
fn print_plan(
    recipe: &StitchRecipe,
    dirs: &[PathBuf],
    configs: &[DecoderConfig],
    dtypes: &[Dtype],
    plan: &CalibrationPlan,
    memory: &MemoryEstimate,
) {
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
