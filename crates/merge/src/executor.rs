//! Runs a plan: read each output tensor's inputs, cast them to the math dtype,
//! apply the method, cast to the output dtype and stream the result to the
//! writer. Output tensors are independent, so they run in parallel on a rayon
//! pool, and one more thread writes them as they come; libtorch's own threads
//! are pinned to one so that every tensor is computed the same way whatever
//! the thread count (bit-identical outputs).

use std::path::{Path, PathBuf};
use std::sync::Mutex;

use amalgam_checkpoint::{kind_from_dtype, CheckpointWriter, Dtype, WriteOptions};
use amalgam_recipe::{InputTransform, Plan, PlannedTensor, Recipe};
use rayon::prelude::*;
use tch::{Device, Tensor};

use crate::budget::{Budget, Permit};
use crate::job::model_id;
use crate::source::Source;
use crate::split::manifest;
use crate::{MergeContext, MergeError, MergeMethod, Result};

/// How a plan is executed.
#[derive(Debug, Clone)]
pub struct ExecOptions {
    pub seed: u64,
    pub device: Device,
    /// Tensors computed at once (rayon threads).
    pub threads: usize,
    /// Bytes of tensor memory in flight at most; a tensor waits until its
    /// share fits (one larger than the budget runs alone).
    pub memory_budget: u64,
    pub write: WriteOptions,
}

/// A recipe resolved against its opened input models ([`MergeJob::prepare`]).
pub struct MergeJob {
    pub recipe: Recipe,
    pub plan: Plan,
    /// Indexed like `plan.models`.
    pub sources: Vec<Source>,
    pub method: &'static dyn MergeMethod,
    /// The `tokenizer.json` to write instead of the copied one (a union vocabulary).
    pub tokenizer_json: Option<Vec<u8>>,
}

/// What a merge wrote.
#[derive(Debug, Clone)]
pub struct MergeSummary {
    pub out: PathBuf,
    pub tensors: usize,
    pub bytes_read: u64,
    pub bytes_written: u64,
}

impl MergeJob {
    /// The dtype the math runs in for a tensor: the recipe's `dtype`, else the
    /// first input's own.
    pub(crate) fn math_dtype(&self, tensor: &PlannedTensor) -> Dtype {
        match &self.recipe.dtype {
            Some((dtype, _)) => dtype.safetensors(),
            None => self.input_dtype(tensor, 0),
        }
    }

    fn input_dtype(&self, tensor: &PlannedTensor, input: usize) -> Dtype {
        let planned = &tensor.inputs[input];
        let checkpoint = &self.sources[planned.model].checkpoint;
        checkpoint
            .entry(&planned.tensor)
            .expect("planned from the inventory")
            .dtype
    }

    /// The saved dtype: `out_dtype`, else the math dtype.
    pub fn output_dtype(&self, tensor: &PlannedTensor) -> Dtype {
        match &self.recipe.out_dtype {
            Some((dtype, _)) => dtype.safetensors(),
            None => self.math_dtype(tensor),
        }
    }

    /// Computes one output tensor (in the output dtype, on the CPU).
    pub fn compute(&self, tensor: &PlannedTensor, seed: u64, device: Device) -> Result<Tensor> {
        let math = kind_from_dtype(self.math_dtype(tensor)).expect("float dtype");
        let torch = |cause| MergeError::Torch {
            tensor: tensor.name.clone(),
            cause,
        };
        // Inputs stored in the math dtype are mapped, not copied; every
        // tensor over a mapping is dropped before it (declared after it).
        let mut mapped = Vec::new();
        let inputs = tensor
            .inputs
            .iter()
            .map(|input| {
                let source = &self.sources[input.model];
                // Readahead of the whole tensor: large reads from the disk,
                // where a mapping's faults alone would read a window at a time.
                let entry = source.checkpoint.entry(&input.tensor)?;
                source.checkpoint.prefetch(entry);
                // SAFETY: no tensor over the mapping leaves this function:
                // an output sharing its data is copied below, before the
                // mappings go (declared first, dropped last).
                let mut t = match unsafe { source.map_as(&input.tensor, math) }? {
                    Some(m) => {
                        let t = m.tensor().shallow_clone();
                        mapped.push(m);
                        t
                    }
                    None => source.read_as(&input.tensor, math)?,
                };
                if input.transform == InputTransform::Narrow {
                    for (dim, &size) in tensor.shape.iter().enumerate() {
                        t = t.f_narrow(dim as i64, 0, size as i64).map_err(torch)?;
                    }
                }
                Ok(upload(t, device))
            })
            .collect::<Result<Vec<_>>>()?;
        // Row alignment needs every input at once (a row one model lacks is
        // filled from the others).
        let aligned = tensor
            .inputs
            .iter()
            .any(|i| i.transform == InputTransform::AlignRows);
        let inputs = match &self.plan.vocabulary {
            Some(alignment) if aligned => crate::vocabulary::align(alignment, tensor, &inputs)?,
            _ => inputs,
        };
        let cx = MergeContext {
            name: &tensor.name,
            inputs: &inputs,
            base: tensor.base,
            params: &tensor.params,
            input_params: tensor.inputs.iter().map(|i| &i.params).collect(),
            input_ids: tensor
                .inputs
                .iter()
                .map(|i| model_id(&self.plan.models[i.model]))
                .collect(),
            seed,
        };
        let out = self.method.merge(&cx).map_err(|e| match e {
            MergeError::Tensor {
                tensor: name,
                message,
            } => MergeError::Tensor {
                tensor: name,
                message: format!("{message}{}", self.parameter_lines(tensor)),
            },
            other => other,
        })?;
        let kind = kind_from_dtype(self.output_dtype(tensor)).expect("float dtype");
        let mut out = out.to_device(Device::Cpu).to_kind(kind).contiguous();
        // An output that is an input (or a view of one) would outlive the mapping.
        if mapped.iter().any(|m| m.contains(&out)) {
            out = out.copy();
        }
        // After the last read of the mapped data (the copy included).
        for m in &mapped {
            m.check()?;
        }
        Ok(out)
    }

