//! `task_arithmetic` — Task arithmetic (Ilharco et al. 2023): base + λ·Σ wᵢ(xᵢ − base).
//! The shared engine is [`super::task_vector`].

use super::task_vector::{Sparsifier, TaskVectorMethod};

pub const TASK_ARITHMETIC: TaskVectorMethod = TaskVectorMethod {
    name: "task_arithmetic",
    sparsifier: Sparsifier::None,
    consensus: false,
    normalize: false,
    rescale: false,
};
