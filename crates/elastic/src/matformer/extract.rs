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
    /// The kept bytes as (offset, length) runs of the source tensor, in output order.
    fn runs(&self, elem: usize) -> impl Iterator<Item = (u64, u64)> + '_ {
        let (row_bytes, unit) = (self.axis * self.inner * elem, self.inner * elem);
        (0..self.outer).flat_map(move |row| {
            self.keep.iter().map(move |r| {
                (
                    (row * row_bytes + r.start * unit) as u64,
                    (r.len() * unit) as u64,
                )
            })
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
        // Runs of source bytes are read into one buffer, written out whenever it fills.
        let mut buffer: Vec<u8> = Vec::with_capacity(CHUNK_BYTES);
        for (i, output) in self.outputs.iter().enumerate() {
            let entry = self.checkpoint.entry(&output.source)?;
            if let Some(next) = self.outputs.get(i + 1) {
                self.checkpoint
                    .prefetch(self.checkpoint.entry(&next.source)?);
            }
            let whole = [(0, entry.byte_range.end - entry.byte_range.start)];
            let runs: Box<dyn Iterator<Item = (u64, u64)>> = match &output.cut {
                None => Box::new(whole.into_iter()),
                Some(cut) => Box::new(cut.runs(output.dtype.bitsize() / 8)),
            };
            let mut written = 0u64;
            let mut flush = |buffer: &mut Vec<u8>| -> Result<()> {
                // A byte copy: non-finite values can only be the input's own.
                if writer.write_part(&output.name, written, buffer)? > 0 {
                    writer.accept_nonfinite(&output.name)?;
                }
                written += buffer.len() as u64;
                on_bytes(buffer.len() as u64);
                buffer.clear();
                Ok(())
            };
            for (start, len) in runs {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min((CHUNK_BYTES - buffer.len()) as u64) as usize;
                    let at = buffer.len();
                    buffer.resize(at + n, 0);
                    self.checkpoint
                        .read_range(entry, start + done, &mut buffer[at..])?;
                    done += n as u64;
                    if buffer.len() == CHUNK_BYTES {
                        flush(&mut buffer)?;
                    }
                }
            }
            if !buffer.is_empty() {
                flush(&mut buffer)?;
            }
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
