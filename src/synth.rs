//! `amalgam synth`: generate a synthetic Llama-family base and fine-tunes.

use std::path::PathBuf;

use amalgam_checkpoint::synthetic::{generate_family, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{parse_byte_size, parse_dtype, WriteOptions};
use anyhow::{anyhow, Result};

/// Generate a synthetic Llama-family checkpoint family (for tests and benchmarks).
///
/// Writes OUT/base and OUT/finetune-1 … OUT/finetune-K: Hugging Face checkpoints
/// with exact tensor names and a config.json that transformers loads. The
/// fine-tunes' deltas share a common part, have task-specific parts, and
/// conflict in sign between odd and even fine-tunes on 10% of entries.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  amalgam synth work/tinyllama --shape tinyllama --finetunes 2 --dtype bf16 --out-shard-size 1GB"
)]
pub struct Args {
    /// Directory to create the family in.
    out: PathBuf,
    /// `tiny` (hidden 64, 4 layers), `tinyllama` (TinyLlama-1.1B) or
    /// `mistral-7b` (Mistral-7B's shape, 14.5 GB per model in BF16).
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Number of fine-tunes besides the base.
    #[arg(long, default_value_t = 2)]
    finetunes: usize,
    /// float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    dtype: String,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override the shape's number of layers.
    #[arg(long)]
    layers: Option<usize>,
    /// Override the shape's FFN width.
    #[arg(long)]
    intermediate: Option<usize>,
    /// Override the shape's width (a multiple of its head size; the query
    /// and key/value head counts scale with it).
    #[arg(long)]
    hidden: Option<usize>,
    /// Tie the output head to the input embedding (no lm_head tensor).
    #[arg(long)]
    tied: bool,
    /// Shard size limit, e.g. 1GB, 500MB, 5B (mergekit's billions).
    #[arg(long, default_value = "5GB")]
    out_shard_size: String,
    /// Replace existing non-empty member directories.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let mut shape = LlamaShape::by_name(&args.shape).ok_or_else(|| {
        anyhow!(
            "unknown --shape {:?} (use tiny, tinyllama or mistral-7b)",
            args.shape
        )
    })?;
    shape.tied = args.tied;
    shape.layers = args.layers.unwrap_or(shape.layers);
    shape.intermediate = args.intermediate.unwrap_or(shape.intermediate);
    if let Some(hidden) = args.hidden {
        let head_dim = shape.head_dim();
        let groups = shape.heads / shape.kv_heads;
        if hidden == 0 || hidden % (head_dim * groups) != 0 {
            return Err(anyhow!(
                "--hidden {hidden} is not a multiple of {} (head size {head_dim} × {groups} query \
                 heads per key/value head)",
                head_dim * groups
            ));
        }
        shape.heads = hidden / head_dim;
        shape.kv_heads = shape.heads / groups;
        shape.hidden = hidden;
    }
    let dtype = parse_dtype(&args.dtype).ok_or_else(|| {
        anyhow!(
            "unknown --dtype {:?} (use float32, float16 or bfloat16)",
            args.dtype
        )
    })?;
    let options = FamilyOptions {
        shape,
        dtype,
        seed: args.seed,
        finetunes: args.finetunes,
        write: WriteOptions {
            max_shard_bytes: parse_byte_size(&args.out_shard_size)?,
            force: args.force,
            ..Default::default()
        },
    };
    let per_model: u64 = shape.specs(dtype).iter().map(|s| s.byte_len()).sum();
    let bar = crate::progress::bytes(per_model * (args.finetunes as u64 + 1), "synth", quiet);
    let dirs = generate_family(&args.out, &options, &|bytes| bar.inc(bytes))?;
    bar.finish_and_clear();
    for dir in dirs {
        tracing::info!("wrote {}", dir.display());
    }
    Ok(())
}
