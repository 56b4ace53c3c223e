//! `della_linear` — DELLA's magnitude-ranked random drop with a plain weighted sum.
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const DELLA_LINEAR: TaskVectorMethod = TaskVectorMethod {
    name: "della_linear",
    sparsifier: Sparsifier::Della,
    consensus: false,
    normalize: false,
    rescale: true,
};
