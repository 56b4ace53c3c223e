//! Recipes: the YAML schema (mergekit-compatible for merges; amalgam's own kinds
//! for extraction and stitching), validation with line and column, and
//! resolution of parameters into a plan. Pure data: no tensors, no I/O.
