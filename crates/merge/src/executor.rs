//! Runs a plan: read each output tensor's inputs, cast them to the math dtype,
//! apply the method, cast to the output dtype and stream the result to the
//! writer. Output tensors are independent, so they run in parallel on a rayon
//! pool, and one more thread writes them as they come; libtorch's own threads
//! are pinned to one so that every tensor is computed the same way whatever
//! the thread count (bit-identical outputs).

use std::path::{Path, PathBuf};
use std::sync::{Condvar, Mutex};

use amalgam_checkpoint::arch::{
    layer_index, locate, restack_layer_lists, LayerOrigin, PER_LAYER_CONFIG_FIELDS,
};
use amalgam_checkpoint::family::{self, Place};
use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_checkpoint::{
    kind_from_dtype, parts, Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, ModelConfig,
    TensorSpec, WriteOptions,
};
use amalgam_recipe::{
    ChatTemplate, InputTransform, InventoryTensor, LayerRef, ModelInventory, Plan, PlannedTensor,
    Recipe,
};
use rayon::prelude::*;
use serde_json::Value;
use tch::{Device, Tensor};

use crate::source::Source;
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

/// The recipe's chat template; for `auto`, the template most of `inputs`
/// carry (the first of equals in recipe order), none if none has one.
pub fn chat_template<'c>(
    recipe: &Recipe,
    inputs: impl Iterator<Item = &'c Checkpoint>,
) -> Result<Option<String>> {
    match &recipe.chat_template {
        None => return Ok(None),
        Some(ChatTemplate::Text(text)) => return Ok(Some(text.clone())),
        Some(ChatTemplate::Auto) => {}
    }
    let mut counts: Vec<(String, usize)> = vec![];
    for checkpoint in inputs {
        let Some(found) = checkpoint.chat_template()? else {
            continue;
        };
        let found = found.trim().to_owned();
        match counts.iter_mut().find(|(t, _)| *t == found) {
            Some((_, n)) => *n += 1,
            None => counts.push((found, 1)),
        }
    }
    let most = counts.iter().map(|(_, n)| *n).max();
    let chosen = counts.into_iter().find(|(_, n)| Some(*n) == most);
    if chosen.is_none() {
        tracing::warn!("`chat_template: auto`: no input model has a chat template; none written");
    }
    Ok(chosen.map(|(t, _)| t))
}

