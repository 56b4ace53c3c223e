//! Neural-network side of amalgam: a Llama-family decoder forward pass in tch
//! (with activation taps and per-layer FFN widths, for PLeaS, MatFormer and
//! stitching), its training loop, the byte-level tokenizer, the committed
//! text corpus with its held-out splits, per-domain evaluation, and the model
//! zoo trained from them.
//!
//! Checkpoints come in and go out through `amalgam-checkpoint`, in the
//! Hugging Face layout `transformers` loads.

mod config;
pub mod data;
mod error;
pub mod eval;
mod llama;
pub mod text;
pub mod tokenizer;
pub mod train;
pub mod zoo;

pub use config::{nested_width, LlamaConfig, RopeScaling, GRANULARITIES};
pub use error::{NnError, Result};
pub use llama::{Llama, Taps};
