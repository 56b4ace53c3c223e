//! `dare_ties` — DARE's random drop with TIES' sign election (no normalisation by default).
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const DARE_TIES: TaskVectorMethod = TaskVectorMethod {
    name: "dare_ties",
    sparsifier: Sparsifier::Random,
    consensus: true,
    normalize: false,
    rescale: true,
};