    /// Runs the whole plan into `out`; `progress` gets the bytes of each tensor written.
    pub fn execute(
        &self,
        out: &Path,
        options: &ExecOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<MergeSummary> {
        let config = self.output_config()?;
        let writer = CheckpointWriter::create(out, self.output_specs(), &options.write)?;
        let all: Vec<&PlannedTensor> = self.plan.tensors.iter().collect();
        self.compute_into(&writer, all, options, progress, None)?;
        self.finish_output(writer, &config, out, options.seed)
    }

    /// Computes `tensors` into `writer` on the pool; returns the names of
    /// those whose NaN or ±inf values were accepted (from their inputs, or
    /// allowed).
    pub(crate) fn compute_into(
        &self,
        writer: &CheckpointWriter,
        mut tensors: Vec<&PlannedTensor>,
        options: &ExecOptions,
        progress: &(dyn Fn(u64) + Sync),
        digests: Option<&Digests>,
    ) -> Result<Vec<String>> {
        tch::set_num_threads(1);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(options.threads.max(1))
            .build()
            .map_err(|e| MergeError::Device(format!("cannot start worker threads: {e}")))?;
        let budget = Budget::new(options.memory_budget);
        let started = std::time::Instant::now();
        let accepted = Mutex::new(vec![]);
        // Largest first, taken from one queue: the big tensors run together at
        // the start (a peak the estimate can predict), the small ones balance the end.
        tensors.sort_by_key(|t| std::cmp::Reverse(self.tensor_memory(t)));
        // One thread writes while the workers compute: a worker hands its
        // output over and goes on instead of waiting for the disk. The
        // output keeps its share of the budget until it is written.
        let (handed, to_write) = std::sync::mpsc::sync_channel::<Computed<'_, '_>>(1);
        let write = |(tensor, merged, _permit): Computed<'_, '_>| -> Result<()> {
            let nonfinite = writer.write_tensor(&tensor.name, &merged)?;
            if nonfinite > 0 {
                self.check_nonfinite(tensor, nonfinite, options.write.allow_nonfinite)?;
                writer.accept_nonfinite(&tensor.name)?;
                accepted
                    .lock()
                    .expect("no panics holding it")
                    .push(tensor.name.clone());
            }
            progress(byte_len(&merged));
            Ok(())
        };
        // Set when the writer stops on an error: the workers start nothing more.
        let stopped = std::sync::atomic::AtomicBool::new(false);
        let (computed, written) = std::thread::scope(|scope| {
            let writing = scope.spawn(|| {
                let written = to_write.into_iter().try_for_each(write);
                stopped.store(written.is_err(), std::sync::atomic::Ordering::Release);
                written
            });
            let computed = pool.install(|| {
                tensors.into_iter().par_bridge().try_for_each_with(
                    handed,
                    |handed, tensor| -> Result<()> {
                        // The writer's error is reported below.
                        let not_written = || MergeError::Tensor {
                            tensor: tensor.name.clone(),
                            message: "not written: the writer stopped".into(),
                        };
                        let mut permit = budget.acquire(self.tensor_memory(tensor));
                        if stopped.load(std::sync::atomic::Ordering::Acquire) {
                            return Err(not_written());
                        }
                        let mut merged = self.compute(tensor, options.seed, options.device)?;
                        if let Some(digests) = digests {
                            // On the CPU here, so the writer does not move it again.
                            merged = merged.to_device(Device::Cpu);
                            let digest = manifest::tensor_digest(&merged);
                            digests
                                .lock()
                                .expect("no panics holding it")
                                .insert(tensor.name.clone(), digest);
                        }
                        permit.shrink(byte_len(&merged));
                        handed
                            .send((tensor, merged, permit))
                            .map_err(|_| not_written())
                    },
                )
            });
            (
                computed,
                writing.join().expect("the writer thread does not panic"),
            )
        });
        // The writer's error first: the workers may only have seen it stop.
        written.and(computed)?;
        tracing::debug!("tensors merged and written in {:.1?}", started.elapsed());
        let mut accepted = accepted.into_inner().expect("no panics holding it");
        accepted.sort();
        Ok(accepted)
    }
}

impl MergeJob {
    /// A merged tensor holds `nonfinite` NaN or ±inf values. Fine if its
    /// inputs held some too (warned) or the user allowed it; otherwise the
    /// merge made them from finite inputs, which is an error naming the
    /// tensor and the recipe lines of the parameters that shaped it.
    pub(crate) fn check_nonfinite(
        &self,
        tensor: &PlannedTensor,
        nonfinite: u64,
        allow: bool,
    ) -> Result<()> {
        let inputs_nonfinite = self.inputs_nonfinite(tensor)?;
        if inputs_nonfinite > 0 || allow {
            tracing::warn!(
                "tensor {}: {nonfinite} NaN or infinite values written ({})",
                tensor.name,
                if inputs_nonfinite > 0 {
                    format!("its inputs hold {inputs_nonfinite}")
                } else {
                    "allowed".to_owned()
                }
            );
            return Ok(());
        }
        Err(MergeError::NonFinite {
            tensor: tensor.name.clone(),
            message: format!(
                "the merge made {nonfinite} NaN or infinite values from finite inputs{}; check \
                 the weights (do they sum to zero under `normalize`? are they huge?)",
                self.parameter_lines(tensor)
            ),
        })
    }

