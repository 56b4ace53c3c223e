//! `dare_linear` — DARE (Yu et al. 2024) with a plain weighted sum: random drop, L1 rescale.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const DARE_LINEAR: TaskVectorMethod = TaskVectorMethod {
    name: "dare_linear",
    sparsifier: Sparsifier::Random,
    consensus: false,
    normalize: false,
    rescale: true,
};
