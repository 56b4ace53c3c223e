use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum NnError {
    #[error(transparent)]
    Checkpoint(#[from] amalgam_checkpoint::Error),
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Torch(#[from] tch::TchError),
}

pub type Result<T> = std::result::Result<T, NnError>;
