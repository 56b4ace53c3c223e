//! PEFT LoRA adapters applied while tensors are read (`model: BASE+ADAPTER`):
//! the adapted weight is `W + scale · B·A` (transposed for embeddings and
//! `fan_in_fan_out` layers), with `scale = lora_alpha / r`, or `/ √r` for
//! rsLoRA, computed as peft's `merge_and_unload` computes it: the product in
//! F32, rounded to the adapter's dtype (and, for embeddings, to the weight's),
//! added in the base weight's dtype.
//! Tensors the adapter stores whole (`modules_to_save`, trained biases,
//! resized embeddings) replace the base's. Nothing is cached on disk.
//! Every tensor's shape is checked against the base's and the config's rank
//! (`r`, `rank_pattern`) when the adapter is opened, before any tensor is
//! computed; an adapted weight counts as computed for the merge's
//! non-finite check (its inputs are the base's tensor and the adapter's).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{count_nonfinite, kind_from_dtype, Checkpoint, Dtype, ModelDir};
use tch::{Kind, Tensor};

use crate::{MergeError, Result};

mod config;
pub mod extract;

pub use config::{AdapterConfig, ConfigError};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";
/// peft's prefix for the wrapped model's parameters.
const PREFIX: &str = "base_model.model.";
/// Adapters are read whole; larger ones are refused rather than exhausting memory.
const MAX_ADAPTER_BYTES: u64 = 16 << 30;
/// `adapter_config.json` is read whole; larger ones are refused.
const MAX_CONFIG_BYTES: u64 = amalgam_checkpoint::MAX_JSON_BYTES;

/// A tensor of the adapter file, kept as bytes: `tch::Tensor` cannot be
/// shared between the merge's threads.
struct Stored {
    /// Its name in the adapter file, for errors.
    key: String,
    dtype: Dtype,
    kind: Kind,
    shape: Vec<i64>,
    data: Vec<u8>,
}

impl Stored {
    fn tensor(&self) -> std::result::Result<Tensor, tch::TchError> {
        Tensor::f_from_data_size(&self.data, &self.shape, self.kind)
    }

    fn nonfinite(&self) -> u64 {
        count_nonfinite(self.dtype, &self.data)
    }
}

