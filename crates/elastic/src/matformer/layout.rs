//! Where a checkpoint keeps its nested FFNs and per-layer state, and how its
//! config changes when layers are dropped or narrowed.
//!
//! All of it comes from the family's description: the layer prefix, the
//! MLP's input projections (separate, fused `[gate; up]` as Phi-3 stores
//! them, or ungated as GPT-NeoX's) and output projection, the key of a
//! nested text config, global tensors packing one block per layer, and the
//! key counting layers that reuse others' KV cache (all three Gemma 3n's).
//! Checkpoints of a family without a description are read by Llama's.

use std::collections::BTreeSet;
use std::ops::Range;
use std::path::PathBuf;

use amalgam_checkpoint::arch::{locate, restack_layer_lists, LayerOrigin, PER_LAYER_CONFIG_FIELDS};
use amalgam_checkpoint::decoder::MlpInput;
use amalgam_checkpoint::family::{Family, MlpTensors};
use amalgam_checkpoint::{family, Checkpoint, ModelConfig};
use serde_json::{Map, Value};

use crate::{ElasticError, Result};

/// What one stored tensor is, for slicing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Part<'n> {
    /// Outside the text model's layers: copied unchanged.
    Global,
    /// `{prefix}layers.{index}.{rest}`.
    Layer { index: usize, rest: &'n str },
    /// A global tensor holding one block per layer along `axis` (Gemma 3n's
    /// per-layer embeddings), each block `block` wide.
    PerLayerBlocks { axis: usize, block: usize },
}

/// Where a layer tensor holds the FFN hidden units: its rows (the MLP's
/// input projections and their biases), two blocks of rows (a fused
/// `[gate; up]`), or its columns (the output projection's weight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum FfnAxis {
    Rows,
    FusedRows,
    Columns,
}

/// The MLP tensors of a layer (names relative to it, without suffix).
#[derive(Debug, Clone)]
struct FfnNames {
    /// Whose rows are the hidden units.
    rows: Vec<String>,
    /// Whose rows are `[gate; up]`, each block the hidden units.
    fused_rows: Option<String>,
    /// Whose weight's columns are the hidden units.
    columns: String,
    /// How the input projections are stored (where a fused one's parts are).
    input: MlpInput,
}

impl FfnNames {
    fn of(mlp: MlpTensors) -> Self {
        let (rows, fused_rows) = match &mlp.input {
            MlpInput::Gated(parts) => (parts.to_vec(), None),
            MlpInput::GatedConcatenated(part) => (vec![], Some(part.clone())),
            MlpInput::Plain(part) => (vec![part.clone()], None),
        };
        FfnNames {
            rows,
            fused_rows,
            columns: mlp.output,
            input: mlp.input,
        }
    }

    fn axis(&self, rest: &str) -> Option<FfnAxis> {
        let (stem, suffix) = rest.rsplit_once('.')?;
        if !matches!(suffix, "weight" | "bias") {
            return None;
        }
        if self.rows.iter().any(|r| r == stem) {
            Some(FfnAxis::Rows)
        } else if self.fused_rows.as_deref() == Some(stem) {
            Some(FfnAxis::FusedRows)
        } else if stem == self.columns && suffix == "weight" {
            Some(FfnAxis::Columns)
        } else {
            None
        }
    }

    /// Where each part (gate, up) of a fused input projection of `width`
    /// units sits in its rows.
    fn fused_parts(&self, width: usize) -> Vec<Range<usize>> {
        self.input
            .row_split(width as i64)
            .ranges()
            .unwrap_or_else(|| std::iter::once(0..width).collect())
    }

    /// The weight whose rows count a layer's hidden units, and how many
    /// blocks of them it holds.
    fn width_source(&self) -> (String, usize) {
        match (&self.fused_rows, self.rows.first()) {
            (Some(fused), _) => (format!("{fused}.weight"), self.fused_parts(1).len()),
            (None, Some(first)) => (format!("{first}.weight"), 1),
            (None, None) => unreachable!("an MLP has an input projection"),
        }
    }
}

