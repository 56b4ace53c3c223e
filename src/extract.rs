//! `amalgam extract`: write a nested submodel of a MatFormer-style model.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_checkpoint::{hub, Checkpoint, InputRecord, ModelCard};
use amalgam_elastic::matformer::{resolve, Extraction, ModelLayout};
use amalgam_recipe::{ExtractRecipe, Location, WidthChoice};
use anyhow::{anyhow, Result};

/// Extract a nested submodel of a MatFormer-style model.
///
/// Per-layer FFN widths (the first m hidden units) and skipped layers, from
/// an extraction recipe (`kind: extract`, see the book's MatFormer guide),
/// optionally with the widths of a row of a slicing table in Google's
/// format; `amalgam extract table` slices a checkpoint by such a row alone.
#[derive(clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  \
    amalgam extract recipes/extract/matformer-m.yml work/matformer-m\n  \
    amalgam extract recipes/extract/budget.yml work/sub --dry-run\n  \
    amalgam extract table gemma-3n-E4B work/gemma-e2.49b --config-csv configs.csv \\\n      \
    --slice 'Config for E2.49B (block-level)'"
)]
pub struct Args {
    #[command(subcommand)]
    command: Option<ExtractCommand>,
    /// The recipe (YAML) then the output directory.
    #[arg(required = true, num_args = 1..=2, value_names = ["RECIPE", "OUT"])]
    paths: Vec<PathBuf>,
    /// Old spelling of `amalgam extract table MODEL OUT`: slice this
    /// checkpoint by a slicing-table row instead of a recipe (give only OUT).
    #[arg(long, requires_all = ["config_csv", "slice"], hide = true)]
    model: Option<PathBuf>,
    #[command(flatten)]
    table: SlicingTable,
    #[command(flatten)]
    write: Write,
}

#[derive(clap::Subcommand)]
enum ExtractCommand {
    Table(Table),
}

/// Slice a checkpoint by a row of a slicing table (Google's configs.csv
/// format), without a recipe.
#[derive(clap::Args)]
#[command(
    mut_arg("config_csv", |a| a.required(true)),
    mut_arg("slice", |a| a.required(true)),
    after_help = "Example:\n  \
    amalgam extract table gemma-3n-E4B work/gemma-e2.49b --config-csv configs.csv \\\n      \
    --slice 'Config for E2.49B (block-level)'"
)]
struct Table {
    /// The checkpoint to slice (a directory, or a Hub id in the local cache).
    model: PathBuf,
    /// The output directory (must not exist or be empty, unless --force).
    output: PathBuf,
    #[command(flatten)]
    table: SlicingTable,
    #[command(flatten)]
    write: Write,
}

/// A row of a slicing table: the widths and skipped layers it chooses.
#[derive(clap::Args)]
struct SlicingTable {
    /// A slicing table (Google's configs.csv format): its row --slice
    /// chooses the widths and skipped layers.
    #[arg(long, requires = "slice", value_name = "FILE")]
    config_csv: Option<PathBuf>,
    /// The table row's name.
    #[arg(long, requires = "config_csv", value_name = "NAME")]
    slice: Option<String>,
}

impl SlicingTable {
    fn widths(&self) -> Option<WidthChoice> {
        match (&self.config_csv, &self.slice) {
            (Some(csv), Some(slice)) => Some(WidthChoice::SlicingTable {
                csv: csv.display().to_string(),
                slice: slice.clone(),
                at: Location::default(),
            }),
            _ => None,
        }
    }

    /// A recipe that takes `model` as the row says.
    fn recipe(&self, model: &Path) -> ExtractRecipe {
        ExtractRecipe {
            source_name: "(command line)".into(),
            text: format!(
                "amalgam extract table {} --config-csv {} --slice {:?}\n",
                model.display(),
                self.config_csv
                    .as_ref()
                    .map_or(String::new(), |c| c.display().to_string()),
                self.slice.as_deref().unwrap_or_default()
            ),
            model: model.display().to_string(),
            model_at: Location::default(),
            widths: self
                .widths()
                .expect("clap requires --config-csv and --slice with a model"),
            skip_layers: vec![],
        }
    }
}

/// How the submodel is written, or only described.
#[derive(clap::Args)]
struct Write {
    /// Print the submodel's layers, widths and size; write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    output: crate::options::CheckpointOutput,
    #[command(flatten)]
    max_memory: crate::options::MaxMemory,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let (recipe, output, write) = match (args.command, &args.model, args.paths.as_slice()) {
        (Some(ExtractCommand::Table(t)), _, _) => (t.table.recipe(&t.model), t.output, t.write),
        (None, Some(model), [output]) => (args.table.recipe(model), output.clone(), args.write),
        (None, Some(_), _) => return Err(anyhow!("with --model, give only the output directory")),
        (None, None, [recipe, output]) => {
            let text = crate::resources::read_recipe(recipe)?;
            let mut parsed = ExtractRecipe::parse(&text, &recipe.display().to_string())?;
            if let Some(table) = args.table.widths() {
                if !matches!(parsed.widths, WidthChoice::Full) || !parsed.skip_layers.is_empty() {
                    return Err(anyhow!(
                        "{}: the recipe chooses widths or skipped layers; --config-csv/--slice \
                         would override them (drop one or the other)",
                        recipe.display()
                    ));
                }
                parsed.widths = table;
            }
            (parsed, output.clone(), args.write)
        }
        (None, None, _) => return Err(anyhow!("give the recipe and the output directory")),
    };
    extract(&recipe, &output, &write, quiet)
}

/// Extracts the submodel `recipe` describes into `output`.
fn extract(recipe: &ExtractRecipe, output: &Path, write: &Write, quiet: bool) -> Result<()> {
    let started = Instant::now();
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
    let spec = resolve(recipe, &checkpoint, &layout)?;
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
    let memory = extraction.memory();
    write.max_memory.check(&memory, "this extraction")?;
    if write.dry_run {
        println!(
            "{describe}; {:.1} MB to write; {memory}",
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
    let options = write
        .output
        .write_options(vec![checkpoint.dir().to_path_buf()]);
    let bar = crate::progress::bytes(extraction.bytes(), "extract", quiet);
    let out = extraction.write(output, &options, &card, &mut |n| bar.inc(n))?;
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
