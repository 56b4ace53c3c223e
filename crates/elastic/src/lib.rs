//! Elastic models: one trained model, many deployable sizes.
//!
//! * [`matformer`] extracts nested submodels from MatFormer-style checkpoints:
//!   an FFN width per layer (the first m hidden units; granularities, a
//!   parameter budget turned into a Mix'n'Match choice, or a row of Google's
//!   slicing table) and layers to skip, for every decoder family amalgam
//!   runs (fused and ungated MLPs included) and Gemma 3n. Extraction streams bytes from the input's files to the
//!   output's shards, a chunk at a time.
//! * [`stitch`] (SN-Net): routes through two anchors of any supported
//!   families, stitching layers fitted by least squares on the anchors'
//!   residual streams (streamed: one block in memory at a time), the
//!   stitched forward pass, route training and the family artifact.

mod error;
pub mod matformer;
pub mod stitch;

pub use error::{ElasticError, Result};
