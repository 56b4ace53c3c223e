//! Merge methods over tch tensors and the executor that runs a plan.
//!
//! Every method is one file in [`methods`] implementing [`MergeMethod`] and one
//! line in [`registry`]. A method sees one output tensor at a time: its inputs
//! (already in the math dtype and cut to the output shape), which one is the
//! base, and the parameters the recipe resolved for it.

pub mod elementwise;
mod error;
pub mod executor;
mod method;
pub mod methods;
pub mod pleas;
pub mod registry;
pub mod sparsify;
pub mod vocabulary;

pub use error::{MergeError, Result};
pub use method::{MergeContext, MergeMethod};
