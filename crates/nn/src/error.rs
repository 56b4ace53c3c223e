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
    /// Two tokenizers give different tokens for the same text.
    #[error("the two tokenizers split the text differently")]
    TokenizersDiffer,
    /// A tokenizer gives an id outside the model's vocabulary.
    #[error("its tokenizer gives id {id}, outside the model's {vocab}-token vocabulary")]
    OutsideVocabulary { id: i64, vocab: usize },
}

impl NnError {
    /// The error, a libtorch one cut to its message's first line (libtorch
    /// appends its C++ stack trace) and prefixed with `what` failed.
    pub fn brief(self, what: &str) -> Self {
        match self {
            NnError::Torch(e) => NnError::Invalid(format!(
                "{what}: {}",
                e.to_string().lines().next().unwrap_or_default()
            )),
            e => e,
        }
    }
}

pub type Result<T> = std::result::Result<T, NnError>;
