use std::fmt;

/// A position in the recipe text (1-based line and column).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.line, self.column)
    }
}

/// A recipe problem, pointing at the recipe line it comes from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{source_name}:{at}: {message}")]
pub struct RecipeError {
    /// The recipe file name (as given to the parser).
    pub source_name: String,
    pub at: Location,
    pub message: String,
}
