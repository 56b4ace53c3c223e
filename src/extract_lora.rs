//! `amalgam extract-lora`: a PEFT LoRA adapter from a base and a fine-tune.

use std::path::PathBuf;

use amalgam_checkpoint::{hub, Checkpoint, OutputDir};
use amalgam_merge::lora::extract::{extract, ExtractOptions, ModuleReport};
use amalgam_merge::lora::{CONFIG, WEIGHTS};
use anyhow::{anyhow, bail, Context, Result};

/// Extract a LoRA adapter (low-rank SVD of each task vector) that peft loads.
///
/// Each 2-D weight's change from BASE to FINETUNE is factored at rank at
/// most --rank; embeddings, the head and norms are saved whole unless
/// --embed-lora. The relative reconstruction error of every factored module
/// is printed. mergekit-extract-lora's options and adapter layout.
#[derive(clap::Args)]
#[command(after_help = "Example:\n  \
    amalgam extract-lora work/models/base work/models/finetune-1 work/lora --rank 16\n\
    Apply it in any recipe as `model: work/models/base+work/lora`.")]
pub struct Args {
    /// The base model (a directory, or a Hub id in the local cache).
    base: String,
    /// The fine-tuned model.
    finetune: String,
    /// The adapter's directory (must not exist or be empty, unless --force).
    output: PathBuf,
    /// The largest rank of a factored module.
    #[arg(long, default_value_t = 128)]
    rank: usize,
    /// Factor the input embedding and the head too, instead of saving them whole.
    #[arg(long)]
    embed_lora: bool,
    /// Save these modules (by last name, e.g. lm_head) whole.
    #[arg(long = "save-module", value_name = "NAME")]
    save_modules: Vec<String>,
    /// Drop singular values at or below this.
    #[arg(long, default_value_t = 0.0)]
    sv_epsilon: f64,
    /// Seed of the randomized SVD used for large matrices.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    #[command(flatten)]
    replace: crate::options::Force,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    if args.rank == 0 {
        bail!("--rank must be at least 1");
    }
    if !(args.sv_epsilon >= 0.0 && args.sv_epsilon.is_finite()) {
        bail!("--sv-epsilon must be a finite number ≥ 0");
    }
    let open = |id: &str| -> Result<Checkpoint> {
        let dir = hub::locate(id)?;
        Checkpoint::open(&dir).with_context(|| format!("model `{id}`"))
    };
    let (base, finetune) = (open(&args.base)?, open(&args.finetune)?);
    let output = OutputDir::create(
        &args.output,
        args.replace.force,
        &[base.dir().to_path_buf(), finetune.dir().to_path_buf()],
    )?;
    let options = ExtractOptions {
        rank: args.rank,
        embed_lora: args.embed_lora,
        sv_epsilon: args.sv_epsilon,
        modules_to_save: args.save_modules.clone(),
        seed: args.seed,
    };
    let bar = crate::progress::steps(finetune.tensors().len() as u64, "extract-lora", quiet);
    let extracted = extract(&base, &finetune, &options, &args.base, &|_| bar.inc(1))?;
    bar.finish_and_clear();
    for (name, tensor) in &extracted.tensors {
        let finite = tensor.isfinite().all().int64_value(&[]) != 0;
        if !finite {
            bail!("tensor {name} of the adapter holds NaN or infinite values; nothing written");
        }
    }
    let weights = output.staging().join(WEIGHTS);
    tch::Tensor::write_safetensors(&extracted.tensors, &weights)
        .map_err(|e| anyhow!("writing {}: {e}", weights.display()))?;
    let config = serde_json::to_string_pretty(&extracted.config)? + "\n";
    std::fs::write(output.staging().join(CONFIG), config)?;
    std::fs::write(
        output.staging().join("README.md"),
        card(&args, &extracted.modules),
    )?;
    let out = output.commit()?;
    if !quiet {
        print!("{}", table(&extracted.modules));
        println!(
            "wrote a rank-{} adapter with {} tensors to {}",
            extracted.config["r"],
            extracted.tensors.len(),
            out.display()
        );
    }
    Ok(())
}

/// One line per module: rank (or `whole`) and relative reconstruction error.
fn table(modules: &[ModuleReport]) -> String {
    let mut out = format!("{:<56} {:>6} {:>12}\n", "module", "rank", "rel. error");
    for m in modules {
        let (rank, error) = match (m.rank, m.relative_error) {
            (Some(r), Some(e)) => (
                format!("{r}{}", if m.randomized { "~" } else { "" }),
                format!("{e:.3e}"),
            ),
            _ => ("whole".to_owned(), "0".to_owned()),
        };
        out += &format!("{:<56} {rank:>6} {error:>12}\n", m.module);
    }
    out
}

fn card(args: &Args, modules: &[ModuleReport]) -> String {
    format!(
        "# LoRA adapter extracted by amalgam\n\nBase: `{}`. Fine-tune: `{}`. Largest rank {} \
         (`amalgam extract-lora`{}). Apply it with peft, or in a recipe as `model: BASE+ADAPTER`.\n\n\
         Relative reconstruction error of each module (`~`: randomized SVD):\n\n```\n{}```\n",
        args.base,
        args.finetune,
        args.rank,
        if args.embed_lora { " --embed-lora" } else { "" },
        table(modules)
    )
}
