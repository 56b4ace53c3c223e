//! `amalgam convert`: re-shard a checkpoint and optionally change its float dtype.

use std::path::PathBuf;

use amalgam_checkpoint::{copy_checkpoint, Checkpoint, InputRecord, ModelCard};
use amalgam_recipe::FloatDtype;
use anyhow::{Context, Result};

/// Copy a checkpoint into new shards, optionally casting floating-point tensors.
///
/// Every header is validated before anything is written; the output appears
/// only when complete. Tensors are copied bit for bit unless --dtype changes them.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  amalgam convert work/models/base work/base-bf16 --dtype bfloat16 --out-shard-size 1GB"
)]
pub struct Args {
    /// The input checkpoint directory.
    input: PathBuf,
    /// The output directory (must not exist or be empty, unless --force).
    output: PathBuf,
    /// Cast floating-point tensors to float32, float16 or bfloat16.
    #[arg(long)]
    dtype: Option<FloatDtype>,
    #[command(flatten)]
    write: crate::options::CheckpointOutput,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let target = args.dtype.map(FloatDtype::safetensors);
    let input = Checkpoint::open(&args.input)?;
    let options = args.write.write_options(vec![args.input.clone()]);
    let bar = crate::progress::bytes(
        input
            .tensors()
            .iter()
            .map(|t| t.byte_range.end - t.byte_range.start)
            .sum(),
        "convert",
        quiet,
    );
    let card = ModelCard {
        title: format!("{} (converted)", args.input.display()),
        summary: match target {
            Some(t) => format!("Converted to {t:?} and re-sharded by `amalgam convert`."),
            None => {
                "Re-sharded by `amalgam convert`; tensors are bit-identical to the input.".into()
            }
        },
        recipe: None,
        inputs: vec![InputRecord::hash("source", &input).context("hashing the input")?],
    };
    let out = copy_checkpoint(&input, &args.output, target, &options, &card, &|bytes| {
        bar.inc(bytes)
    })?;
    bar.finish_and_clear();
    tracing::info!(
        "wrote {} ({} tensors)",
        out.display(),
        input.tensors().len()
    );
    Ok(())
}