/// A checkpoint's slicing-relevant structure, read from its config and headers.
#[derive(Debug, Clone)]
pub struct ModelLayout {
    pub(crate) dir: PathBuf,
    /// Prefix of the text model's module names, e.g. `model.`.
    prefix: String,
    /// The key holding the text config inside config.json (`None`: top level).
    text_config_key: Option<String>,
    /// Global tensors packing one block per layer: (name, axis), and the
    /// blocks' width.
    per_layer_blocks: Vec<(String, usize)>,
    per_layer_width: usize,
    /// The config key counting layers that reuse others' KV cache.
    kv_shared_layers_key: Option<String>,
    /// The layers' MLP tensors.
    ffn: FfnNames,
    /// Every layer's FFN width, from the stored `gate_proj` rows.
    pub ffn_widths: Vec<usize>,
    /// Layers whose KV cache later layers reuse (Gemma 3n): never skipped.
    pub kv_producers: Vec<usize>,
}

impl ModelLayout {
    pub fn read(checkpoint: &Checkpoint) -> Result<Self> {
        let dir = checkpoint.dir().to_path_buf();
        let error = |message: String| ElasticError::Model {
            path: dir.join("config.json"),
            message,
        };
        let config = checkpoint.config();
        let family: &Family = family::of(config).unwrap_or_else(family::llama);
        let name = &family.model_type;
        let layers_template = family
            .layers()
            .ok_or_else(|| error(format!("the `{name}` description names no layers")))?;
        let prefix = layers_template
            .strip_suffix("layers.{i}")
            .ok_or_else(|| {
                error(format!(
                    "layers named `{layers_template}`: extraction needs them as PREFIX.layers.N"
                ))
            })?
            .to_owned();
        let mlp = family
            .mlp_tensors()
            .ok_or_else(|| error(format!("the `{name}` description names no dense MLP")))?;
        let ffn = FfnNames::of(mlp);
        let text_config_key = family.text_config.clone();
        let text = text_config(config, text_config_key.as_deref()).map_err(error)?;
        let field = |key: &str| text.get(key).and_then(Value::as_u64).map(|v| v as usize);
        let layers = field("num_hidden_layers")
            .ok_or_else(|| error("no `num_hidden_layers` in the (text) config".into()))?;
        let (per_layer_blocks, per_layer_width) = match &family.per_layer_inputs {
            None => (vec![], 0),
            Some(inputs) => {
                let width = field(&inputs.width_key).ok_or_else(|| {
                    error(format!("a `{name}` config without `{}`", inputs.width_key))
                })?;
                let blocks = inputs
                    .tensors
                    .iter()
                    .map(|t| (t.name.clone(), t.axis))
                    .collect();
                (blocks, width)
            }
        };
        let mut layout = ModelLayout {
            dir: dir.clone(),
            prefix: prefix.clone(),
            text_config_key,
            per_layer_blocks,
            per_layer_width,
            kv_shared_layers_key: family.kv_shared_layers_key.clone(),
            ffn,
            ffn_widths: vec![],
            kv_producers: vec![],
        };
        let (width_source, blocks) = layout.ffn.width_source();
        for layer in 0..layers {
            let name = layout.layer_name(layer, &width_source);
            let entry = checkpoint.entry(&name).map_err(|_| {
                error(format!(
                    "no tensor {name}, where the `{}` description has the layer's MLP",
                    family.model_type
                ))
            })?;
            if entry.shape.is_empty() || entry.shape[0] % blocks != 0 {
                return Err(error(format!(
                    "tensor {name}: shape {:?} does not hold {blocks} equal blocks of FFN units",
                    entry.shape
                )));
            }
            layout.ffn_widths.push(entry.shape[0] / blocks);
        }
        for entry in checkpoint.tensors() {
            if let Part::Layer { index, .. } = layout.part(&entry.name) {
                if index >= layers {
                    return Err(error(format!(
                        "tensor {} belongs to layer {index}, but the config has {layers} layers",
                        entry.name
                    )));
                }
            }
        }
        layout.kv_producers = match &family.kv_shared_layers_key {
            Some(key) => kv_producers(&text, key, layers).map_err(error)?,
            None => vec![],
        };
        Ok(layout)
    }

