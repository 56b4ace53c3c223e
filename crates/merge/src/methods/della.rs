//! `della` — DELLA (Deep et al. 2024): magnitude-ranked random drop, sign election, normalised.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const DELLA: TaskVectorMethod = TaskVectorMethod {
    name: "della",
    sparsifier: Sparsifier::Della,
    consensus: true,
    normalize: true,
    rescale: true,
};
