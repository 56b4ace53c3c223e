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
    /// A run whose memory estimate exceeds the limit.
    #[error("{0}")]
    Memory(String),
    /// A window of `seq_len` tokens longer than the text it is cut from.
    #[error("a window of {seq_len} tokens is longer than the {text}")]
    WindowTooLong { seq_len: usize, text: String },
    /// What failed, and why (the cause is in the message, not a `source`:
    /// a chain would repeat it).
    #[error("{what}: {cause}")]
    Within { what: String, cause: Box<NnError> },
    /// A tokenizer gives an id outside the model's vocabulary.
    #[error("its tokenizer gives id {id}, outside the model's {vocab}-token vocabulary")]
    OutsideVocabulary { id: i64, vocab: usize },
}

impl NnError {
    /// The error, said to have happened in `what` (e.g. loading a model).
    pub fn within(self, what: impl Into<String>) -> Self {
        NnError::Within {
            what: what.into(),
            cause: Box::new(self),
        }
    }

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
