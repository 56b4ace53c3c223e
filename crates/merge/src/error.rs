/// Why a merge failed.
#[derive(Debug, thiserror::Error)]
pub enum MergeError {
    #[error(transparent)]
    Checkpoint(#[from] amalgam_checkpoint::Error),
    #[error(transparent)]
    Recipe(#[from] amalgam_recipe::RecipeError),
    #[error("tensor {tensor}: {message}")]
    Tensor { tensor: String, message: String },
    // The cause is in the message, not a `source` (a chain would repeat it).
    #[error("tensor {tensor}: {cause}")]
    Torch {
        tensor: String,
        cause: tch::TchError,
    },
    #[error("{0}")]
    Device(String),
    /// The output's config.json cannot describe the merged tensors.
    #[error("output config (from model `{model}`): {message}")]
    Config { model: String, message: String },
    /// A permutation that does not fit its group or the model.
    #[error("permutation: {0}")]
    Permutation(String),
    /// A model the forward pass cannot load or run.
    #[error(transparent)]
    Model(#[from] amalgam_nn::NnError),
    /// NaN or ±inf values a merge made from finite inputs, which are
    /// written only when the caller allows them (the binary's
    /// `--allow-nonfinite`, which it names when it reports this).
    #[error("tensor {tensor}: {message}")]
    NonFinite { tensor: String, message: String },
    /// A join that finds no parts to join.
    #[error("{}: no parts", dir.display())]
    NoParts { dir: std::path::PathBuf },
    /// A merge split across processes (`--part`, `--join`) that does not fit together.
    #[error("{0}")]
    Part(String),
    /// A multi-stage recipe's stage output that cannot be written or read.
    #[error("{}: {message}", path.display())]
    Stage {
        path: std::path::PathBuf,
        message: String,
    },
    /// A tuning search that cannot run or found nothing.
    #[error("{0}")]
    Search(String),
    /// A run whose memory estimate exceeds the limit.
    #[error("{0}")]
    Memory(String),
    /// A LoRA adapter whose `adapter_config.json` amalgam refuses.
    #[error("{}: {cause}", dir.display())]
    AdapterConfig {
        dir: std::path::PathBuf,
        cause: crate::lora::ConfigError,
    },
    /// A LoRA adapter that cannot be applied to its base.
    #[error("{}: {message}", dir.display())]
    Adapter {
        dir: std::path::PathBuf,
        message: String,
    },
}

pub type Result<T, E = MergeError> = std::result::Result<T, E>;
