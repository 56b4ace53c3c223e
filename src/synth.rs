//! `amalgam synth`: generate a synthetic Llama-family base and fine-tunes.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_checkpoint::synthetic::{generate_family, member_names, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{OutputDir, WriteOptions};
use amalgam_recipe::FloatDtype;
use anyhow::{anyhow, bail, Result};

/// The most layers a synthetic model has (the deepest published models have
/// a few hundred).
const MAX_LAYERS: usize = 4096;
/// The widest `--hidden` and `--intermediate` (published models stay under
/// 2^17).
const MAX_WIDTH: usize = 1 << 20;
/// The most fine-tunes besides the base (each is a whole model directory).
const MAX_FINETUNES: usize = 1024;

/// Generate a synthetic Llama-family checkpoint family (for tests and benchmarks).
///
/// Writes OUT/base and OUT/finetune-1 … OUT/finetune-K: Hugging Face checkpoints
/// with exact tensor names and a config.json that transformers loads. The
/// fine-tunes' deltas share a common part, have task-specific parts, and
/// conflict in sign between odd and even fine-tunes on 10% of entries. OUT
/// appears whole or not at all: the family is written beside it and renamed
/// into place when complete.
#[derive(clap::Args)]
#[command(
    after_help = "Example:\n  amalgam synth work/tinyllama --shape tinyllama --finetunes 2 --dtype bf16 --out-shard-size 1GB"
)]
pub struct Args {
    /// Directory to create the family in (must not exist or be empty, unless --force).
    out: PathBuf,
    /// `tiny` (hidden 64, 4 layers), `tinyllama` (TinyLlama-1.1B) or
    /// `mistral-7b` (Mistral-7B's shape, 14.5 GB per model in BF16).
    #[arg(long, default_value = "tiny")]
    shape: String,
    /// Number of fine-tunes besides the base (at most 1024).
    #[arg(long, default_value_t = 2)]
    finetunes: usize,
    /// float32, float16 or bfloat16.
    #[arg(long, default_value = "float32")]
    dtype: FloatDtype,
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Override the shape's number of layers (1 to 4096).
    #[arg(long)]
    layers: Option<usize>,
    /// Override the shape's FFN width (1 to 2^20).
    #[arg(long)]
    intermediate: Option<usize>,
    /// Override the shape's width (a multiple of its head size, at most
    /// 2^20; the query and key/value head counts scale with it).
    #[arg(long)]
    hidden: Option<usize>,
    /// Tie the output head to the input embedding (no lm_head tensor).
    #[arg(long)]
    tied: bool,
    #[command(flatten)]
    write: crate::options::CheckpointOutput,
    #[command(flatten)]
    max_memory: crate::options::MaxMemory,
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
    if !(1..=MAX_LAYERS).contains(&shape.layers) {
        bail!(
            "--layers {}: a synthetic model has 1 to {MAX_LAYERS} layers",
            shape.layers
        );
    }
    if !(1..=MAX_WIDTH).contains(&shape.intermediate) {
        bail!(
            "--intermediate {}: the FFN width must be 1 to {MAX_WIDTH}",
            shape.intermediate
        );
    }
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
        if hidden > MAX_WIDTH {
            bail!("--hidden {hidden}: the width must be at most {MAX_WIDTH}");
        }
        shape.heads = hidden / head_dim;
        shape.kv_heads = shape.heads / groups;
        shape.hidden = hidden;
    }
    if args.finetunes > MAX_FINETUNES {
        bail!(
            "--finetunes {}: at most {MAX_FINETUNES} (each is a whole model directory)",
            args.finetunes
        );
    }
    let dtype = args.dtype.safetensors();

    // Sizes, checked before anything is allocated or created. With the
    // limits above no tensor's size overflows; totals are summed in u128.
    let specs = shape.specs(dtype);
    let members = args.finetunes as u128 + 1;
    let per_model: u128 = specs.iter().map(|s| s.byte_len() as u128).sum();
    let total = per_model * members;
    // Tensors are generated in parallel, each for every member at once.
    let mut sizes: Vec<u128> = specs.iter().map(|s| s.byte_len() as u128).collect();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let threads = rayon::current_num_threads();
    let at_once: u128 = sizes.iter().take(threads).sum::<u128>() * members;
    args.max_memory.check(
        &MemoryEstimate::new().phase("the largest tensors generated together", saturate(at_once)),
        &format!(
            "generating {members} models' largest tensors, {} at a time",
            threads.min(sizes.len())
        ),
    )?;
    check_disk_space(&args.out, total, members, per_model)?;

    let out = OutputDir::create(&args.out, args.write.force(), &[])?;
    let options = FamilyOptions {
        shape,
        dtype,
        seed: args.seed,
        finetunes: args.finetunes,
        write: WriteOptions {
            max_shard_bytes: args.write.out_shard_size.bytes,
            ..Default::default()
        },
    };
    let bar = crate::progress::bytes(saturate(total), "synth", quiet);
    generate_family(out.staging(), &options, &|bytes| bar.inc(bytes))?;
    let root = out.commit()?;
    bar.finish_and_clear();
    for name in member_names(args.finetunes) {
        tracing::info!("wrote {}", root.join(name).display());
    }
    Ok(())
}

fn saturate(bytes: u128) -> u64 {
    u64::try_from(bytes).unwrap_or(u64::MAX)
}

/// Refuses a family larger than the space free where it is written (the
/// nearest existing directory of `out`); says nothing where that cannot be
/// asked.
fn check_disk_space(out: &Path, total: u128, members: u128, per_model: u128) -> Result<()> {
    let mut dir = out.parent().unwrap_or(Path::new("."));
    while !dir.as_os_str().is_empty() && !dir.is_dir() {
        dir = dir.parent().unwrap_or(Path::new(""));
    }
    if dir.as_os_str().is_empty() {
        dir = Path::new(".");
    }
    let Some(free) = free_bytes(dir) else {
        return Ok(());
    };
    if total > free as u128 {
        let gb = |b: u128| b as f64 / 1e9;
        bail!(
            "{}: the family needs {:.1} GB ({members} models of {:.1} GB), more than the {:.1} GB \
             free on the filesystem of {}",
            out.display(),
            gb(total),
            gb(per_model),
            gb(free as u128),
            dir.display()
        );
    }
    Ok(())
}

/// Bytes an unprivileged user may still write on `dir`'s filesystem.
fn free_bytes(dir: &Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let path = std::ffi::CString::new(dir.as_os_str().as_bytes()).ok()?;
    // SAFETY: a valid NUL-terminated path and a zeroed out-struct.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}
