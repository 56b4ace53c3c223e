//! PEFT LoRA adapters applied while tensors are read (`model: BASE+ADAPTER`):
//! the adapted weight is `W + scale · B·A` (transposed for embeddings and
//! `fan_in_fan_out` layers), with `scale = lora_alpha / r`, or `/ √r` for
//! rsLoRA, computed as peft's `merge_and_unload` computes it: the product in
//! F32, rounded to the adapter's dtype (and, for embeddings, to the weight's),
//! added in the base weight's dtype.
//! Tensors the adapter stores whole (`modules_to_save`, trained biases,
//! resized embeddings) replace the base's. Nothing is cached on disk.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{kind_from_dtype, Checkpoint, ModelDir};
use serde_json::Value;
use tch::{Kind, Tensor};

use crate::{MergeError, Result};

pub mod extract;

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// peft's prefix for the wrapped model's parameters.
const PREFIX: &str = "base_model.model.";
/// Adapters are read whole; larger ones are refused rather than exhausting memory.
const MAX_ADAPTER_BYTES: u64 = 16 << 30;

/// A tensor of the adapter file, kept as bytes: `tch::Tensor` cannot be
/// shared between the merge's threads.
struct Stored {
    kind: Kind,
    shape: Vec<i64>,
    data: Vec<u8>,
}

impl Stored {
    fn tensor(&self) -> std::result::Result<Tensor, tch::TchError> {
        Tensor::f_from_data_size(&self.data, &self.shape, self.kind)
    }
}

/// One low-rank update of a base tensor.
struct Update {
    a: Stored,
    b: Stored,
    scale: f64,
    /// Embeddings store `A·ᵀ` layouts: the update is `(B·A)ᵀ`.
    transpose: bool,
    /// peft rounds an embedding's update to the weight's dtype before adding
    /// it (a linear layer's is added as it is).
    round_first: bool,
}

/// A LoRA adapter, checked against the base it is applied to.
pub struct Adapter {
    dir: PathBuf,
    updates: HashMap<String, Update>,
    /// Bias name → (lora_B's bias, the layer's scale).
    biases: HashMap<String, (Stored, f64)>,
    replaced: HashMap<String, Stored>,
}

