//! `breadcrumbs` — Model Breadcrumbs (Davari & Belilovsky 2024): drop the largest and smallest deltas.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const BREADCRUMBS: TaskVectorMethod = TaskVectorMethod {
    name: "breadcrumbs",
    sparsifier: Sparsifier::Outliers,
    consensus: false,
    normalize: false,
    rescale: false,
};
