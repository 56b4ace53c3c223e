//! Neural-network side of amalgam: one decoder-only forward pass in tch for
//! every supported family (Llama, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3,
//! GPT-NeoX, OLMo 2 — what differs is the family's description), with
//! activation taps and per-layer FFN widths for PLeaS, MatFormer and
//! stitching; its training loop, the byte-level tokenizer, the committed
//! text corpus with its held-out splits, per-domain evaluation, and the model
//! zoo trained from them.
//!
//! Checkpoints come in and go out through `amalgam-checkpoint`, in the
//! Hugging Face layout `transformers` loads.

pub mod calibration;
mod config;
pub mod data;
mod decoder;
mod error;
pub mod eval;
pub mod evaluation;
pub mod least_squares;
pub mod linear;
pub mod scores;
pub mod text;
pub mod tokenizer;
pub mod train;

pub use config::{
    nested_width, supported_model_types, Activation, Architecture, BlockNames, DecoderConfig,
    Parameter, ParameterRole, RopeScaling, GRANULARITIES,
};
pub use decoder::{Decoder, DecoderWriter, Part, SaveFiles, Taps};
pub use error::{NnError, Result};
