//! `amalgam stitch`: join two anchors into an SN-Net family.

use std::path::PathBuf;
use std::time::Instant;

use amalgam_checkpoint::{hub, Checkpoint, ModelCard};
use amalgam_elastic::stitch::Family;
use amalgam_nn::data::{Domain, Sampler, Split};
use amalgam_nn::{Decoder, DecoderConfig};
use amalgam_recipe::StitchRecipe;
use anyhow::{anyhow, Context, Result};

/// Stitch two anchors (same tokenizer, any widths and depths) into a family
/// of networks: each anchor, and every SN-Net route from one anchor's first
/// blocks into the other's later blocks through a linear stitching layer
/// fitted by least squares on calibration text, then optionally trained
/// (`train:` in the recipe, one route sampled per step). Evaluate it with
/// `amalgam eval FAMILY` (all routes, or `--route NAME`).
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    amalgam stitch recipes/stitch/zoo.yml work/family\n  \
    amalgam eval work/family --by-model\n  \
    amalgam stitch --export 1:3-0:1 work/family work/route")]
pub struct Args {
    /// The recipe (YAML, `kind: stitch`); with --export, the family.
    recipe: PathBuf,
    /// The family's directory (must not exist or be empty, unless --force).
    output: PathBuf,
    /// Write this route of the family (the first argument) as a family of
    /// its own holding only the blocks it runs.
    #[arg(long, value_name = "ROUTE")]
    export: Option<String>,
    /// Replace a non-empty output directory.
    #[arg(long)]
    force: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Refuse a recipe whose anchors, calibration and training are estimated
    /// to need more than this, e.g. 8GB (default: the memory available).
    #[arg(long)]
    max_memory: Option<String>,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let started = Instant::now();
    if let Some(route) = &args.export {
        let device = crate::device::parse(&args.device)?;
        let family = Family::load(&args.recipe, device)?;
        let exported = family
            .export(route)
            .with_context(|| args.recipe.display().to_string())?;
        let card = ModelCard {
            title: format!("Part of the stitched route {route}"),
            summary: format!(
                "Exported by `amalgam stitch --export` from {}: the blocks route {route} runs.",
                args.recipe.display()
            ),
            ..Default::default()
        };
        exported.save(&args.output, args.force, &card)?;
        if !quiet {
            println!("exported route {route} into {}", args.output.display());
        }
        return Ok(());
    }
    let text = crate::resources::read_recipe(&args.recipe)?;
    let recipe = StitchRecipe::parse(&text, &args.recipe.display().to_string())?;
    let device = crate::device::parse(&args.device)?;
    let located =
        |path: &str, at, e: String| anyhow!("{}:{at}: anchor `{path}`: {e}", recipe.source_name);
    // Local directories, or Hub ids found in the local Hugging Face cache.
    let dirs = recipe
        .anchors
        .iter()
        .map(|(path, at)| hub::locate(path).map_err(|e| located(path, at, e.to_string())))
        .collect::<Result<Vec<_>>>()?;
    let mut estimate = (recipe.samples as u64).saturating_mul(recipe.seq_len as u64 * 8);
    for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
        let checkpoint = Checkpoint::open(dir).map_err(|e| located(path, at, e.to_string()))?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &dir.join("config.json"))
                .map_err(|e| e.to_string())
                .and_then(|config| {
                    config.architecture.require_plain_llama("Stitching")?;
                    Ok(config)
                })
                .map_err(|e| located(path, at, e))?;
        // Calibration runs every sample at once; training keeps a batch's
        // activations for every block, and Adam two moments per weight.
        let training = recipe.train.as_ref().map_or(0, |t| {
            (config.num_hidden_layers() as u64)
                .saturating_mul(config.forward_bytes(t.batch, t.seq_len))
                .saturating_add(3 * config.weight_bytes())
        });
        estimate = estimate
            .saturating_add(config.weight_bytes())
            .saturating_add(config.forward_bytes(recipe.samples, recipe.seq_len))
            .saturating_add(config.taps_bytes(recipe.samples, recipe.seq_len))
            .saturating_add(training);
    }
    crate::resources::check_memory(
        estimate,
        args.max_memory.as_deref(),
        "--max-memory",
        "this stitching recipe",
    )?;
    let anchors = recipe
        .anchors
        .iter()
        .zip(&dirs)
        .map(|((path, at), dir)| {
            Decoder::load(dir, device).map_err(|e| located(path, at, e.to_string()))
        })
        .collect::<Result<Vec<_>>>()?;
    let output = std::path::absolute(&args.output)?;
    for ((path, at), dir) in recipe.anchors.iter().zip(&dirs) {
        if std::path::absolute(dir)?.starts_with(&output) {
            return Err(anyhow!(
                "{}:{at}: refusing to write the family over its anchor `{path}`",
                recipe.source_name
            ));
        }
    }
    let ids = Sampler::new(&Domain::ALL, Split::Train, recipe.seed).batch(
        recipe.samples,
        recipe.seq_len,
        device,
    );
    let mut family = Family::fit(anchors, &ids, recipe.ridge)?;
    if let Some(train) = &recipe.train {
        let bar = crate::progress::steps(train.steps as u64, "training routes", quiet);
        let losses = family.train(train, &mut |step, loss| {
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
    }
    let card = ModelCard {
        title: "An anchor of a stitched family".into(),
        summary: format!(
            "Saved by `amalgam stitch` as an anchor of the family in this directory's parent \
             ({} networks; see family.json).",
            family.members.len()
        ),
        recipe: Some(recipe.text.clone()),
        inputs: vec![],
    };
    family.save(&args.output, args.force, &card)?;
    if !quiet {
        println!(
            "stitched {} networks into {} in {:.1} s",
            family.members.len(),
            args.output.display(),
            started.elapsed().as_secs_f64()
        );
        for m in &family.members {
            println!(
                "{}\t{} parameters\t{} FLOPs/token",
                m.name, m.parameters, m.flops_per_token
            );
        }
    }
    Ok(())
}
