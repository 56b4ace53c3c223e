//! A recipe's model as a merge reads it: a checkpoint (a directory, or a Hub
//! id found in the local Hugging Face cache), with a LoRA adapter applied
//! when the recipe writes `BASE+ADAPTER`.

use std::path::Path;

use amalgam_checkpoint::{hub, kind_from_dtype, Checkpoint, InputRecord, MappedTensor};
use amalgam_recipe::{ModelRef, Recipe};
use tch::{Kind, Tensor};

use crate::lora::Adapter;
use crate::{MergeError, Result};

pub struct Source {
    pub checkpoint: Checkpoint,
    pub adapter: Option<Adapter>,
}

impl Source {
    /// Opens a recipe's model; errors name its recipe line.
    pub fn open(recipe: &Recipe, model: &ModelRef) -> Result<Self> {
        Self::open_at(model, &|message| {
            MergeError::Recipe(recipe.error(model.at, message))
        })
    }

    /// Opens `model`; `at` makes an error at its place in whatever file named it.
    pub fn open_at(model: &ModelRef, at: &dyn Fn(String) -> MergeError) -> Result<Self> {
        let (base, adapter) = split_adapter(&model.path);
        let dir = hub::locate(base).map_err(|e| at(e.to_string()))?;
        let checkpoint = Checkpoint::open(dir).map_err(|e| at(format!("model `{base}`: {e}")))?;
        // Two stacks (encoder and decoder) numbered independently: the planner's
        // one stack of layers would misread them, so they are refused outright.
        if checkpoint.config().get("is_encoder_decoder") == Some(&serde_json::Value::Bool(true)) {
            return Err(at(format!(
                "model `{base}` is an encoder–decoder model ({}); amalgam merges decoder-only and \
                 encoder-only models (merging encoder–decoder stacks, mergekit's `modules:`, is \
                 not supported yet)",
                checkpoint.config().model_type().unwrap_or("unknown type")
            )));
        }
        let adapter = match adapter {
            None => None,
            Some(adapter) => {
                let dir = hub::locate(adapter).map_err(|e| at(e.to_string()))?;
                Some(
                    Adapter::open(&dir, &checkpoint)
                        .map_err(|e| at(format!("adapter `{adapter}`: {e}")))?,
                )
            }
        };
        Ok(Self {
            checkpoint,
            adapter,
        })
    }

    pub fn dir(&self) -> &Path {
        self.checkpoint.dir()
    }

    /// The tensor `name` in `kind`, the adapter applied.
    pub fn read_as(&self, name: &str, kind: Kind) -> Result<Tensor> {
        let entry = self.checkpoint.entry(name)?;
        // A tied head reads the embedding: so does the adapter.
        match &self.adapter {
            Some(adapter) if adapter.touches(&entry.name) => {
                let stored = kind_from_dtype(entry.dtype).ok_or_else(|| MergeError::Tensor {
                    tensor: name.to_owned(),
                    message: format!(
                        "stored as {:?}, which an adapter cannot be applied to",
                        entry.dtype
                    ),
                })?;
                let weight = self.checkpoint.read_as(name, stored)?;
                let adapted = adapter.apply(&entry.name, weight)?;
                adapted.f_to_kind(kind).map_err(|cause| MergeError::Torch {
                    tensor: name.to_owned(),
                    cause,
                })
            }
            _ => Ok(self.checkpoint.read_as(name, kind)?),
        }
    }

    /// The tensor `name` in `kind` mapped from its file, when it is stored
    /// that way and no adapter changes it; `None`: read it with `read_as`.
    ///
    /// # Safety
    /// As [`Checkpoint::map_as`]: nothing over the mapped data outlives it.
    pub unsafe fn map_as(&self, name: &str, kind: Kind) -> Result<Option<MappedTensor>> {
        let entry = self.checkpoint.entry(name)?;
        if self
            .adapter
            .as_ref()
            .is_some_and(|a| a.touches(&entry.name))
        {
            return Ok(None);
        }
        // SAFETY: the caller's contract.
        Ok(unsafe { self.checkpoint.map_as(name, kind) }?)
    }

    /// NaN and ±inf values in what the tensor `name` is read from: the
    /// stored tensor and, with an adapter, the adapter's tensors for it (the
    /// adapted weight is computed, like a merge's output).
    pub fn count_nonfinite(&self, name: &str) -> Result<u64> {
        let entry = self.checkpoint.entry(name)?;
        let stored = || {
            Ok(amalgam_checkpoint::count_nonfinite(
                entry.dtype,
                &self.checkpoint.read_bytes(entry)?,
            ))
        };
        match &self.adapter {
            Some(adapter) if adapter.touches(&entry.name) => {
                adapter.nonfinite_inputs(&entry.name, stored)
            }
            _ => stored(),
        }
    }

    /// Content hashes for the model card: the checkpoint's files, and the adapter's.
    pub fn records(&self, role: &str) -> Result<Vec<InputRecord>> {
        let mut records = vec![InputRecord::hash(role, &self.checkpoint)?];
        if let Some(adapter) = &self.adapter {
            records.push(InputRecord::of_files(
                &format!("{role} adapter"),
                adapter.dir(),
                &adapter.files(),
            )?);
        }
        Ok(records)
    }
}

/// `BASE+ADAPTER` (mergekit's spelling) → (BASE, Some(ADAPTER)); a path that
/// exists as written, `+` and all, is a plain model.
fn split_adapter(path: &str) -> (&str, Option<&str>) {
    match path.split_once('+') {
        Some((base, adapter)) if !Path::new(path).exists() => (base, Some(adapter)),
        _ => (path, None),
    }
}
