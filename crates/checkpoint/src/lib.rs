//! Hugging Face checkpoint directories, in and out.
//!
//! * [`Checkpoint`] opens a directory (`model.safetensors`, or shards plus
//!   `model.safetensors.index.json`, and `config.json`), validates every header up
//!   front, lists tensors lazily and materialises them one at a time from
//!   memory-mapped files.
//! * [`CheckpointWriter`] lays out sharded safetensors files from a list of tensor
//!   specs before any data flows, accepts tensor data in any order from any thread,
//!   and commits the finished directory atomically (temporary sibling, fsync,
//!   rename), with index, config, tokenizer files and a model card.
//! * [`arch`] knows what a tensor name means (layer index and role).
//! * [`synthetic`] generates Llama-family checkpoint families for tests and benches.
//!
//! Pickle checkpoints are refused; nothing is ever unpickled.

pub mod arch;
mod card;
mod config;
mod dtype;
mod error;
mod layout;
mod reader;
mod seed;
pub mod synthetic;
mod writer;

pub use card::{InputRecord, ModelCard};
pub use config::ModelConfig;
pub use dtype::{dtype_from_kind, dtype_name, kind_from_dtype, parse_dtype};
pub use error::{Error, Result};
pub use layout::{parse_byte_size, ShardLayout, TensorSpec, DEFAULT_SHARD_BYTES};
pub use reader::{Checkpoint, TensorEntry};
pub use safetensors::Dtype;
pub use seed::stream_seed;
pub use writer::{sibling as staging_sibling, CheckpointWriter, Finish, WriteOptions};

/// Files besides the weights that belong with a model and are copied into outputs.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
];
