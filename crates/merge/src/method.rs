use std::collections::BTreeMap;

use amalgam_recipe::{MethodSpec, Resolved};
use tch::Tensor;

use crate::{MergeError, Result};

/// Everything a method needs to compute one output tensor.
pub struct MergeContext<'a> {
    /// The output tensor's name.
    pub name: &'a str,
    /// One tensor per input, in the math dtype, cut to the output shape.
    pub inputs: &'a [Tensor],
    /// Index into `inputs` of the base model, if it is among them.
    pub base: Option<usize>,
    /// Shared parameters (`lambda`, `t`, `normalize` …).
    pub params: &'a BTreeMap<String, Resolved>,
    /// Per-input parameters (`weight`, `density` …); empty maps for the base.
    pub input_params: Vec<&'a BTreeMap<String, Resolved>>,
    /// A stable identity per input (a hash of the model's path), so that a
    /// model's random stream does not depend on its position in the recipe.
    pub input_ids: Vec<u64>,
    /// The recipe seed; random methods derive a stream per (tensor, model).
    pub seed: u64,
}

impl MergeContext<'_> {
    pub fn number(&self, name: &str) -> f64 {
        self.params[name].number()
    }

    pub fn flag(&self, name: &str) -> bool {
        self.params[name].flag()
    }

    pub fn input_number(&self, input: usize, name: &str) -> f64 {
        self.input_params[input][name].number()
    }

    /// The base tensor, for methods whose spec requires one.
    pub fn base_tensor(&self) -> &Tensor {
        &self.inputs[self
            .base
            .expect("the planner checked that a base is present")]
    }

    /// Indices of the inputs other than the base, in recipe order.
    pub fn others(&self) -> Vec<usize> {
        (0..self.inputs.len())
            .filter(|&i| Some(i) != self.base)
            .collect()
    }

    /// A seed for the random stream of one input of this tensor: a function of
    /// (seed, tensor name, model identity) only.
    pub fn stream(&self, input: usize) -> u64 {
        amalgam_checkpoint::stream_seed(self.seed, self.name, self.input_ids[input])
    }

    pub fn error(&self, message: impl Into<String>) -> MergeError {
        MergeError::Tensor {
            tensor: self.name.into(),
            message: message.into(),
        }
    }
}

/// A merge method: its parameters, and the math for one tensor.
///
/// `merge` must not modify its inputs in place: they may be shared.
pub trait MergeMethod: Sync + Send {
    fn spec(&self) -> MethodSpec;
    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor>;

    /// Tensors of the output's size (in the math dtype) the method holds at
    /// its peak besides its inputs, for a tensor of `numel` entries; used for
    /// the memory budget and estimate.
    fn working_copies(&self, inputs: usize, _numel: u64) -> usize {
        inputs + 2
    }
}

/// How a whole-model method runs: `amalgam merge`'s options.
#[derive(Debug, Clone)]
pub struct RunOptions {
    pub seed: u64,
    pub device: tch::Device,
    pub threads: usize,
    /// Refuses a run whose memory estimate exceeds it (`None`: unknown).
    pub memory_limit: Option<amalgam_checkpoint::memory::MemoryLimit>,
    pub write: amalgam_checkpoint::WriteOptions,
    /// Describe the run; write nothing.
    pub dry_run: bool,
}

/// Where a long run reports its progress (the binary draws a bar).
pub trait Progress: Sync {
    fn start(&self, total: u64, label: &str);
    fn advance(&self, steps: u64);
    fn finish(&self);
}

/// What a whole-model run tells the user: a paragraph, and the same facts as
/// a JSON object (what `merge --dry-run --json` prints).
#[derive(Debug, Clone)]
pub struct RunReport {
    pub text: String,
    pub json: serde_json::Value,
}

impl std::fmt::Display for RunReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.text)
    }
}

/// A method that needs whole models at once rather than one tensor at a
/// time (PLeaS): it reads its models, computes and writes the output itself.
pub trait WholeModelMethod: Sync + Send {
    /// Its `merge_method` name.
    fn name(&self) -> &'static str;

    /// Checks `recipe` and its models, then writes the merge into `out` (with
    /// `options.dry_run`, only describes it); returns what to tell the user.
    fn run(
        &self,
        recipe: &amalgam_recipe::Recipe,
        out: &std::path::Path,
        options: &RunOptions,
        progress: &dyn Progress,
    ) -> Result<RunReport>;
}
