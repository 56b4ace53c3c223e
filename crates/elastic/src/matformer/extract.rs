//! Extraction: a [`SliceSpec`] turned into a plan of output tensors (each a
//! copy or a strided cut of one input tensor), then written by streaming
//! bytes from the input's memory maps into the output shards — no dtype
//! conversion, so any stored dtype passes through exactly.

use std::ops::Range;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{
    Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, ModelConfig, TensorSpec, WriteOptions,
};

use amalgam_checkpoint::memory::MemoryEstimate;

use super::layout::{FfnAxis, ModelLayout, Part};
use crate::{ElasticError, Result};

/// Output bytes gathered per write when cutting a tensor, bounding memory.
const CHUNK_BYTES: usize = 64 << 20;

/// A resolved submodel: the layers that stay and each one's FFN width.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SliceSpec {
    /// Original layer indices, ascending.
    pub kept: Vec<usize>,
    /// FFN hidden units per kept layer.
    pub widths: Vec<usize>,
}

/// Keeps ranges of one axis of a tensor viewed as `[outer, axis, inner]`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Cut {
    /// The dimension cut.
    dim: usize,
    outer: usize,
    axis: usize,
    inner: usize,
    keep: Vec<Range<usize>>,
}

impl Cut {
    /// Bytes of one outer row of the source.
    fn row_bytes(&self, elem: usize) -> usize {
        self.axis * self.inner * elem
    }

    /// Whether the cut keeps at least half of each row: then reading whole
    /// rows and gathering beats one read per kept range.
    fn keeps_most(&self, elem: usize) -> bool {
        let kept: usize = self.keep.iter().map(|r| r.len()).sum::<usize>() * self.inner * elem;
        2 * kept >= self.row_bytes(elem)
    }

    /// The kept bytes of outer rows `rows` as (offset, length) runs, offsets
    /// counted from the start of row `rows.start`, in output order.
    fn runs(&self, elem: usize, rows: Range<usize>) -> impl Iterator<Item = (usize, usize)> + '_ {
        let (row_bytes, unit) = (self.row_bytes(elem), self.inner * elem);
        let first = rows.start;
        rows.flat_map(move |row| {
            self.keep
                .iter()
                .map(move |r| ((row - first) * row_bytes + r.start * unit, r.len() * unit))
        })
    }
}

/// One tensor of the submodel and where its bytes come from.
#[derive(Debug, Clone)]
struct Output {
    name: String,
    source: String,
    dtype: Dtype,
    shape: Vec<usize>,
    /// `None`: copied whole.
    cut: Option<Cut>,
}

/// The planned submodel of one checkpoint.
pub struct Extraction<'c> {
    checkpoint: &'c Checkpoint,
    pub spec: SliceSpec,
    outputs: Vec<Output>,
    pub config: ModelConfig,
}

impl<'c> Extraction<'c> {
    pub fn plan(checkpoint: &'c Checkpoint, layout: &ModelLayout, spec: SliceSpec) -> Result<Self> {
        let error = |message: String| ElasticError::Model {
            path: layout.dir.clone(),
            message,
        };
        let mut new_index = vec![None; layout.layers()];
        for (new, &old) in spec.kept.iter().enumerate() {
            new_index[old] = Some(new);
        }
        let mut outputs = vec![];
        for entry in checkpoint.tensors() {
            let (name, cut) = match layout.part(&entry.name) {
                Part::Global => (entry.name.clone(), None),
                Part::Layer { index, rest } => {
                    let Some(new) = new_index[index] else {
                        continue;
                    };
                    let cut = match layout.ffn_axis(rest) {
                        None => None,
                        Some(axis) => {
                            let (full, width) = (layout.ffn_widths[index], spec.widths[new]);
                            let (dim, parts) = match axis {
                                FfnAxis::Rows => (0, std::iter::once(0..full).collect()),
                                FfnAxis::FusedRows => (0, layout.fused_ffn_parts(full)),
                                FfnAxis::Columns => (1, std::iter::once(0..full).collect()),
                            };
                            let units = parts.last().map_or(0, |p| p.end);
                            if entry.shape.len() <= dim || entry.shape[dim] != units {
                                return Err(error(format!(
                                    "tensor {}: shape {:?}, expected {units} FFN units along dimension {dim} (as the MLP's input projection has)",
                                    entry.name, entry.shape
                                )));
                            }
                            // The first `width` units of each part (gate and up of a fused projection).
                            let keep = parts.iter().map(|p| p.start..p.start + width).collect();
                            Some(cut_along(&entry.shape, dim, units, keep))
                        }
                    };
                    (layout.layer_name(new, rest), cut)
                }
                Part::PerLayerBlocks { axis, block } => {
                    let layers = layout.layers();
                    if entry.shape.len() <= axis || entry.shape[axis] != layers * block {
                        return Err(error(format!(
                            "tensor {}: shape {:?}, expected {layers} layers × {block} along dimension {axis}",
                            entry.name, entry.shape
                        )));
                    }
                    let keep = spec
                        .kept
                        .iter()
                        .map(|&l| l * block..(l + 1) * block)
                        .collect();
                    (
                        entry.name.clone(),
                        Some(cut_along(&entry.shape, axis, layers * block, keep)),
                    )
                }
            };
            let mut shape = entry.shape.clone();
            if let Some(cut) = &cut {
                shape[cut.dim] = cut.keep.iter().map(|r| r.len()).sum();
            }
            outputs.push(Output {
                name,
                source: entry.name.clone(),
                dtype: entry.dtype,
                shape,
                cut,
            });
        }
        let config = layout.rewrite_config(checkpoint.config(), &spec.kept, &spec.widths)?;
        Ok(Self {
            checkpoint,
            spec,
            outputs,
            config,
        })
    }

