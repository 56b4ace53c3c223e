//! PLeaS (permutations and least squares) — in progress: the permutation
//! symmetries of Llama-family decoders as data, and applying them.

pub mod permutation;