    /// NaN or ±inf values among a planned tensor's inputs.
    pub(crate) fn inputs_nonfinite(&self, tensor: &PlannedTensor) -> Result<u64> {
        let mut count = 0;
        for input in &tensor.inputs {
            count += self.sources[input.model].count_nonfinite(&input.tensor)?;
        }
        Ok(count)
    }

    /// ` (parameters: `density: 0.9` for model `m` at r.yml:6:20, …)`: the
    /// recipe lines that set a tensor's parameters, for its error messages.
    fn parameter_lines(&self, tensor: &PlannedTensor) -> String {
        let shared = tensor.params.iter().map(|p| (None, p));
        let per_model = tensor
            .inputs
            .iter()
            .flat_map(|i| i.params.iter().map(move |p| (Some(i.model), p)));
        let mut lines: Vec<String> = vec![];
        for (model, (name, value)) in shared.chain(per_model) {
            let Some(at) = value.at else { continue };
            let whose = model
                .map(|m| format!(" for model `{}`", self.plan.models[m]))
                .unwrap_or_default();
            let line = format!(
                "`{name}: {}`{whose} at {}:{at}",
                value.value, self.recipe.source_name
            );
            if !lines.contains(&line) {
                lines.push(line);
            }
        }
        if lines.is_empty() {
            String::new()
        } else {
            format!(" (parameters: {})", lines.join(", "))
        }
    }

    /// Every planned input is stored in a dtype libtorch computes with;
    /// otherwise an error naming the model, its recipe line and the tensor.
    pub fn check_dtypes(&self) -> Result<()> {
        let located = self.recipe.referenced_models();
        for tensor in &self.plan.tensors {
            for input in &tensor.inputs {
                let entry = self.sources[input.model].checkpoint.entry(&input.tensor)?;
                if kind_from_dtype(entry.dtype).is_none() {
                    return Err(MergeError::Recipe(self.recipe.error(
                        located[input.model].at,
                        format!(
                            "model `{}`: tensor `{}` is stored as {:?}, which amalgam cannot \
                             compute with",
                            self.plan.models[input.model], input.tensor, entry.dtype
                        ),
                    )));
                }
            }
        }
        Ok(())
    }
}

/// `t` on `device`. To a GPU through page-locked host memory and without
/// waiting: the copy overlaps this thread's next read, and the other worker
/// threads' reads and merges.
fn upload(t: Tensor, device: Device) -> Tensor {
    if device.is_cuda() {
        let kind = t.kind();
        t.pin_memory(device).to_device_(device, kind, true, false)
    } else {
        t.to_device(device)
    }
}

/// Bytes of a tensor's data.
pub(crate) fn byte_len(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// A computed output on its way to the writer thread, with its share of the budget.
type Computed<'p, 'b> = (&'p PlannedTensor, Tensor, Permit<'b>);

/// The digest of each tensor's bytes as computed, by name (for a part's manifest).
pub(crate) type Digests = Mutex<std::collections::HashMap<String, manifest::Digest>>;
