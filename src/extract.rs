//! `amalgam extract`: write a nested submodel of a MatFormer-style model.

use std::path::PathBuf;
use std::time::Instant;

use amalgam_checkpoint::{hub, parse_byte_size, Checkpoint, InputRecord, ModelCard, WriteOptions};
use amalgam_elastic::matformer::{resolve, Extraction, ModelLayout};
use amalgam_recipe::{ExtractRecipe, Location, WidthChoice};
use anyhow::{anyhow, Result};

/// Extract a nested submodel: per-layer FFN widths (the first m hidden units)
/// and skipped layers, from an extraction recipe (`kind: extract`, see the
/// book's MatFormer guide) or from a row of a slicing table in Google's format.
#[derive(clap::Args)]
#[command(after_help = "Examples:\n  \
    amalgam extract recipes/extract/matformer-m.yml work/matformer-m\n  \
    amalgam extract recipes/extract/budget.yml work/sub --dry-run\n  \
    amalgam extract --model gemma-3n-E4B --config-csv configs.csv \\\n      \
    --slice 'Config for E2.49B (block-level)' work/gemma-e2.49b")]
pub struct Args {
    /// The recipe (YAML) then the output directory; only the output with --model.
    #[arg(required = true, num_args = 1..=2, value_names = ["RECIPE", "OUT"])]
    paths: Vec<PathBuf>,
    /// Slice this checkpoint by a slicing-table row instead of a recipe.
    #[arg(long, requires_all = ["config_csv", "slice"])]
    model: Option<PathBuf>,
    /// A slicing table (Google's configs.csv format).
    #[arg(long, requires = "slice")]
    config_csv: Option<PathBuf>,
    /// The table row's name.
    #[arg(long, requires = "config_csv")]
    slice: Option<String>,
    /// Print the submodel's layers, widths and size; write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Shard size limit, e.g. 1GB, 500MB.
    #[arg(long, default_value = "5GB")]
    out_shard_size: String,
    /// Replace a non-empty output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let started = Instant::now();
    // --config-csv/--slice choose the widths and skipped layers, for a recipe or --model.
    let table = match (&args.config_csv, &args.slice) {
        (Some(csv), Some(slice)) => Some(WidthChoice::SlicingTable {
            csv: csv.display().to_string(),
            slice: slice.clone(),
            at: Location::default(),
        }),
        _ => None,
    };
    let (recipe, output) = match (&args.model, args.paths.as_slice()) {
        (Some(model), [output]) => {
            let recipe = ExtractRecipe {
                source_name: "(command line)".into(),
                text: format!(
                    "amalgam extract --model {} --config-csv {} --slice {:?}\n",
                    model.display(),
                    args.config_csv
                        .as_ref()
                        .map_or(String::new(), |c| c.display().to_string()),
                    args.slice.as_deref().unwrap_or_default()
                ),
                model: model.display().to_string(),
                model_at: Location::default(),
                widths: table.expect("clap requires --config-csv and --slice with --model"),
                skip_layers: vec![],
            };
            (recipe, output.clone())
        }
        (Some(_), _) => return Err(anyhow!("with --model, give only the output directory")),
        (None, [recipe, output]) => {
            let text = crate::resources::read_recipe(recipe)?;
            let mut parsed = ExtractRecipe::parse(&text, &recipe.display().to_string())?;
            if let Some(table) = table {
                if !matches!(parsed.widths, WidthChoice::Full) || !parsed.skip_layers.is_empty() {
                    return Err(anyhow!(
                        "{}: the recipe chooses widths or skipped layers; --config-csv/--slice \
                         would override them (drop one or the other)",
                        recipe.display()
                    ));
                }
                parsed.widths = table;
            }
            (parsed, output.clone())
        }
        (None, _) => return Err(anyhow!("give the recipe and the output directory")),
    };
    let checkpoint = hub::locate(&recipe.model)
        .and_then(Checkpoint::open)
        .map_err(|e| {
            anyhow!(
                "{}:{}: model `{}`: {e}",
                recipe.source_name,
                recipe.model_at,
                recipe.model
            )
        })?;
    let layout = ModelLayout::read(&checkpoint)?;
    let spec = resolve(&recipe, &checkpoint, &layout)?;
    let extraction = Extraction::plan(&checkpoint, &layout, spec)?;
    let (parameters, input_parameters) = (extraction.parameters(), checkpoint.parameter_count());
    let describe = format!(
        "{} of {} layers kept (skipped: {:?}); FFN widths {:?}; {} parameters ({:.1}% of {})",
        extraction.spec.kept.len(),
        layout.layers(),
        (0..layout.layers())
            .filter(|l| !extraction.spec.kept.contains(l))
            .collect::<Vec<_>>(),
        extraction.spec.widths,
        parameters,
        100.0 * parameters as f64 / input_parameters as f64,
        input_parameters
    );
    if args.dry_run {
        println!(
            "{describe}; {:.1} MB to write",
            extraction.bytes() as f64 / 1e6
        );
        return Ok(());
    }
    let card = ModelCard {
        title: format!(
            "Nested submodel of {}",
            checkpoint
                .dir()
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
        ),
        summary: format!("Extracted by `amalgam extract` (MatFormer slicing): {describe}."),
        recipe: Some(recipe.text.clone()),
        inputs: vec![InputRecord::hash("source", &checkpoint)?],
    };
    let options = WriteOptions {
        max_shard_bytes: parse_byte_size(&args.out_shard_size)?,
        force: args.force,
        inputs: vec![checkpoint.dir().to_path_buf()],
        allow_nonfinite: false,
    };
    let bar = crate::progress::bytes(extraction.bytes(), "extract", quiet);
    let out = extraction.write(&output, &options, &card, &mut |n| bar.inc(n))?;
    bar.finish_and_clear();
    if !quiet {
        println!(
            "extracted into {} in {:.1} s: {describe}",
            out.display(),
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
