//! Split merges: one plan computed by several processes (`--part I/N`),
//! each part balanced by bytes and written with a manifest of digests, and
//! joined (`--join`) into the checkpoint one process would have written.

use std::path::Path;
use std::sync::Mutex;

use amalgam_checkpoint::{CheckpointWriter, TensorSpec, WriteOptions};
use amalgam_recipe::PlannedTensor;

pub mod manifest;

use crate::executor::{ExecOptions, MergeJob, MergeSummary};
use crate::{MergeError, Result};

impl MergeJob {
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
    /// [`manifest::MAX_PARTS`]) into `OUT.parts/part-I-of-N/` (see
    /// [`manifest`]), its manifest holding the digest of
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
        manifest::check_numbers(part, count)
            .map_err(|message| MergeError::Part(format!("part {part}/{count}: {message}")))?;
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
        let dir = manifest::part_dir(out, part, count);
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
        let manifest = manifest::PartManifest::new(
            part,
            count,
            options.seed,
            &self.recipe.text,
            options.write.allow_nonfinite,
            tensors,
            accepted,
        );
        let out = writer.finish_part(manifest::MANIFEST, &manifest.to_json())?;
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
    /// non-finite values allowed here if the part needed them), every tensor's bytes
    /// against its manifest's digest as they are copied, and their NaN or
    /// ±inf values as a single process checks them; a join that fails
    /// leaves no output and the parts as they were.
    pub fn join(&self, out: &Path, options: &ExecOptions) -> Result<MergeSummary> {
        let config = self.output_config()?;
        let found = manifest::find_parts(out)?;
        let parts_dir = manifest::parts_dir(out);
        let bad = |message: String| MergeError::Part(format!("{}: {message}", parts_dir.display()));
        let Some(&(_, count, _)) = found.first() else {
            return Err(MergeError::NoParts { dir: parts_dir });
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
            let manifest = manifest::read_manifest(dir)?;
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
                return Err(at("written with another seed than part 1"));
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
                        return Err(MergeError::NonFinite {
                            tensor: name.clone(),
                            message: format!(
                                "{}: part {part}, computed allowing non-finite values, holds \
                                 NaN or infinite values made from finite inputs",
                                dir.display()
                            ),
                        });
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
            for copied in manifest::copy_part(dir, manifest, &writer)? {
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
}
