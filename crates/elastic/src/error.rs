use std::path::PathBuf;

/// What can go wrong when extracting a submodel or stitching a family.
#[derive(Debug, thiserror::Error)]
pub enum ElasticError {
    #[error(transparent)]
    Checkpoint(#[from] amalgam_checkpoint::Error),
    #[error(transparent)]
    Recipe(#[from] amalgam_recipe::RecipeError),
    /// The model does not have the layout or config extraction needs.
    #[error("{}: {message}", path.display())]
    Model { path: PathBuf, message: String },
    /// A slicing table (CSV) that cannot be read or has no such row.
    #[error("{}: {message}", path.display())]
    Table { path: PathBuf, message: String },
    /// A model the forward pass cannot load or run, or a fit that failed.
    #[error(transparent)]
    Nn(#[from] amalgam_nn::NnError),
    /// An anchor of a stitched family that could not be written.
    #[error("stitching: saving anchor {anchor}: {cause}")]
    SaveAnchor {
        anchor: usize,
        cause: Box<ElasticError>,
    },
    /// A run whose memory estimate exceeds the limit.
    #[error("{0}")]
    Memory(String),
    /// A stitching layer that cannot be fitted or applied.
    #[error("stitching: {0}")]
    Stitch(String),
}

pub type Result<T, E = ElasticError> = std::result::Result<T, E>;