    pub fn layers(&self) -> usize {
        self.ffn_widths.len()
    }

    /// Where a layer tensor (`rest`: its name within the layer) holds the FFN units.
    pub(crate) fn ffn_axis(&self, rest: &str) -> Option<FfnAxis> {
        self.ffn.axis(rest)
    }

    /// The rows of each part of a fused MLP input projection of `width` units.
    pub(crate) fn fused_ffn_parts(&self, width: usize) -> Vec<Range<usize>> {
        self.ffn.fused_parts(width)
    }

    pub(crate) fn part<'n>(&self, name: &'n str) -> Part<'n> {
        let Some(local) = name.strip_prefix(self.prefix.as_str()) else {
            return Part::Global;
        };
        if let Some((_, axis)) = self.per_layer_blocks.iter().find(|(n, _)| n == name) {
            return Part::PerLayerBlocks {
                axis: *axis,
                block: self.per_layer_width,
            };
        }
        // `layers.N.rest`, N where the checkpoint's reading of names finds it.
        match locate(local) {
            Some((index, digits))
                if digits.start == "layers.".len()
                    && local.starts_with("layers.")
                    && local[digits.end..].starts_with('.') =>
            {
                Part::Layer {
                    index,
                    rest: &local[digits.end + 1..],
                }
            }
            _ => Part::Global,
        }
    }

    /// The name of a kept layer's tensor after renumbering.
    pub(crate) fn layer_name(&self, new_index: usize, rest: &str) -> String {
        format!("{}layers.{new_index}.{rest}", self.prefix)
    }

    /// The config of the submodel keeping `kept` (original indices, ascending)
    /// with `widths` (one per kept layer).
    pub(crate) fn rewrite_config(
        &self,
        config: &ModelConfig,
        kept: &[usize],
        widths: &[usize],
    ) -> Result<ModelConfig> {
        let error = |message: String| ElasticError::Model {
            path: self.dir.join("config.json"),
            message,
        };
        let mut text = text_config(config, self.text_config_key.as_deref()).map_err(error)?;
        let layers = self.layers();
        let skipped = layers - kept.len();
        for key in PER_LAYER_CONFIG_FIELDS {
            if let Some(Value::Array(items)) = text.get(*key) {
                if items.len() != layers {
                    return Err(error(format!(
                        "`{key}` has {} entries for {layers} layers",
                        items.len()
                    )));
                }
            }
        }
        let original = text.clone();
        let origins: Vec<LayerOrigin> = kept
            .iter()
            .map(|&layer| LayerOrigin {
                config: &original,
                layer,
            })
            .collect();
        restack_layer_lists(&mut text, &origins)
            .expect("every per-layer list has an entry for each layer");
        text.insert("num_hidden_layers".into(), kept.len().into());
        // An integer when the widths are uniform and the input had one (what
        // transformers' Llama loads); otherwise a list, one per layer.
        let uniform = widths.windows(2).all(|w| w[0] == w[1]);
        let was_list = matches!(original.get("intermediate_size"), Some(Value::Array(_)));
        text.insert(
            "intermediate_size".into(),
            match (uniform && !was_list, widths.first()) {
                (true, Some(&w)) => w.into(),
                _ => widths.to_vec().into(),
            },
        );
        if let Some(key) = &self.kv_shared_layers_key {
            if let Some(shared) = text.get(key).and_then(Value::as_u64) {
                let first_shared = layers - shared as usize;
                let kept_shared = kept.iter().filter(|&&l| l >= first_shared).count();
                debug_assert!(shared as usize - kept_shared <= skipped);
                text.insert(key.clone(), kept_shared.into());
            }
        }
        let mut out = config.clone();
        match &self.text_config_key {
            Some(key) => out.set(key, Value::Object(text)),
            None => out = ModelConfig::from_json(text),
        }
        Ok(out)
    }
}

