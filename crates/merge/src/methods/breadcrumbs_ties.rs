//! `breadcrumbs_ties` — Model Breadcrumbs with TIES' sign election.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const BREADCRUMBS_TIES: TaskVectorMethod = TaskVectorMethod {
    name: "breadcrumbs_ties",
    sparsifier: Sparsifier::Outliers,
    consensus: true,
    normalize: false,
    rescale: false,
};
