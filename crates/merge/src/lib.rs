//! Merge methods over tch tensors and the executor that runs a plan.
//!
//! The data path: a recipe's models are opened as [`source::Source`]s
//! (checkpoints, LoRA adapters applied on read), [`executor::MergeJob::prepare`]
//! plans the job and checks it, and the executor reads, merges and writes.
//!
//! Every per-tensor method is one file in [`methods`] implementing
//! [`MergeMethod`] and one line in [`registry`]. It sees one output tensor at
//! a time: its inputs (already in the math dtype and cut or aligned to the
//! output shape), which one is the base, and the parameters the recipe
//! resolved for it. Methods that need whole models (PLeaS) implement
//! [`WholeModelMethod`] and sit in the same registry.

pub mod elementwise;
mod error;
pub mod executor;
mod job;
pub mod lora;
mod method;
pub mod methods;
pub mod moe;
pub mod pleas;
pub mod registry;
pub mod source;
pub mod sparsify;
pub mod stream;
pub mod vocabulary;

pub use error::{MergeError, Result};
pub use method::{MergeContext, MergeMethod, Progress, RunOptions, RunReport, WholeModelMethod};