fn text_config(
    config: &ModelConfig,
    key: Option<&str>,
) -> std::result::Result<Map<String, Value>, String> {
    match key {
        None => Ok(config.fields().clone()),
        Some(key) => match config.get(key) {
            Some(Value::Object(text)) => Ok(text.clone()),
            _ => Err(format!("no `{key}` object in config.json")),
        },
    }
}

/// KV sharing as transformers implements Gemma 3n's: the last `key` (its
/// `num_kv_shared_layers`) layers compute no keys and values of their own;
/// each reuses those of the last earlier, non-shared layer of the same
/// attention type (`layer_types`). Those source layers are the producers.
fn kv_producers(
    text: &Map<String, Value>,
    key: &str,
    layers: usize,
) -> std::result::Result<Vec<usize>, String> {
    let shared = match text.get(key).and_then(Value::as_u64) {
        Some(0) | None => return Ok(vec![]),
        Some(n) if n as usize >= layers => {
            return Err(format!(
                "`{key}` {n} leaves no layer to produce the shared KV ({layers} layers)"
            ))
        }
        Some(n) => n as usize,
    };
    let types: Vec<&str> = match text.get("layer_types") {
        Some(Value::Array(items)) if items.len() == layers => items
            .iter()
            .map(|t| t.as_str().unwrap_or_default())
            .collect(),
        _ => return Err(format!("`{key}` without a `layer_types` list per layer")),
    };
    let first_shared = layers - shared;
    let mut producers = BTreeSet::new();
    for layer in first_shared..layers {
        let source = (0..first_shared)
            .rev()
            .find(|&l| types[l] == types[layer])
            .ok_or_else(|| {
                format!(
                    "layer {layer} ({}) shares KV, but no earlier layer of its type computes any",
                    types[layer]
                )
            })?;
        producers.insert(source);
    }
    Ok(producers.into_iter().collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// Dropping a layer drops its entry from every per-layer list, the
    /// ones the stacking merge rewrites (`mlp_layer_types` among them) too.
    #[test]
    fn dropped_layers_leave_every_per_layer_list() {
        let llama = family::llama();
        let layout = ModelLayout {
            dir: PathBuf::from("m"),
            prefix: "model.".into(),
            text_config_key: None,
            per_layer_blocks: vec![],
            per_layer_width: 0,
            kv_shared_layers_key: None,
            ffn: FfnNames::of(llama.mlp_tensors().unwrap()),
            ffn_widths: vec![64; 4],
            kv_producers: vec![],
        };
        let config = ModelConfig::from_json(
            json!({
                "model_type": "llama",
                "num_hidden_layers": 4,
                "intermediate_size": 64,
                "layer_types": ["a0", "a1", "a2", "a3"],
                "mlp_layer_types": ["m0", "m1", "m2", "m3"],
            })
            .as_object()
            .unwrap()
            .clone(),
        );
        let out = layout
            .rewrite_config(&config, &[0, 2, 3], &[64, 32, 64])
            .unwrap();
        assert_eq!(out.get("num_hidden_layers"), Some(&json!(3)));
        assert_eq!(out.get("layer_types"), Some(&json!(["a0", "a2", "a3"])));
        assert_eq!(out.get("mlp_layer_types"), Some(&json!(["m0", "m2", "m3"])));
        assert_eq!(out.get("intermediate_size"), Some(&json!([64, 32, 64])));
        let short = ModelConfig::from_json(
            json!({"model_type": "llama", "num_hidden_layers": 4, "mlp_layer_types": ["m0"]})
                .as_object()
                .unwrap()
                .clone(),
        );
        let refused = layout.rewrite_config(&short, &[0], &[64]).unwrap_err();
        assert!(refused
            .to_string()
            .contains("`mlp_layer_types` has 1 entries for 4 layers"));
    }
}