impl Adapter {
    /// Reads the adapter at `dir` and checks that every tensor it holds
    /// updates or replaces a tensor of `base`, shapes agreeing.
    pub fn open(dir: &Path, base: &Checkpoint) -> Result<Self> {
        let fail = |message: String| MergeError::Adapter {
            dir: dir.to_path_buf(),
            message,
        };
        let files = ModelDir::new(dir)?;
        for name in [CONFIG, WEIGHTS] {
            if !files.has(name) {
                return Err(fail(format!(
                    "has no {name} (a PEFT LoRA adapter, as peft's save_pretrained writes it)"
                )));
            }
        }
        let config = files.json_object(CONFIG)?;
        let peft_type = config.get("peft_type").and_then(Value::as_str);
        if peft_type != Some("LORA") {
            return Err(fail(format!(
                "is a {} adapter; amalgam applies LoRA adapters",
                peft_type.unwrap_or("untyped")
            )));
        }
        for (key, what) in [("use_dora", "DoRA"), ("use_qalora", "QA-LoRA")] {
            if config.get(key) == Some(&Value::Bool(true)) {
                return Err(fail(format!(
                    "uses {what} (`{key}`), which amalgam does not apply"
                )));
            }
        }
        for key in ["trainable_token_indices", "layer_replication"] {
            if config.get(key).is_some_and(|v| !v.is_null()) {
                return Err(fail(format!("sets `{key}`, which amalgam does not apply")));
            }
        }
        let number = |key: &str| config.get(key).and_then(Value::as_f64);
        let alpha = number("lora_alpha").ok_or_else(|| fail("has no `lora_alpha`".into()))?;
        let rslora = config.get("use_rslora") == Some(&Value::Bool(true));
        let fan_in_fan_out = config.get("fan_in_fan_out") == Some(&Value::Bool(true));
        let alpha_pattern: Vec<(String, f64)> = match config.get("alpha_pattern") {
            Some(Value::Object(m)) => m
                .iter()
                .map(|(k, v)| {
                    Ok((
                        k.clone(),
                        v.as_f64()
                            .ok_or_else(|| fail(format!("alpha_pattern `{k}` is not a number")))?,
                    ))
                })
                .collect::<Result<_>>()?,
            _ => vec![],
        };
        if let Some((pattern, _)) = alpha_pattern
            .iter()
            .find(|(p, _)| p.chars().any(|c| "*+?[](){}|^$\\".contains(c)))
        {
            return Err(fail(format!(
                "alpha_pattern `{pattern}` is a regular expression; amalgam matches module names"
            )));
        }

        let bytes = files.read(WEIGHTS, MAX_ADAPTER_BYTES, "an adapter's weights")?;
        let stored = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fail(format!("{WEIGHTS} is not a safetensors file: {e}")))?;
        let mut halves: HashMap<String, (Option<Stored>, Option<Stored>, bool)> = HashMap::new();
        let mut replaced = HashMap::new();
        // `lora_bias`: lora_B's bias, added (scaled) to the layer's bias.
        let mut bias_changes: HashMap<String, Stored> = HashMap::new();
        for (key, view) in stored.tensors() {
            let kind = kind_from_dtype(view.dtype())
                .ok_or_else(|| fail(format!("tensor {key} is stored as {:?}", view.dtype())))?;
            let tensor = Stored {
                kind,
                shape: view.shape().iter().map(|&d| d as i64).collect(),
                data: view.data().to_vec(),
            };
            let name = key
                .strip_prefix(PREFIX)
                .ok_or_else(|| fail(format!("tensor {key} does not start with `{PREFIX}`")))?;
            if let Some(module) = name.strip_suffix(".lora_B.bias") {
                bias_changes.insert(module.to_owned(), tensor);
                continue;
            }
            let half = [
                (".lora_A.weight", 0, false),
                (".lora_B.weight", 1, false),
                (".lora_embedding_A", 0, true),
                (".lora_embedding_B", 1, true),
            ]
            .into_iter()
            .find_map(|(suffix, which, embedding)| {
                name.strip_suffix(suffix).map(|m| (m, which, embedding))
            });
            match half {
                Some((module, which, embedding)) => {
                    let entry = halves.entry(format!("{module}.weight")).or_default();
                    if which == 0 {
                        entry.0 = Some(tensor)
                    } else {
                        entry.1 = Some(tensor)
                    }
                    entry.2 = embedding;
                }
                None => {
                    // Whole tensors: modules_to_save, trained biases, or a
                    // wrapped layer's own weight (`…base_layer.weight`).
                    let target = name.replace(".base_layer.", ".");
                    replaced.insert(target, tensor);
                }
            }
        }
        let mut updates = HashMap::new();
        let mut biases = HashMap::new();
        for (target, (a, b, embedding)) in halves {
            let (Some(a), Some(b)) = (a, b) else {
                return Err(fail(format!(
                    "holds only one of the two LoRA matrices of {target}"
                )));
            };
            let rank = a.shape[0];
            let module = target.trim_end_matches(".weight");
            let alpha = alpha_pattern
                .iter()
                .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
                .map_or(alpha, |(_, a)| *a);
            let scale = if rslora {
                alpha / (rank as f64).sqrt()
            } else {
                alpha / rank as f64
            };
            if let Some(change) = bias_changes.remove(module) {
                biases.insert(format!("{module}.bias"), (change, scale));
            }
            updates.insert(
                target,
                Update {
                    a,
                    b,
                    scale,
                    transpose: embedding || fan_in_fan_out,
                    round_first: embedding,
                },
            );
        }
        if let Some(module) = bias_changes.keys().next() {
            return Err(fail(format!(
                "holds a LoRA bias for {module} but no LoRA matrices for it"
            )));
        }
        let adapter = Self {
            dir: dir.to_path_buf(),
            updates,
            biases,
            replaced,
        };
        adapter.check_against(base)?;
        Ok(adapter)
    }

    fn check_against(&self, base: &Checkpoint) -> Result<()> {
        let fail = |message: String| MergeError::Adapter {
            dir: self.dir.clone(),
            message,
        };
        let shape_of = |name: &str| {
            base.entry(name)
                .map(|e| e.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
                .map_err(|_| {
                    fail(format!(
                        "updates {name}, which the base model `{}` does not have",
                        base.dir().display()
                    ))
                })
        };
        for (name, tensor) in &self.replaced {
            let want = shape_of(name)?;
            if tensor.shape != want {
                return Err(fail(format!(
                    "replaces {name} with a {:?} tensor; the base's is {want:?}",
                    tensor.shape
                )));
            }
        }
        for (name, (change, _)) in &self.biases {
            let want = shape_of(name)?;
            if change.shape != want {
                return Err(fail(format!(
                    "its LoRA bias for {name} is {:?}; the base's is {want:?}",
                    change.shape
                )));
            }
        }
        for (name, update) in &self.updates {
            let want = shape_of(name)?;
            let (a, b) = (&update.a.shape, &update.b.shape);
            let product = if update.transpose {
                vec![a[1], b[0]]
            } else {
                vec![b[0], a[1]]
            };
            if a.len() != 2 || b.len() != 2 || a[0] != b[1] || product != want {
                return Err(fail(format!(
                    "its LoRA matrices for {name} (A {a:?}, B {b:?}) do not make the base's {want:?}"
                )));
            }
        }
        Ok(())
    }

    /// The adapter's files, for the model card's input hashes.
    pub fn files(&self) -> Vec<PathBuf> {
        [WEIGHTS, CONFIG].iter().map(|n| self.dir.join(n)).collect()
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether reading `name` (a stored tensor's name) goes through the adapter.
    pub fn touches(&self, name: &str) -> bool {
        self.updates.contains_key(name)
            || self.biases.contains_key(name)
            || self.replaced.contains_key(name)
    }

    /// `weight` (the base's `name`, in its stored kind) with the adapter applied.
    pub fn apply(&self, name: &str, weight: Tensor) -> Result<Tensor> {
        let torch = |cause| MergeError::Torch {
            tensor: name.to_owned(),
            cause,
        };
        let stored = weight.kind();
        let weight = match self.replaced.get(name) {
            Some(whole) => whole
                .tensor()
                .and_then(|w| w.f_to_kind(stored))
                .map_err(torch)?,
            None => weight,
        };
        if let Some((change, scale)) = self.biases.get(name) {
            // peft: bias += lora_B.bias · scale, in the adapter's dtype.
            let delta = change
                .tensor()
                .and_then(|c| c.f_mul_scalar(*scale))
                .map_err(torch)?;
            return weight
                .f_add(&delta)
                .and_then(|w| w.f_to_kind(stored))
                .map_err(torch);
        }
        let Some(update) = self.updates.get(name) else {
            return Ok(weight);
        };
        let (a, b) = (
            update
                .a
                .tensor()
                .and_then(|a| a.f_to_kind(Kind::Float))
                .map_err(torch)?,
            update
                .b
                .tensor()
                .and_then(|b| b.f_to_kind(Kind::Float))
                .map_err(torch)?,
        );
        let mut product = b.f_matmul(&a).map_err(torch)?;
        if update.transpose {
            product = product.f_transpose(0, 1).map_err(torch)?;
        }
        let rounded_to = if update.round_first {
            stored
        } else {
            update.a.kind
        };
        let delta = product
            .f_mul_scalar(update.scale)
            .and_then(|d| d.f_to_kind(update.a.kind))
            .and_then(|d| d.f_to_kind(rounded_to))
            .map_err(torch)?;
        weight
            .f_add(&delta)
            .and_then(|w| w.f_to_kind(stored))
            .map_err(torch)
    }
}
