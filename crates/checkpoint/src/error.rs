use std::path::PathBuf;

/// Everything that can go wrong reading or writing a checkpoint. Every variant
/// names the file (and the tensor, where one is involved).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    // The cause is part of the message, not a `source`: error reporters that
    // print the chain would otherwise show it twice.
    #[error("{}: {cause}", path.display())]
    Io {
        path: PathBuf,
        cause: std::io::Error,
    },
    /// An input refused for what it is (a symlink out of the model directory,
    /// a FIFO, a file too large for its kind, a duplicate key).
    #[error("{}: {message}", path.display())]
    Input { path: PathBuf, message: String },
    /// A model reference that names no directory here (nor in the Hub cache).
    #[error("{message}")]
    Locate { message: String },
    #[error("{}: not a directory (a checkpoint is a Hugging Face model directory)", path.display())]
    NotADirectory { path: PathBuf },
    #[error(
        "{}: refusing pickle checkpoint file {file}: amalgam never unpickles. Convert it to \
         safetensors where you trust the file, e.g. `python -c \"from transformers import \
         AutoModelForCausalLM as M; M.from_pretrained('DIR').save_pretrained('OUT', \
         safe_serialization=True)\"`, then pass the converted directory",
        dir.display()
    )]
    PickleRefused { dir: PathBuf, file: String },
    #[error(
        "{}: no weights found (expected model.safetensors or model.safetensors.index.json)",
        dir.display()
    )]
    NoWeights { dir: PathBuf },
    #[error("{}: {message}", path.display())]
    Config { path: PathBuf, message: String },
    #[error("{}: invalid index: {message}", path.display())]
    Index { path: PathBuf, message: String },
    /// An index that is not the JSON it must be (the parser's error kept).
    #[error("{}: invalid index: {cause}", path.display())]
    IndexJson {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{}: shard {shard} (holding tensor {tensor}) is missing", index.display())]
    ShardMissing {
        index: PathBuf,
        shard: String,
        tensor: String,
    },
    #[error("{}: tensor {tensor}: {message}", path.display())]
    IndexMismatch {
        path: PathBuf,
        tensor: String,
        message: String,
    },
    #[error("{}: {}{message}", path.display(), tensor.as_ref().map(|t| format!("tensor {t}: ")).unwrap_or_default())]
    Safetensors {
        path: PathBuf,
        tensor: Option<String>,
        message: String,
    },
    #[error("{}: no tensor named {name}", dir.display())]
    TensorNotFound { dir: PathBuf, name: String },
    #[error(
        "tensor {name}: dtype {dtype:?} has no libtorch equivalent (it can only be passed through)"
    )]
    UnsupportedDtype {
        name: String,
        dtype: safetensors::Dtype,
    },
    #[error("tensor {name}: {cause}")]
    Torch { name: String, cause: tch::TchError },
    /// Something is where the output goes that is replaced only when the
    /// caller asks for it (the binary's `--force`, which it names when it
    /// reports this).
    #[error("{}: {occupant}", path.display())]
    OutputOccupied { path: PathBuf, occupant: Occupant },
    #[error("{}: refusing to write over input checkpoint {}", output.display(), input.display())]
    OutputOverlapsInput { output: PathBuf, input: PathBuf },
    #[error("writing {}: {message}", path.display())]
    Write { path: PathBuf, message: String },
    #[error("invalid size {text:?}: {message}")]
    ByteSize { text: String, message: String },
}

/// What occupies an output's place ([`Error::OutputOccupied`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Occupant {
    #[error("output directory exists and is not empty")]
    NonEmptyDirectory,
    #[error("exists")]
    File,
    #[error("exists (a symbolic link: amalgam never writes through it, replacing it replaces the link itself)")]
    Symlink,
    #[error(
        "appeared or changed while amalgam was writing it (another process?); refusing to \
         replace what was not checked"
    )]
    ChangedDuringRun,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Attaches a path to an I/O error.
pub trait IoContext<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T> {
        self.map_err(|cause| Error::Io {
            path: path.into(),
            cause,
        })
    }
}
