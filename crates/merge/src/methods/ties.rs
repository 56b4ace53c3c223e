//! `ties` — TIES-merging (Yadav et al. 2023): magnitude trim, weighted sign election, disjoint mean.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const TIES: TaskVectorMethod = TaskVectorMethod {
    name: "ties",
    sparsifier: Sparsifier::Magnitude,
    consensus: true,
    normalize: true,
    rescale: false,
};
