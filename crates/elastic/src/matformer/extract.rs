//! Extraction: a [`SliceSpec`] turned into a plan of output tensors (each a
//! copy or a strided cut of one input tensor), then written by streaming
//! bytes from the input's memory maps into the output shards — no dtype
//! conversion, so any stored dtype passes through exactly.

use std::ops::Range;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{
    Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, ModelConfig, TensorSpec, WriteOptions,
};

use super::layout::{ffn_axis, FfnAxis, ModelLayout, Part};
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
    fn kept_per_outer(&self) -> usize {
        self.keep.iter().map(|r| r.len()).sum::<usize>() * self.inner
    }

    /// Appends the kept elements of outer rows `rows` to `out`.
    fn gather(&self, src: &[u8], elem: usize, rows: Range<usize>, out: &mut Vec<u8>) {
        let row_bytes = self.axis * self.inner * elem;
        for row in rows {
            let start = row * row_bytes;
            for r in &self.keep {
                out.extend_from_slice(
                    &src[start + r.start * self.inner * elem..start + r.end * self.inner * elem],
                );
            }
        }
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
                    let cut = match ffn_axis(rest) {
                        None => None,
                        Some(axis) => {
                            let (full, width) = (layout.ffn_widths[index], spec.widths[new]);
                            let dim = match axis {
                                FfnAxis::Rows => 0,
                                FfnAxis::Columns => 1,
                            };
                            if entry.shape.len() <= dim || entry.shape[dim] != full {
                                return Err(error(format!(
                                    "tensor {}: shape {:?}, expected {full} FFN units along dimension {dim} (as gate_proj has)",
                                    entry.name, entry.shape
                                )));
                            }
                            Some(cut_along(
                                &entry.shape,
                                dim,
                                full,
                                std::iter::once(0..width).collect(),
                            ))
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
        for (i, output) in self.outputs.iter().enumerate() {
            let entry = self.checkpoint.entry(&output.source)?;
            if let Some(next) = self.outputs.get(i + 1) {
                self.checkpoint
                    .prefetch(self.checkpoint.entry(&next.source)?);
            }
            let src = self.checkpoint.bytes(entry);
            match &output.cut {
                None => {
                    writer.write_bytes(&output.name, src)?;
                    on_bytes(src.len() as u64);
                }
                Some(cut) => {
                    let elem = output.dtype.bitsize() / 8;
                    let row_bytes = cut.kept_per_outer() * elem;
                    let rows_per_chunk = (CHUNK_BYTES / row_bytes.max(1)).max(1);
                    let mut buffer = Vec::with_capacity(rows_per_chunk.min(cut.outer) * row_bytes);
                    let mut offset = 0u64;
                    for first in (0..cut.outer).step_by(rows_per_chunk) {
                        buffer.clear();
                        cut.gather(
                            src,
                            elem,
                            first..(first + rows_per_chunk).min(cut.outer),
                            &mut buffer,
                        );
                        writer.write_part(&output.name, offset, &buffer)?;
                        offset += buffer.len() as u64;
                        on_bytes(buffer.len() as u64);
                    }
                }
            }
            self.checkpoint.release(entry);
        }
        Ok(writer.finish(Finish {
            config: &self.config,
            tokenizer_source: Some(self.checkpoint.dir()),
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
