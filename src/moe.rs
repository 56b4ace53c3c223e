//! `amalgam moe`: a Mixtral-style mixture from dense experts.

use std::path::PathBuf;

use amalgam_merge::moe::Moe;
use amalgam_recipe::MoeRecipe;
use anyhow::Result;

/// Assemble dense experts into a Mixtral or Qwen2-MoE mixture (mergekit-moe's config).
///
/// Attention, norms and embeddings come from `base_model`; each expert's MLP
/// becomes one expert of every layer (one `shared_experts` entry makes a
/// Qwen2-MoE); router weights come from the experts' prompts (`gate_mode:
/// hidden` or `cheap_embed`) or are random. Example: recipes/moe/mixtral.yml.
#[derive(clap::Args)]
#[command(after_help = "Example config:\n  \
    base_model: work/models/base\n  \
    gate_mode: hidden          # hidden | cheap_embed | random | uniform_random\n  \
    experts_per_token: 2\n  \
    experts:\n    \
      - source_model: work/models/finetune-1\n      \
        positive_prompts: [\"def main():\"]\n    \
      - source_model: work/models/finetune-2\n      \
        positive_prompts: [\"Once upon a time\"]")]
pub struct Args {
    /// The config (YAML, mergekit-moe's schema).
    config: PathBuf,
    /// The output directory (must not exist or be empty, unless --force).
    output: PathBuf,
    /// Seed for random gates and expert noise.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Build the mixture even if every expert is the same model.
    #[arg(long)]
    allow_identical_experts: bool,
    /// Check the config and models and print what would be built; write nothing.
    #[arg(long)]
    dry_run: bool,
    #[command(flatten)]
    write: crate::options::CheckpointOutput,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let text = crate::resources::read_recipe(&args.config)?;
    let recipe = MoeRecipe::parse(&text, &args.config.display().to_string())?;
    if recipe.identical_experts() && !args.allow_identical_experts {
        return Err(recipe
            .error(
                recipe.experts_at,
                "every expert is the same model: the mixture would cost more and compute the \
                 same (pass --allow-identical-experts to build it anyway, e.g. to train it \
                 further)",
            )
            .into());
    }
    let moe = Moe::open(&recipe)?;
    if args.dry_run {
        println!(
            "moe: {} experts ({} per token) over the base {}, {:?} gates",
            recipe.experts.len(),
            recipe.experts_per_token,
            recipe.base_model.path,
            recipe.gate_mode
        );
        return Ok(());
    }
    let write = args.write.write_options(vec![]);
    let gates = moe.gates(args.seed)?;
    let out = moe.write(
        &args.output,
        &gates,
        args.seed,
        &write,
        &crate::progress::Steps::new(quiet),
    )?;
    if !quiet {
        println!(
            "wrote a mixture of {} experts to {}",
            recipe.experts.len(),
            out.display()
        );
    }
    Ok(())
}
