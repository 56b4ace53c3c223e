//! Flags several commands share, defined once: each command flattens the
//! groups it takes (`#[command(flatten)]`), so a flag has one name, one
//! type, one default and one help text everywhere.

use std::path::PathBuf;
use std::str::FromStr;

use amalgam_checkpoint::memory::{MemoryEstimate, MemoryLimit};
use amalgam_checkpoint::{parse_byte_size, WriteOptions};
use anyhow::{anyhow, Result};

use crate::device::DeviceSpec;

/// A size as given (`8GB`, `500MB`, mergekit's `5B`), parsed once; its text
/// is kept for messages.
#[derive(Clone, Debug)]
pub struct ByteSize {
    pub bytes: u64,
    pub text: String,
}

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        let bytes = parse_byte_size(text).map_err(|e| e.to_string())?;
        Ok(Self {
            bytes,
            text: text.to_owned(),
        })
    }
}

/// `--force`, for every command that writes an output directory.
#[derive(clap::Args, Clone, Debug)]
pub struct Force {
    /// Replace a non-empty output directory.
    #[arg(long)]
    pub force: bool,
}

/// `--out-shard-size` and `--force`, for every command that writes a checkpoint.
#[derive(clap::Args, Clone, Debug)]
pub struct CheckpointOutput {
    /// Shard size limit, e.g. 1GB, 500MB, 5B (mergekit's billions).
    #[arg(long, default_value = "5GB", value_name = "SIZE")]
    pub out_shard_size: ByteSize,
    #[command(flatten)]
    pub replace: Force,
}

impl CheckpointOutput {
    pub fn force(&self) -> bool {
        self.replace.force
    }

    /// How to write a checkpoint read from `inputs` (never written over).
    pub fn write_options(&self, inputs: Vec<PathBuf>) -> WriteOptions {
        WriteOptions {
            max_shard_bytes: self.out_shard_size.bytes,
            force: self.force(),
            inputs,
            allow_nonfinite: false,
        }
    }
}

/// `--device`, for every command that computes with libtorch.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct DeviceOption {
    /// Where tensors are computed: cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu", value_name = "DEVICE")]
    pub device: DeviceSpec,
}

impl DeviceOption {
    /// The libtorch device; an error where it is not on this machine.
    pub fn resolve(&self) -> Result<tch::Device> {
        self.device.resolve()
    }
}

/// The flag that caps a run's memory, as messages name it.
pub const MAX_MEMORY: &str = "--max-memory";

/// `--max-memory` (also `--memory-budget`, its older name), for every
/// command that estimates its memory before it allocates.
#[derive(clap::Args, Clone, Debug)]
pub struct MaxMemory {
    /// Refuse a run estimated (before anything is allocated) to need more
    /// memory than this, e.g. 8GB (default: the memory available).
    #[arg(long = "max-memory", alias = "memory-budget", value_name = "SIZE")]
    pub max_memory: Option<ByteSize>,
}

impl MaxMemory {
    /// The cap given, else the memory available (`None` where that cannot
    /// be read).
    pub fn limit(&self) -> Option<MemoryLimit> {
        let cap = self.max_memory.as_ref().map(|c| (c.bytes, c.text.as_str()));
        MemoryLimit::new(cap, MAX_MEMORY)
    }

    /// Refuses a run whose memory `estimate` exceeds the limit; `what`
    /// says what needs it.
    pub fn check(&self, estimate: &MemoryEstimate, what: &str) -> Result<()> {
        match self.limit() {
            Some(limit) => limit.check(estimate, what).map_err(|e| anyhow!(e)),
            None => Ok(()),
        }
    }
}

/// How text is cut and batched for scoring, for `eval` and `tune`.
#[derive(clap::Args, Clone, Copy, Debug)]
pub struct Windows {
    /// Tokens per window (the model reads all but the last).
    #[arg(long, default_value_t = 129)]
    pub seq_len: usize,
    /// Windows per forward pass.
    #[arg(long, default_value_t = 32)]
    pub batch: usize,
}

/// How to act on `error` by a flag of this binary, where one does. The
/// libraries say what is wrong; naming the flag that changes it is the
/// binary's part.
pub fn flag_hint(error: &anyhow::Error) -> Option<&'static str> {
    error.chain().find_map(|cause| {
        if let Some(amalgam_checkpoint::Error::OutputOccupied { .. }) = checkpoint_error(cause) {
            return Some("pass --force to replace it");
        }
        if let Some(amalgam_nn::NnError::WindowTooLong { .. }) = cause.downcast_ref() {
            return Some("pass a smaller --seq-len");
        }
        match cause.downcast_ref::<amalgam_merge::MergeError>()? {
            amalgam_merge::MergeError::NonFinite { .. } => {
                Some("pass --allow-nonfinite to write them anyway")
            }
            amalgam_merge::MergeError::NoParts { .. } => Some("write them with --part I/N"),
            _ => None,
        }
    })
}

/// The checkpoint error `cause` is or wraps: the libraries pass checkpoint
/// errors on transparently, so an error chain shows their wrappers only.
fn checkpoint_error<'a>(
    cause: &'a (dyn std::error::Error + 'static),
) -> Option<&'a amalgam_checkpoint::Error> {
    use amalgam_elastic::ElasticError;
    use amalgam_merge::MergeError;
    use amalgam_nn::NnError;
    fn of_nn(error: &NnError) -> Option<&amalgam_checkpoint::Error> {
        match error {
            NnError::Checkpoint(e) => Some(e),
            NnError::Within { cause, .. } => of_nn(cause),
            _ => None,
        }
    }
    fn of_elastic(error: &ElasticError) -> Option<&amalgam_checkpoint::Error> {
        match error {
            ElasticError::Checkpoint(e) => Some(e),
            ElasticError::Nn(error) => of_nn(error),
            ElasticError::SaveAnchor { cause, .. } => of_elastic(cause),
            _ => None,
        }
    }
    if let Some(error) = cause.downcast_ref::<amalgam_checkpoint::Error>() {
        return Some(error);
    }
    if let Some(error) = cause.downcast_ref::<NnError>() {
        return of_nn(error);
    }
    if let Some(error) = cause.downcast_ref::<ElasticError>() {
        return of_elastic(error);
    }
    match cause.downcast_ref::<MergeError>()? {
        MergeError::Checkpoint(e) => Some(e),
        MergeError::Model(error) => of_nn(error),
        _ => None,
    }
}
