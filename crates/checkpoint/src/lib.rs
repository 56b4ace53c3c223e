//! Hugging Face checkpoint directories, in and out.
//!
//! * [`Checkpoint`] opens a directory (`model.safetensors`, or shards plus
//!   `model.safetensors.index.json`, and `config.json`), validates every header up
//!   front, lists tensors lazily and materialises them one at a time.
//! * [`CheckpointWriter`] lays out sharded safetensors files from a list of tensor
//!   specs before any data flows, accepts tensor data in any order from any thread,
//!   and commits the finished directory atomically (temporary sibling, fsync,
//!   rename), with index, config, tokenizer files and a model card.
//! * [`OutputDir`] is how every output comes to exist: checked before anything
//!   is created, staged in a hidden sibling, renamed into place without
//!   replacing anything unchecked, cleaned up on failure or [`interrupt`].
//! * Inputs are read as a hostile directory may hand them over: regular files
//!   inside the directory only, bounded JSON, no duplicate keys; tensor data
//!   by `pread` or by [`MappedTensor`], whose SIGBUS guard makes a file
//!   truncated under it an error, not a crash.
//! * [`arch`] finds a tensor name's block index; [`family`] reads the rest of
//!   it from the family's description (`families/*.json`).
//! * [`synthetic`] generates Llama-family checkpoint families for tests and benches.
//!
//! Pickle checkpoints are refused; nothing is ever unpickled.

pub mod arch;
mod card;
mod config;
mod copy;
pub mod decoder;
mod direct;
mod dtype;
mod error;
pub mod family;
mod files;
pub mod hub;
pub mod interrupt;
mod layout;
mod mapped;
pub mod memory;
pub mod moe;
mod output;
mod output_file;
mod reader;
mod seed;
pub mod synthetic;
mod verify;
mod writer;

pub use card::{InputRecord, ModelCard};
pub use config::ModelConfig;
pub use copy::copy_checkpoint;
pub use dtype::{count_nonfinite, dtype_from_kind, dtype_name, kind_from_dtype, parse_dtype};
pub use error::{Error, IoContext, Occupant, Result};
pub use files::{
    duplicate_key, open_regular, read_regular, ModelDir, MAX_ADDED_TOKEN_BYTES, MAX_JSON_BYTES,
};
pub use layout::{parse_byte_size, ShardLayout, TensorSpec, DEFAULT_SHARD_BYTES};
pub use mapped::MappedTensor;
pub use output::{check_output, OutputDir, ScratchDir};
pub use output_file::{write_output_file, OutputFile};
pub use reader::{read_shard_header, Checkpoint, TensorEntry};
pub use safetensors::Dtype;
pub use seed::stream_seed;
pub use verify::{config_mismatch, ConfigProblem};
pub use writer::{CheckpointWriter, Finish, WriteOptions};

pub const TOKENIZER_CONFIG: &str = "tokenizer_config.json";
pub const CHAT_TEMPLATE_JINJA: &str = "chat_template.jinja";
pub const CHAT_TEMPLATE_JSON: &str = "chat_template.json";

/// Files besides the weights that belong with a model and are copied into outputs.
pub const TOKENIZER_FILES: &[&str] = &[
    "tokenizer.json",
    TOKENIZER_CONFIG,
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON,
    "generation_config.json",
];