/// Whether a dtype holds real numbers (a LoRA matrix's or bias's must).
fn floating(dtype: Dtype) -> bool {
    matches!(
        dtype,
        Dtype::F16
            | Dtype::BF16
            | Dtype::F32
            | Dtype::F64
            | Dtype::F8_E5M2
            | Dtype::F8_E4M3
            | Dtype::F8_E5M2FNUZ
            | Dtype::F8_E4M3FNUZ
    )
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

/// The two halves of one module's update as the file holds them: (A, B),
/// each with whether it is an embedding's (`lora_embedding_*`).
type Halves = (Option<(Stored, bool)>, Option<(Stored, bool)>);

impl Adapter {
    /// Reads the adapter at `dir` and checks that every tensor it holds
    /// updates or replaces a tensor of `base`, shapes agreeing with the base
    /// and with the config's ranks, before any tensor is computed.
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
        let config = AdapterConfig::parse(&files.read(CONFIG, MAX_CONFIG_BYTES, "a JSON file")?)
            .map_err(|cause| MergeError::AdapterConfig {
                dir: dir.to_path_buf(),
                cause,
            })?;

        let bytes = files.read(WEIGHTS, MAX_ADAPTER_BYTES, "an adapter's weights")?;
        let stored = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| fail(format!("{WEIGHTS} is not a safetensors file: {e}")))?;
        let tensor_fail =
            |key: &str, message: String| fail(format!("{WEIGHTS}: tensor {key} {message}"));
        let mut halves: HashMap<String, Halves> = HashMap::new();
        let mut replaced = HashMap::new();
        // `lora_bias`: lora_B's bias, added (scaled) to the layer's bias.
        let mut bias_changes: HashMap<String, Stored> = HashMap::new();
        for (key, view) in stored.tensors() {
            let kind = kind_from_dtype(view.dtype())
                .ok_or_else(|| tensor_fail(&key, format!("is stored as {:?}", view.dtype())))?;
            let shape = view
                .shape()
                .iter()
                .map(|&d| i64::try_from(d))
                .collect::<std::result::Result<Vec<i64>, _>>()
                .map_err(|_| tensor_fail(&key, format!("has shape {:?}", view.shape())))?;
            let name = key
                .strip_prefix(PREFIX)
                .ok_or_else(|| tensor_fail(&key, format!("does not start with `{PREFIX}`")))?
                .to_owned();
            let tensor = Stored {
                key,
                dtype: view.dtype(),
                kind,
                shape,
                data: view.data().to_vec(),
            };
            if let Some(module) = name.strip_suffix(".lora_B.bias") {
                if !floating(tensor.dtype) {
                    return Err(tensor_fail(
                        &tensor.key,
                        format!("is stored as {:?}; a LoRA bias is a float", tensor.dtype),
                    ));
                }
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
                    if !floating(tensor.dtype) {
                        return Err(tensor_fail(
                            &tensor.key,
                            format!("is stored as {:?}; a LoRA matrix is a float", tensor.dtype),
                        ));
                    }
                    let target = format!("{module}.weight");
                    let entry = halves.entry(target.clone()).or_default();
                    let slot = if which == 0 {
                        &mut entry.0
                    } else {
                        &mut entry.1
                    };
                    if let Some((other, _)) = slot {
                        return Err(fail(format!(
                            "{WEIGHTS} holds {} and {}: two LoRA matrices of one kind for {target}",
                            other.key, tensor.key
                        )));
                    }
                    *slot = Some((tensor, embedding));
                }
                None => {
                    // Whole tensors: modules_to_save, trained biases, or a
                    // wrapped layer's own weight (`…base_layer.weight`).
                    let target = name.replace(".base_layer.", ".");
                    if let Some(other) = replaced.get(&target) {
                        let other: &Stored = other;
                        return Err(fail(format!(
                            "{WEIGHTS} holds {} and {}: both replace {target}",
                            other.key, tensor.key
                        )));
                    }
                    replaced.insert(target, tensor);
                }
            }
        }
        let mut updates = HashMap::new();
        let mut biases = HashMap::new();
        for (target, (a, b)) in halves {
            let (Some((a, a_embedding)), Some((b, b_embedding))) = (a, b) else {
                return Err(fail(format!(
                    "{WEIGHTS} holds only one of the two LoRA matrices of {target}"
                )));
            };
            if a_embedding != b_embedding {
                return Err(fail(format!(
                    "{WEIGHTS} holds {} and {}: one an embedding's LoRA matrix, the other a \
                     linear layer's",
                    a.key, b.key
                )));
            }
            let module = target.trim_end_matches(".weight");
            let rank = config.rank_of(module);
            for (half, which, other) in [(&a, "A", "(rank, in)"), (&b, "B", "(out, rank)")] {
                if half.shape.len() != 2 {
                    return Err(tensor_fail(
                        &half.key,
                        format!(
                            "is {}-D ({:?}); LoRA matrix {which} is 2-D, {other}",
                            half.shape.len(),
                            half.shape
                        ),
                    ));
                }
            }
            let (a_rank, b_rank) = (a.shape[0], b.shape[1]);
            if u64::try_from(a_rank) != Ok(rank) || u64::try_from(b_rank) != Ok(rank) {
                return Err(fail(format!(
                    "{WEIGHTS}: the LoRA matrices of {module} (A {:?}, B {:?}) are not of rank \
                     {rank}, which {CONFIG} gives it (`r` or `rank_pattern`)",
                    a.shape, b.shape
                )));
            }
            let scale = config.scale_of(module);
            if let Some(change) = bias_changes.remove(module) {
                biases.insert(format!("{module}.bias"), (change, scale));
            }
            updates.insert(
                target,
                Update {
                    a,
                    b,
                    scale,
                    transpose: a_embedding || config.fan_in_fan_out,
                    round_first: a_embedding,
                },
            );
        }
        if let Some(module) = bias_changes.keys().next() {
            return Err(fail(format!(
                "{WEIGHTS} holds a LoRA bias for {module} but no LoRA matrices for it"
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
        let fail = |tensor: &Stored, message: String| MergeError::Adapter {
            dir: self.dir.clone(),
            message: format!("{WEIGHTS}: tensor {} {message}", tensor.key),
        };
        let shape_of = |name: &str, tensor: &Stored| {
            base.entry(name)
                .map(|e| e.shape.iter().map(|&d| d as i64).collect::<Vec<_>>())
                .map_err(|_| {
                    fail(
                        tensor,
                        format!(
                            "updates {name}, which the base model `{}` does not have",
                            base.dir().display()
                        ),
                    )
                })
        };
        for (name, tensor) in &self.replaced {
            let want = shape_of(name, tensor)?;
            if tensor.shape != want {
                return Err(fail(
                    tensor,
                    format!(
                        "replaces {name} with a {:?} tensor; the base's is {want:?}",
                        tensor.shape
                    ),
                ));
            }
        }
        for (name, (change, _)) in &self.biases {
            let want = shape_of(name, change)?;
            if change.shape != want {
                return Err(fail(
                    change,
                    format!(
                        "is a LoRA bias for {name} of shape {:?}; the base's is {want:?}",
                        change.shape
                    ),
                ));
            }
        }
        for (name, update) in &self.updates {
            let want = shape_of(name, &update.a)?;
            // Both 2-D, ranks agreeing: checked when they were read.
            let (a, b) = (&update.a.shape, &update.b.shape);
            let product = if update.transpose {
                vec![a[1], b[0]]
            } else {
                vec![b[0], a[1]]
            };
            if product != want {
                return Err(fail(
                    &update.a,
                    format!(
                        "and {} (A {a:?}, B {b:?}) make a {product:?} update of {name}; the \
                         base's is {want:?}",
                        update.b.key
                    ),
                ));
            }
        }
        Ok(())
    }

    /// NaN and ±inf values among what the adapted `name` is computed from:
    /// the adapter's tensors for it and, unless the adapter replaces it
    /// whole, the base's (`base` counts those). The adapted value itself is
    /// computed: non-finite values it holds beyond these are the adapter's
    /// making, which the merge's output check refuses.
    pub fn nonfinite_inputs(&self, name: &str, base: impl FnOnce() -> Result<u64>) -> Result<u64> {
        let mut count = match self.replaced.get(name) {
            Some(whole) => whole.nonfinite(),
            None => base()?,
        };
        if let Some((change, _)) = self.biases.get(name) {
            count += change.nonfinite();
        }
        if let Some(update) = self.updates.get(name) {
            count += update.a.nonfinite() + update.b.nonfinite();
        }
        Ok(count)
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
