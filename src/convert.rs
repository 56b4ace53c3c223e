//! `amalgam convert`: re-shard a checkpoint and optionally change its float dtype.

use std::path::PathBuf;

use amalgam_checkpoint::{
    count_nonfinite, kind_from_dtype, parse_byte_size, parse_dtype, Checkpoint, CheckpointWriter,
    Dtype, Finish, InputRecord, ModelCard, TensorSpec, WriteOptions,
};
use anyhow::{anyhow, Context, Result};

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
    dtype: Option<String>,
    /// Shard size limit, e.g. 1GB, 500MB, 5B (mergekit's billions).
    #[arg(long, default_value = "5GB")]
    out_shard_size: String,
    /// Replace a non-empty output directory.
    #[arg(long)]
    force: bool,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let target = match &args.dtype {
        Some(text) => Some(parse_dtype(text).ok_or_else(|| {
            anyhow!("unknown --dtype {text:?} (use float32, float16 or bfloat16)")
        })?),
        None => None,
    };
    let max_shard_bytes = parse_byte_size(&args.out_shard_size)?;
    let input = Checkpoint::open(&args.input)?;
    let out_dtype = |dtype: Dtype| match target {
        Some(t) if is_float(dtype) => t,
        _ => dtype,
    };
    let specs: Vec<TensorSpec> = input
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(&t.name, out_dtype(t.dtype), t.shape.clone()))
        .collect();
    let options = WriteOptions {
        max_shard_bytes,
        force: args.force,
        inputs: vec![args.input.clone()],
        allow_nonfinite: false,
    };
    let writer = CheckpointWriter::create(&args.output, specs, &options)?;
    let bar = crate::progress::bytes(
        input
            .tensors()
            .iter()
            .map(|t| t.byte_range.end - t.byte_range.start)
            .sum(),
        "convert",
        quiet,
    );
    for entry in input.tensors() {
        let dtype = out_dtype(entry.dtype);
        let raw = input.read_bytes(entry)?;
        let nonfinite = if dtype == entry.dtype {
            writer.write_bytes(&entry.name, &raw)?
        } else {
            let kind = |d| kind_from_dtype(d).expect("float dtypes map to kinds");
            let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
            let tensor = tch::Tensor::f_from_data_size(&raw, &shape, kind(entry.dtype))?
                .to_kind(kind(dtype));
            writer.write_tensor(&entry.name, &tensor)?
        };
        // NaN/inf the input had are carried over; ones a cast made are not.
        if nonfinite > 0 && count_nonfinite(entry.dtype, &raw) > 0 {
            writer.accept_nonfinite(&entry.name)?;
        }
        bar.inc(entry.byte_range.end - entry.byte_range.start);
    }
    bar.finish_and_clear();
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
    let out = writer.finish(Finish {
        config: input.config(),
        tokenizer_source: Some(input.dir()),
        chat_template: None,
        extra_files: &[],
        card: &card,
    })?;
    tracing::info!(
        "wrote {} ({} tensors)",
        out.display(),
        input.tensors().len()
    );
    Ok(())
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}