    /// Parameters of the submodel (every output tensor's elements).
    pub fn parameters(&self) -> u64 {
        self.outputs
            .iter()
            .map(|o| o.shape.iter().map(|&d| d as u64).product::<u64>())
            .sum()
    }

    /// Bytes the submodel's tensors occupy (what a plain copy would move).
    pub fn bytes(&self) -> u64 {
        self.specs().iter().map(TensorSpec::byte_len).sum()
    }

    /// What writing holds: a cut tensor's output gathered a chunk at a time
    /// (whole tensors go from the input's maps to the output as they are).
    pub fn memory(&self) -> MemoryEstimate {
        let largest = self.specs().iter().map(TensorSpec::byte_len).max();
        MemoryEstimate::new().phase(
            "one gathered write",
            largest.unwrap_or(0).min(CHUNK_BYTES as u64),
        )
    }

    fn specs(&self) -> Vec<TensorSpec> {
        self.outputs
            .iter()
            .map(|o| TensorSpec::new(o.name.clone(), o.dtype, o.shape.clone()))
            .collect()
    }

    /// Writes the submodel to `out` (atomically: a hidden sibling renamed
    /// into place when complete); `on_bytes(n)` as data is written.
    pub fn write(
        &self,
        out: &Path,
        options: &WriteOptions,
        card: &ModelCard,
        on_bytes: &mut dyn FnMut(u64),
    ) -> Result<PathBuf> {
        let writer = CheckpointWriter::create(out, self.specs(), options)?;
        let (mut source, mut kept) = (vec![], vec![]);
        for (i, output) in self.outputs.iter().enumerate() {
            let entry = self.checkpoint.entry(&output.source)?;
            if let Some(next) = self.outputs.get(i + 1) {
                self.checkpoint
                    .prefetch(self.checkpoint.entry(&next.source)?);
            }
            // A byte copy: non-finite values can only be the input's own.
            writer.accept_nonfinite(&output.name)?;
            let mut written = 0u64;
            let mut write = |piece: &[u8]| -> Result<()> {
                writer.write_part(&output.name, written, piece)?;
                written += piece.len() as u64;
                on_bytes(piece.len() as u64);
                Ok(())
            };
            // Copied a chunk at a time: whole tensors in chunks; cut tensors
            // keeping most of each row as blocks of whole source rows (one
            // read each) gathered in memory; otherwise only the kept ranges
            // are read, one read each, gathered into chunks.
            let elem = output.dtype.bitsize() / 8;
            let len = (entry.byte_range.end - entry.byte_range.start) as usize;
            match &output.cut {
                None => {
                    for start in (0..len).step_by(CHUNK_BYTES) {
                        source.resize(CHUNK_BYTES.min(len - start), 0);
                        self.checkpoint
                            .read_range(entry, start as u64, &mut source)?;
                        write(&source)?;
                    }
                }
                Some(cut) if cut.row_bytes(elem) <= CHUNK_BYTES && cut.keeps_most(elem) => {
                    let rows_per_block = CHUNK_BYTES / cut.row_bytes(elem).max(1);
                    for first in (0..cut.outer).step_by(rows_per_block) {
                        let rows = first..(first + rows_per_block).min(cut.outer);
                        source.resize(rows.len() * cut.row_bytes(elem), 0);
                        let at = (first * cut.row_bytes(elem)) as u64;
                        self.checkpoint.read_range(entry, at, &mut source)?;
                        kept.clear();
                        for (start, n) in cut.runs(elem, rows) {
                            kept.extend_from_slice(&source[start..start + n]);
                        }
                        write(&kept)?;
                    }
                }
                Some(cut) => {
                    // Each kept range read on its own, gathered into chunks.
                    kept.clear();
                    for (start, n) in cut.runs(elem, 0..cut.outer) {
                        let mut done = 0;
                        while done < n {
                            let take = (n - done).min(CHUNK_BYTES - kept.len());
                            let at = kept.len();
                            kept.resize(at + take, 0);
                            let from = (start + done) as u64;
                            self.checkpoint.read_range(entry, from, &mut kept[at..])?;
                            done += take;
                            if kept.len() == CHUNK_BYTES {
                                write(&kept)?;
                                kept.clear();
                            }
                        }
                    }
                    if !kept.is_empty() {
                        write(&kept)?;
                    }
                }
            }
        }
        Ok(writer.finish(Finish {
            config: &self.config,
            tokenizer_source: Some(self.checkpoint.dir()),
            chat_template: None,
            extra_files: &[],
            card,
        })?)
    }
}

/// The cut keeping `keep` of dimension `dim` (of length `len`) of `shape`.
fn cut_along(shape: &[usize], dim: usize, len: usize, keep: Vec<Range<usize>>) -> Cut {
    let mut merged: Vec<Range<usize>> = vec![];
    for r in keep {
        match merged.last_mut() {
            Some(last) if last.end == r.start => last.end = r.end,
            _ => merged.push(r),
        }
    }
    Cut {
        dim,
        outer: shape[..dim].iter().product(),
        axis: len,
        inner: shape[dim + 1..].iter().product(),
        keep: merged,
    }
}