impl MergeJob {
    /// The dtype the math runs in for a tensor: the recipe's `dtype`, else the
    /// first input's own.
    fn math_dtype(&self, tensor: &PlannedTensor) -> Dtype {
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

    pub fn output_specs(&self) -> Vec<TensorSpec> {
        self.plan
            .tensors
            .iter()
            .map(|t| TensorSpec::new(&t.name, self.output_dtype(t), t.shape.clone()))
            .collect()
    }

    /// The output's `config.json`: the layout model's, with the layer count,
    /// vocabulary and FFN width of the planned tensors, and every per-layer
    /// list following the layers stacked (each entry from the config of the
    /// model and layer it comes from). Layers of different FFN widths are
    /// refused unless the config already holds per-layer widths: one integer
    /// `intermediate_size` cannot describe them, and transformers would not
    /// load the model.
    pub fn output_config(&self) -> Result<ModelConfig> {
        let layout = self.sources[self.plan.layout_model].checkpoint.config();
        let mut config = layout.clone();
        config.set_layer_count(self.plan.layers);
        if let Some(embedding) = self
            .plan
            .tensors
            .iter()
            .find(|t| family::is_embedding(family::of(layout), &t.name))
        {
            config.set("vocab_size", embedding.shape[0].into());
        }
        // Where each output layer comes from: (model, layer) of its first input.
        let mut sources: Vec<Option<(usize, usize)>> = vec![None; self.plan.layers];
        let mut widths: Vec<Option<usize>> = vec![None; self.plan.layers];
        for tensor in &self.plan.tensors {
            let Some(layer) = layer_index(&tensor.name) else {
                continue;
            };
            let input = &tensor.inputs[0];
            if let Some(from) = layer_index(&input.tensor) {
                sources[layer].get_or_insert((input.model, from));
            }
            if let Some(width) = family::mlp_width(family::of(layout), &tensor.name, &tensor.shape)
            {
                widths[layer] = Some(width);
            }
        }
        let lists = PER_LAYER_CONFIG_FIELDS
            .iter()
            .any(|field| matches!(config.get(field), Some(Value::Array(_))));
        let origins = sources
            .iter()
            .take(if lists { sources.len() } else { 0 })
            .enumerate()
            .map(|(layer, source)| {
                let (model, from) = source.ok_or_else(|| {
                    self.config_error(format!(
                        "output layer {layer} has no tensors to take its per-layer config \
                         entries from"
                    ))
                })?;
                let config = self.sources[model].checkpoint.config().fields();
                Ok(LayerOrigin {
                    config,
                    layer: from,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let mut fields = config.fields().clone();
        restack_layer_lists(&mut fields, &origins).map_err(|(field, layer)| {
            let (model, from) = sources[layer].expect("every origin is known");
            self.config_error(format!(
                "model `{}` has no `{field}` entry for its layer {from}",
                self.plan.models[model]
            ))
        })?;
        let mut config = ModelConfig::from_json(fields);
        let known: Vec<(usize, usize)> = widths
            .iter()
            .enumerate()
            .filter_map(|(layer, w)| Some((layer, (*w)?)))
            .collect();
        if let Some(&(first_layer, first)) = known.first() {
            let odd = known.iter().find(|(_, w)| *w != first);
            match (layout.get("intermediate_size"), odd) {
                (Some(Value::Array(_)), _) => {} // per-layer widths, set above
                (_, None) => config.set("intermediate_size", first.into()),
                (_, Some(&(layer, width))) => {
                    return Err(self.config_error(format!(
                        "the stacked layers have different FFN widths (layer {first_layer}: \
                         {first}, layer {layer}: {width}), but `{}` configs hold one integer \
                         `intermediate_size`, so the output would not load; stack layers of \
                         one width",
                        layout.model_type().unwrap_or("this model's")
                    )))
                }
            }
        }
        Ok(config)
    }

    fn config_error(&self, message: String) -> MergeError {
        MergeError::Config {
            model: self.plan.models[self.plan.layout_model].clone(),
            message,
        }
    }

    /// Bytes of input tensor data the plan reads.
    pub fn bytes_to_read(&self) -> u64 {
        self.plan
            .tensors
            .iter()
            .flat_map(|t| &t.inputs)
            .map(|i| {
                let entry = self.sources[i.model]
                    .checkpoint
                    .entry(&i.tensor)
                    .expect("planned");
                entry.byte_range.end - entry.byte_range.start
            })
            .sum()
    }

    /// The memory one output tensor needs while it is computed: its inputs in
    /// the math dtype, the method's working copies (the output among them),
    /// and the cast to the output dtype if it differs.
    pub fn tensor_memory(&self, tensor: &PlannedTensor) -> u64 {
        let numel: u64 = tensor.shape.iter().map(|&d| d as u64).product();
        let (math, out) = (self.math_dtype(tensor), self.output_dtype(tensor));
        let copies = tensor.inputs.len() + self.method.working_copies(tensor.inputs.len(), numel);
        let copies = copies as u64;
        // A cast to a different output dtype is one more copy.
        let cast = if out == math {
            0
        } else {
            (out.bitsize() / 8) as u64
        };
        numel * (copies * (math.bitsize() / 8) as u64 + cast)
    }

    /// The budget used when none is given: room for every thread to hold a
    /// typical tensor, where typical is the largest need once the biggest
    /// tensors holding a tenth of all entries (embeddings, heads) are set
    /// aside; never below the largest single need and never above `cap`.
    /// Those few largest tensors then run apart, so peak memory follows the
    /// thread count and a layer's size, not the model's: a 7B merge stays
    /// near its 1B figure.
    pub fn default_memory_budget(&self, threads: usize, cap: u64) -> u64 {
        let sized: Vec<(u64, u64)> = self
            .plan
            .tensors
            .iter()
            .map(|t| {
                let numel = t.shape.iter().map(|&d| d as u64).product();
                (self.tensor_memory(t), numel)
            })
            .collect();
        typical_budget(sized, threads, cap)
    }

    /// Peak memory with `threads` tensors in flight under `budget`: the
    /// executor starts with the largest tensors, so the peak is the largest
    /// ones running together, as many as fit, plus the process.
    pub fn memory_estimate(&self, threads: usize, budget: u64) -> MemoryEstimate {
        let mut needs: Vec<u64> = self
            .plan
            .tensors
            .iter()
            .map(|t| self.tensor_memory(t))
            .collect();
        needs.sort_unstable_by(|a, b| b.cmp(a));
        let mut peak = needs.first().copied().unwrap_or(0);
        for window in needs.windows(threads.max(1)) {
            let mut together = 0;
            for &need in window {
                if together + need > budget && together > 0 {
                    break;
                }
                together += need;
            }
            peak = peak.max(together);
        }
        MemoryEstimate::new().phase("the largest tensors in flight together", peak)
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

    /// Which of `count` parts computes each planned tensor (0-based, in plan
    /// order): largest first, each to the part with the fewest bytes so far
    /// (ties: the lowest), so the parts are balanced by bytes written. Only
    /// the first parts, as many as there are tensors, can get any, so that
    /// is all it keeps track of, whatever `count` is.
    pub fn part_assignment(&self, count: usize) -> Vec<usize> {
        let specs = self.output_specs();
        let mut order: Vec<usize> = (0..specs.len()).collect();
        order.sort_by(|&a, &b| {
            (std::cmp::Reverse(specs[a].byte_len()), &specs[a].name)
                .cmp(&(std::cmp::Reverse(specs[b].byte_len()), &specs[b].name))
        });
        // The least loaded part, lowest first among equals: (load, part).
        let mut load: std::collections::BinaryHeap<std::cmp::Reverse<(u64, usize)>> = (0..count
            .clamp(1, specs.len().max(1)))
            .map(|p| std::cmp::Reverse((0, p)))
            .collect();
        let mut assignment = vec![0; specs.len()];
        for t in order {
            let std::cmp::Reverse((bytes, part)) = load.pop().expect("at least one part");
            load.push(std::cmp::Reverse((bytes + specs[t].byte_len(), part)));
            assignment[t] = part;
        }
        assignment
    }

    /// The planned tensors (indices) of part `part` (1-based) of `count`.
    fn part_tensors(&self, part: usize, count: usize) -> Vec<usize> {
        let assignment = self.part_assignment(count);
        (0..assignment.len())
            .filter(|&i| assignment[i] + 1 == part)
            .collect()
    }

    /// Computes part `part` (1-based) of `count` (at most
    /// [`parts::MAX_PARTS`]) into `OUT.parts/part-I-of-N/` (see
    /// [`amalgam_checkpoint::parts`]), its manifest holding the digest of
    /// every tensor's bytes; [`MergeJob::join`] makes the output once every
    /// part is written.
    pub fn execute_part(
        &self,
        out: &Path,
        part: usize,
        count: usize,
        options: &ExecOptions,
        progress: &(dyn Fn(u64) + Sync),
    ) -> Result<MergeSummary> {
        parts::check_numbers(part, count)
            .map_err(|message| MergeError::Part(format!("--part {part}/{count}: {message}")))?;
        self.output_config()?;
        let indices = self.part_tensors(part, count);
        let all_specs = self.output_specs();
        let mine: Vec<&PlannedTensor> = indices.iter().map(|&i| &self.plan.tensors[i]).collect();
        let specs: Vec<TensorSpec> = indices.iter().map(|&i| all_specs[i].clone()).collect();
        let bytes_written = specs.iter().map(TensorSpec::byte_len).sum();
        let write = WriteOptions {
            max_shard_bytes: u64::MAX,
            ..options.write.clone()
        };
        let dir = parts::part_dir(out, part, count);
        let writer = CheckpointWriter::create(&dir, specs.clone(), &write)?;
        let digests = Mutex::new(std::collections::HashMap::new());
        let accepted = self.compute_into(&writer, mine, options, progress, Some(&digests))?;
        let mut digests = digests.into_inner().expect("no panics holding it");
        let tensors = specs
            .into_iter()
            .map(|spec| {
                let digest = digests
                    .remove(&spec.name)
                    .expect("every computed tensor is digested");
                (spec, digest)
            })
            .collect::<Vec<_>>();
        let count_tensors = tensors.len();
        let manifest = parts::PartManifest::new(
            part,
            count,
            options.seed,
            &self.recipe.text,
            options.write.allow_nonfinite,
            tensors,
            accepted,
        );
        let out = writer.finish_part(&manifest.to_json())?;
        Ok(MergeSummary {
            out,
            tensors: count_tensors,
            bytes_read: self.bytes_to_read(),
            bytes_written,
        })
    }

    /// Writes `out` from the parts [`MergeJob::execute_part`] wrote (all of
    /// them, of this recipe, one seed), byte for byte the checkpoint one
    /// process would have written; removes the parts when done. Every
    /// manifest is checked before anything is written (its checksum, this
    /// recipe, one seed, the tensors the plan gives its part, and
    /// `--allow-nonfinite` here if the part needed it), every tensor's bytes
    /// against its manifest's digest as they are copied, and their NaN or
    /// ±inf values as a single process checks them; a join that fails
    /// leaves no output and the parts as they were.
    pub fn join(&self, out: &Path, options: &ExecOptions) -> Result<MergeSummary> {
        let config = self.output_config()?;
        let found = parts::find_parts(out)?;
        let parts_dir = parts::parts_dir(out);
        let bad = |message: String| MergeError::Part(format!("{}: {message}", parts_dir.display()));
        let Some(&(_, count, _)) = found.first() else {
            return Err(bad("no parts (write them with --part I/N)".into()));
        };
        // Names are checked (1 ≤ I ≤ N ≤ MAX_PARTS, no duplicates): one N and
        // N of them make the whole.
        if found.len() != count || found.iter().any(|&(_, n, _)| n != count) {
            let numbers: Vec<(usize, usize)> = found.iter().map(|&(p, n, _)| (p, n)).collect();
            let mut missing: Vec<String> = (1..=count)
                .filter(|&p| !numbers.contains(&(p, count)))
                .map(|p| format!("part-{p}-of-{count}"))
                .collect();
            if missing.len() > 8 {
                let more = missing.len() - 8;
                missing.truncate(8);
                missing.push(format!("and {more} more"));
            }
            let mut shown: Vec<String> = numbers.iter().map(|(p, n)| format!("{p}/{n}")).collect();
            if shown.len() > 8 {
                let more = shown.len() - 8;
                shown.truncate(8);
                shown.push(format!("and {more} more"));
            }
            return Err(bad(if missing.is_empty() {
                format!(
                    "the parts do not make one whole: found {}, parts of splits into different \
                     numbers of parts",
                    shown.join(", ")
                )
            } else {
                format!(
                    "the parts do not make one whole: found {}, missing {}",
                    shown.join(", "),
                    missing.join(", ")
                )
            }));
        }
        let all_specs = self.output_specs();
        // Each part's planned tensors, assigned once (not once per part).
        let mut planned_of: Vec<Vec<&TensorSpec>> = vec![vec![]; count];
        for (i, part) in self.part_assignment(count).into_iter().enumerate() {
            planned_of[part].push(&all_specs[i]);
        }
        let by_name: std::collections::HashMap<&str, &PlannedTensor> = self
            .plan
            .tensors
            .iter()
            .map(|t| (t.name.as_str(), t))
            .collect();
        let planned = |name: &str| {
            by_name
                .get(name)
                .copied()
                .ok_or_else(|| MergeError::Part(format!("tensor {name} is not in the plan")))
        };
        let mut seed = None;
        let mut manifests = vec![];
        for (part, _, dir) in &found {
            let manifest = parts::read_manifest(dir)?;
            let at = |message: &str| {
                MergeError::Part(format!("{}: part {part}: {message}", dir.display()))
            };
            if (manifest.part, manifest.count) != (*part, count) {
                return Err(at(&format!(
                    "its manifest is part {} of {}",
                    manifest.part, manifest.count
                )));
            }
            if manifest.recipe != self.recipe.text {
                return Err(at("written for another recipe"));
            }
            if *seed.get_or_insert(manifest.seed) != manifest.seed {
                return Err(at("written with another --seed than part 1"));
            }
            let mut mine = std::mem::take(&mut planned_of[part - 1]);
            let mut listed = manifest.specs();
            mine.sort_by(|a, b| a.name.cmp(&b.name));
            listed.sort_by(|a, b| a.name.cmp(&b.name));
            if !mine.iter().copied().eq(listed.iter()) {
                return Err(at("holds other tensors than this plan gives it"));
            }
            if manifest.allow_nonfinite && !options.write.allow_nonfinite {
                for name in &manifest.accepted_nonfinite {
                    if self.inputs_nonfinite(planned(name)?)? == 0 {
                        return Err(at(&format!(
                            "computed with --allow-nonfinite, it holds NaN or infinite values \
                             in tensor {name} made from finite inputs; join with \
                             --allow-nonfinite to write them"
                        )));
                    }
                }
            }
            manifests.push(manifest);
        }
        let writer = CheckpointWriter::create(out, all_specs, &options.write)?;
        for ((part, _, dir), manifest) in found.iter().zip(&manifests) {
            let vouched: std::collections::HashSet<&str> = manifest
                .accepted_nonfinite
                .iter()
                .map(String::as_str)
                .collect();
            for copied in parts::copy_part(dir, manifest, &writer)? {
                if copied.nonfinite == 0 {
                    continue;
                }
                if !vouched.contains(copied.name.as_str()) {
                    return Err(MergeError::Part(format!(
                        "{}: part {part}: tensor {} holds {} NaN or infinite values its \
                         manifest does not vouch for",
                        dir.display(),
                        copied.name,
                        copied.nonfinite
                    )));
                }
                // As a single process would: from non-finite inputs, or allowed here.
                let tensor = planned(&copied.name)?;
                self.check_nonfinite(tensor, copied.nonfinite, options.write.allow_nonfinite)?;
                writer.accept_nonfinite(&copied.name)?;
            }
        }
        let summary = self.finish_output(writer, &config, out, seed.unwrap_or(0))?;
        // The output is complete and in place: a part left behind is only disk space.
        if let Err(e) = std::fs::remove_dir_all(&parts_dir) {
            tracing::warn!(
                "{}: the join is done, but the parts could not be removed: {e}",
                parts_dir.display()
            );
        }
        Ok(summary)
    }

    /// Computes `tensors` into `writer` on the pool; returns the names of
    /// those whose NaN or ±inf values were accepted (from their inputs, or
    /// allowed).
    fn compute_into(
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
                            let digest = parts::tensor_digest(&merged);
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

    /// The output's card, config and files around the written tensors, committed.
    fn finish_output(
        &self,
        writer: CheckpointWriter,
        config: &ModelConfig,
        out: &Path,
        seed: u64,
    ) -> Result<MergeSummary> {
        let base = self.recipe.base_model.as_ref().map(|b| b.path.as_str());
        let inputs = self
            .plan
            .models
            .iter()
            .zip(&self.sources)
            .map(|(path, source)| {
                let role = if Some(path.as_str()) == base {
                    "base"
                } else {
                    "model"
                };
                source.records(role)
            })
            .collect::<Result<Vec<_>>>()?
            .concat();
        let card = ModelCard {
            title: out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            summary: format!(
                "A merge of {} models with the `{}` method, made by amalgam from the recipe below (seed {}).",
                self.plan.models.len(),
                self.plan.method,
                seed
            ),
            recipe: Some(self.recipe.text.clone()),
            inputs,
        };
        let mut extra: Vec<(&str, Vec<u8>)> =
            vec![("mergekit_config.yml", self.recipe.text.clone().into_bytes())];
        if let Some(tokenizer) = &self.tokenizer_json {
            extra.push(("tokenizer.json", tokenizer.clone()));
        }
        let chat_template = self.chat_template()?;
        let bytes_written = writer.layout().total_bytes();
        let out = writer.finish(Finish {
            config,
            tokenizer_source: Some(self.sources[self.plan.tokenizer_model].dir()),
            chat_template: chat_template.as_deref(),
            extra_files: &extra,
            card: &card,
        })?;
        Ok(MergeSummary {
            out,
            tensors: self.plan.tensors.len(),
            bytes_read: self.bytes_to_read(),
            bytes_written,
        })
    }
}

impl MergeJob {
    /// A merged tensor holds `nonfinite` NaN or ±inf values. Fine if its
    /// inputs held some too (warned) or the user allowed it; otherwise the
    /// merge made them from finite inputs, which is an error naming the
    /// tensor and the recipe lines of the parameters that shaped it.
    fn check_nonfinite(&self, tensor: &PlannedTensor, nonfinite: u64, allow: bool) -> Result<()> {
        let inputs_nonfinite = self.inputs_nonfinite(tensor)?;
        if inputs_nonfinite > 0 || allow {
            tracing::warn!(
                "tensor {}: {nonfinite} NaN or infinite values written ({})",
                tensor.name,
                if inputs_nonfinite > 0 {
                    format!("its inputs hold {inputs_nonfinite}")
                } else {
                    "--allow-nonfinite".to_owned()
                }
            );
            return Ok(());
        }
        Err(MergeError::Tensor {
            tensor: tensor.name.clone(),
            message: format!(
                "the merge made {nonfinite} NaN or infinite values from finite inputs{}; check \
                 the weights (do they sum to zero under `normalize`? are they huge?), or pass \
                 --allow-nonfinite to write them anyway",
                self.parameter_lines(tensor)
            ),
        })
    }

    /// NaN or ±inf values among a planned tensor's inputs.
    fn inputs_nonfinite(&self, tensor: &PlannedTensor) -> Result<u64> {
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

    /// The recipe's chat template (see [`chat_template`]).
    pub fn chat_template(&self) -> Result<Option<String>> {
        chat_template(&self.recipe, self.sources.iter().map(|s| &s.checkpoint))
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

/// What the planner needs of an input checkpoint: its tensors (layer, role;
/// a tied head as an alias of the embedding) and its layer count.
pub fn inventory(checkpoint: &Checkpoint) -> amalgam_checkpoint::Result<ModelInventory> {
    let family = family::of(checkpoint.config());
    let mut tensors: Vec<InventoryTensor> = checkpoint
        .tensors()
        .iter()
        .map(|t| {
            let (place, vocab) = family::placement(family, &t.name);
            InventoryTensor {
                name: t.name.clone(),
                shape: t.shape.clone(),
                layer: locate(&t.name).map(|(index, digits)| LayerRef { index, digits }),
                vocab,
                before_layers: place == Some(Place::BeforeLayers),
                tied_alias: false,
                buffer: family::is_buffer(family, &t.name),
            }
        })
        .collect();
    let head = family::head_name(family);
    let has_head = tensors.iter().any(|t| t.name == head);
    if checkpoint.is_tied() && !has_head {
        if let Ok(embedding) = checkpoint.entry(&head) {
            tensors.push(InventoryTensor {
                name: head,
                shape: embedding.shape.clone(),
                layer: None,
                vocab: true,
                before_layers: false,
                tied_alias: true,
                buffer: false,
            });
        }
    }
    let layers = checkpoint.layers()?;
    Ok(ModelInventory { tensors, layers })
}

/// A model's identity for random streams: a hash of its path as the recipe writes it.
pub fn model_id(path: &str) -> u64 {
    amalgam_checkpoint::stream_seed(0, path, 0)
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

/// [`MergeJob::default_memory_budget`] over each tensor's (need, entries).
fn typical_budget(mut sized: Vec<(u64, u64)>, threads: usize, cap: u64) -> u64 {
    sized.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = sized.iter().map(|&(_, numel)| numel).sum();
    let largest = sized.first().map_or(0, |&(need, _)| need);
    let mut set_aside = 0;
    let typical = sized
        .iter()
        .find(|&&(_, numel)| {
            set_aside += numel;
            set_aside * 10 > total
        })
        .map_or(0, |&(need, _)| need);
    (threads.max(1) as u64 * typical).max(largest).min(cap)
}

/// A byte budget shared by the worker threads.
struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

struct Permit<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit (or nothing else is running).
    fn acquire(&self, bytes: u64) -> Permit<'_> {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + bytes > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += bytes;
        Permit {
            budget: self,
            bytes,
        }
    }
}

impl Permit<'_> {
    /// Gives back all but `bytes` of this permit.
    fn shrink(&mut self, bytes: u64) {
        if bytes < self.bytes {
            *self.budget.used.lock().expect("budget lock") -= self.bytes - bytes;
            self.bytes = bytes;
            self.budget.freed.notify_all();
        }
    }
}

/// Bytes of a tensor's data.
fn byte_len(t: &Tensor) -> u64 {
    (t.numel() * t.kind().elt_size_in_bytes()) as u64
}

/// A computed output on its way to the writer thread, with its share of the budget.
type Computed<'p, 'b> = (&'p PlannedTensor, Tensor, Permit<'b>);

/// The digest of each tensor's bytes as computed, by name (for a part's manifest).
type Digests = Mutex<std::collections::HashMap<String, parts::Digest>>;

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock().expect("budget lock") -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::typical_budget;

    /// Mistral-7B's tensors (entries) at 8 bytes each (base + 2 BF16 and the output).
    fn mistral_7b() -> Vec<(u64, u64)> {
        let (hidden, inter, kv, vocab) = (4096u64, 14336, 1024, 32000);
        let layer = [
            hidden * hidden,
            hidden * kv,
            hidden * kv,
            hidden * hidden,
            hidden * inter,
            hidden * inter,
            inter * hidden,
            hidden,
            hidden,
        ];
        let mut numels = vec![vocab * hidden, vocab * hidden, hidden];
        (0..32).for_each(|_| numels.extend(layer));
        numels.into_iter().map(|n| (8 * n, n)).collect()
    }

    #[test]
    fn the_default_budget_keeps_the_largest_tensors_apart_and_pairs_the_layers() {
        let (embedding, mlp) = (8 * 32000 * 4096, 8 * 4096 * 14336);
        let unlimited = u64::MAX;
        // Two threads: an MLP matrix each fits; the embedding and the head do not.
        let budget = typical_budget(mistral_7b(), 2, unlimited);
        assert_eq!(budget, embedding);
        assert!(2 * mlp <= budget && 2 * embedding > budget);
        // More threads: room for each to hold an MLP matrix.
        assert_eq!(typical_budget(mistral_7b(), 16, unlimited), 16 * mlp);
        // Never above the cap; a model of one tensor: room for it on every thread.
        assert_eq!(typical_budget(mistral_7b(), 16, 3 * mlp), 3 * mlp);
        assert_eq!(typical_budget(vec![(80, 10)], 4, unlimited), 320);
    }
}
