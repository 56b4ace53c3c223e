//! Merge methods over tch tensors and the executor that runs a plan.
//!
//! The data path, a module per concern: a recipe's models are opened as
//! [`source::Source`]s (checkpoints, LoRA adapters applied on read);
//! `job` prepares a [`executor::MergeJob`] (inventories, plan, vocabulary,
//! every check before anything is written); [`executor`] runs it (workers
//! reading, merging and handing tensors to one writer thread) within the
//! memory `budget` gives it; `output` finishes the checkpoint (config, card,
//! chat template, tokenizer and recipe files); `split` runs one plan as
//! several processes' parts and joins them; [`stages`] places the stages of
//! a multi-stage recipe.
//!
//! Every per-tensor method is one file in [`methods`] implementing
//! [`MergeMethod`] and one line in [`registry`]. It sees one output tensor at
//! a time: its inputs (already in the math dtype and cut or aligned to the
//! output shape), which one is the base, and the parameters the recipe
//! resolved for it. Methods that need whole models (PLeaS) implement
//! [`WholeModelMethod`] and sit in the same registry.

mod budget;
pub mod elementwise;
mod error;
pub mod executor;
mod job;
pub mod lora;
mod method;
pub mod methods;
pub mod moe;
mod output;
pub mod pleas;
pub mod registry;
pub mod source;
pub mod sparsify;
pub mod split;
pub mod stages;
pub mod stream;
pub mod tune;
pub mod vocabulary;

pub use error::{MergeError, Result};
pub use method::{MergeContext, MergeMethod, Progress, RunOptions, RunReport, WholeModelMethod};

/// The default cap of a merge's memory budget
/// ([`executor::MergeJob::default_memory_budget`]): half the memory
/// available, 4 GB where that cannot be read.
pub fn half_the_available_memory() -> u64 {
    amalgam_checkpoint::memory::available().map_or(4_000_000_000, |bytes| bytes / 2)
}
