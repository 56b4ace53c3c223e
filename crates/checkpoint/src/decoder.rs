//! How a family's decoder-only forward pass is built, as data: the tensor
//! names of each part, where the norms sit, the residual form, which
//! projections are fused and how, which biases exist, and the `config.json`
//! keys (with the family's defaults) for everything that varies. One
//! description per family, in the `decoder` section of
//! `families/MODEL_TYPE.json`; `amalgam-nn` builds its one forward pass from
//! it, so a family is a file, not a copy of the model.

use serde::Deserialize;
use serde_json::Value;

use crate::ModelConfig;

/// A family's decoder (see the module documentation). Names are templates
/// without the `.weight`/`.bias` suffix; layer parts are relative to
/// [`DecoderLayout::layers`], whose `{i}` is the block index.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DecoderLayout {
    pub embedding: String,
    /// The embeddings are multiplied by √hidden_size (Gemma).
    #[serde(default)]
    pub embedding_scaled: bool,
    /// The block prefix, e.g. `model.layers.{i}`.
    pub layers: String,
    pub final_norm: String,
    /// The output head's names, current first then older ones still found
    /// in published checkpoints (absent from tied checkpoints).
    pub head: Vec<String>,
    pub norm: NormKind,
    /// The config key of the norms' epsilon.
    pub norm_eps: String,
    /// Attention and MLP read the same block input and both add to it
    /// (GPT-NeoX) instead of the MLP reading the stream after attention.
    #[serde(default)]
    pub parallel_residual: Flag,
    pub norms: BlockNorms,
    pub attention: AttentionLayout,
    pub mlp: MlpLayout,
    pub rope: RopeDefaults,
    /// Which layers use sliding-window attention when `config.json` has no
    /// `layer_types` list.
    #[serde(default)]
    pub sliding_layers: SlidingLayers,
    /// Config key of the attention-score soft cap (`cap · tanh(s / cap)`).
    #[serde(default)]
    pub attention_softcap: Option<String>,
    /// Config key of the logits' soft cap.
    #[serde(default)]
    pub final_softcap: Option<String>,
    /// Config key of the scalar whose inverse square root scales the
    /// attention scores instead of head_dim's (Gemma 2/3).
    #[serde(default)]
    pub query_scale: Option<String>,
    /// transformers derives the head size as `hidden_size / heads` and
    /// ignores a `head_dim` key (GPT-NeoX): a model whose heads do not span
    /// the hidden size exactly would not load there.
    #[serde(default)]
    pub head_dim_from_hidden: bool,
}

/// How a norm scales its normalised input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// RMSNorm: `w · x / rms(x)`, the normalised input rounded to the
    /// input's dtype before the weight multiplies it.
    Rms,
    /// RMSNorm with the weight multiplied in F32 before rounding (OLMo 2;
    /// the same as `rms` in F32).
    RmsWeightInF32,
    /// Gemma's RMSNorm: `(1 + w) · x / rms(x)`, so a zero weight is the identity.
    RmsUnitOffset,
    /// LayerNorm with weight and bias.
    Layer,
}

/// The norms of one block, each optional (relative names).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockNorms {
    /// Before attention (pre-norm).
    #[serde(default)]
    pub attention_input: Option<String>,
    /// On attention's output before it joins the residual (Gemma 2/3, OLMo 2).
    #[serde(default)]
    pub attention_output: Option<String>,
    /// Before the MLP.
    #[serde(default)]
    pub mlp_input: Option<String>,
    /// On the MLP's output before it joins the residual.
    #[serde(default)]
    pub mlp_output: Option<String>,
}

/// A block's attention tensors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionLayout {
    pub qkv: Projections,
    pub output: String,
    /// Bias on the q/k/v projections.
    #[serde(default)]
    pub qkv_bias: Flag,
    /// Bias on the output projection.
    #[serde(default)]
    pub output_bias: Flag,
    /// RMS norms on queries and keys before RoPE (Qwen3, Gemma 3, OLMo 2).
    #[serde(default)]
    pub qk_norm: Option<QkNorm>,
}

/// How queries, keys and values are stored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Projections {
    /// Three tensors: q, k, v.
    Separate([String; 3]),
    /// One tensor, rows `[q; k; v]` (Phi-3's `qkv_proj`).
    Concatenated(String),
    /// One tensor, rows grouped per head as `[q_h; k_h; v_h]` (GPT-NeoX).
    InterleavedByHead(String),
}

/// Query/key norms and what they normalise over.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QkNorm {
    pub q: String,
    pub k: String,
    /// Over all heads' projections at once (OLMo 2) instead of per head.
    #[serde(default)]
    pub across_heads: bool,
}

/// A block's MLP tensors.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpLayout {
    pub input: MlpInput,
    pub output: String,
    #[serde(default)]
    pub bias: Flag,
    /// Config keys naming the activation, the first present wins.
    pub activation_keys: Vec<String>,
    pub default_activation: String,
    /// Activation names the family reads as another (Gemma's legacy `gelu`
    /// means the tanh approximation).
    #[serde(default)]
    pub activation_aliases: std::collections::BTreeMap<String, String>,
}

/// The MLP's input projections.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum MlpInput {
    /// act(gate) · up from two tensors.
    Gated([String; 2]),
    /// act(gate) · up from one tensor, rows `[gate; up]` (Phi-3's `gate_up_proj`).
    GatedConcatenated(String),
    /// act(up): no gate (GPT-NeoX).
    Plain(String),
}

/// A yes/no property of a family: fixed, or read from a config key with the
/// family's default.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Flag {
    Fixed(bool),
    Config { config: String, default: bool },
}

impl Default for Flag {
    fn default() -> Self {
        Flag::Fixed(false)
    }
}

impl Flag {
    /// The flag's value for a config (`null` reads as the default).
    pub fn of(&self, config: &ModelConfig) -> bool {
        match self {
            Flag::Fixed(value) => *value,
            Flag::Config {
                config: key,
                default,
            } => config.get(key).and_then(Value::as_bool).unwrap_or(*default),
        }
    }
}

/// The family's RoPE defaults and the legacy config keys it reads when
/// `config.json` has no `rope_parameters`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeDefaults {
    pub theta: f64,
    #[serde(default = "one")]
    pub partial_rotary_factor: f64,
    /// Legacy keys of θ, the first present wins (`rope_theta`, GPT-NeoX's `rotary_emb_base`).
    pub theta_keys: Vec<String>,
    /// Legacy keys of the rotary fraction (`partial_rotary_factor`, `rotary_pct`).
    #[serde(default)]
    pub partial_keys: Vec<String>,
    /// Rotations computed in F32 and rounded after (OLMo 2), rather than
    /// with cos/sin rounded to the activations' dtype (the same in F32).
    #[serde(default)]
    pub in_f32: bool,
    /// Sliding-window layers' own θ (Gemma 3): its legacy key and default.
    #[serde(default)]
    pub local_theta: Option<LocalTheta>,
}

fn one() -> f64 {
    1.0
}

#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalTheta {
    pub key: String,
    pub default: f64,
}

/// Which layers attend within `sliding_window` when the config lists no `layer_types`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum SlidingLayers {
    /// None: the family has no sliding window.
    #[default]
    None,
    /// Every layer, when `sliding_window` is set (Mistral, Phi-3).
    All,
    /// Layers from `max_window_layers` on, when `use_sliding_window` (Qwen2/3).
    FromMaxWindowLayers,
    /// All but every `n`-th layer; `n` from the key when present (Gemma 2/3).
    Pattern { key: Option<String>, default: usize },
}

impl DecoderLayout {
    /// The stored name of `part` of block `layer` (`part` relative, no suffix).
    pub fn layer_tensor(&self, layer: usize, part: &str) -> String {
        format!("{}.{part}", self.layers.replace("{i}", &layer.to_string()))
    }

    /// Whether each layer attends within a sliding window, for a config
    /// without a `layer_types` list.
    pub fn default_sliding(&self, config: &ModelConfig, layers: usize) -> Vec<bool> {
        let window = config.get("sliding_window").is_some_and(|v| !v.is_null());
        (0..layers)
            .map(|i| match &self.sliding_layers {
                SlidingLayers::None => false,
                SlidingLayers::All => window,
                SlidingLayers::FromMaxWindowLayers => {
                    let enabled = config
                        .get("use_sliding_window")
                        .and_then(Value::as_bool)
                        .unwrap_or(false);
                    let from = config.usize("max_window_layers").unwrap_or(0);
                    window && enabled && i >= from
                }
                SlidingLayers::Pattern { key, default } => {
                    let n = key
                        .as_deref()
                        .and_then(|k| config.usize(k))
                        .unwrap_or(*default)
                        .max(1);
                    (i + 1) % n != 0
                }
            })
            .collect()
    }
}

/// How a block's fused projection stores its logical parts by rows: the
/// one reading of fused layouts, which the forward pass uses to split a
/// fused projection's output, PLeaS to split and rejoin fused weights, and
/// MatFormer extraction to cut each half of a fused `[gate; up]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowSplit {
    /// The parts are separate tensors: nothing to split.
    Separate,
    /// One tensor, the parts stacked by rows, of these sizes.
    Stacked(Vec<i64>),
    /// One tensor, rows grouped per head as `[part_0; part_1; part_2]`, each
    /// `head_dim` rows (GPT-NeoX's `[q_h; k_h; v_h]`).
    PerHead { heads: i64, head_dim: i64 },
}

impl Projections {
    /// How q, k and v sit in the stored tensor(s).
    pub fn row_split(&self, heads: i64, kv_heads: i64, head_dim: i64) -> RowSplit {
        match self {
            Projections::Separate(_) => RowSplit::Separate,
            Projections::Concatenated(_) => RowSplit::Stacked(vec![
                heads * head_dim,
                kv_heads * head_dim,
                kv_heads * head_dim,
            ]),
            Projections::InterleavedByHead(_) => RowSplit::PerHead { heads, head_dim },
        }
    }
}

impl MlpInput {
    /// How the MLP's input parts (gate and up, or up alone) of `width`
    /// hidden units each sit in the stored tensor(s).
    pub fn row_split(&self, width: i64) -> RowSplit {
        match self {
            MlpInput::Gated(_) | MlpInput::Plain(_) => RowSplit::Separate,
            MlpInput::GatedConcatenated(_) => RowSplit::Stacked(vec![width, width]),
        }
    }
}

impl RowSplit {
    /// The parts of `fused` along `dim` (the rows of a weight or bias, or
    /// the last dimension of a fused projection's output); `[fused]` when
    /// the parts are stored separately.
    pub fn split(&self, fused: &tch::Tensor, dim: i64) -> Vec<tch::Tensor> {
        match self {
            RowSplit::Separate => vec![fused.shallow_clone()],
            RowSplit::Stacked(sizes) => {
                let mut start = 0;
                sizes
                    .iter()
                    .map(|&len| {
                        let part = fused.narrow(dim, start, len);
                        start += len;
                        part
                    })
                    .collect()
            }
            RowSplit::PerHead { heads, head_dim } => {
                let dim = if dim < 0 {
                    fused.dim() as i64 + dim
                } else {
                    dim
                };
                let mut grouped = fused.size();
                grouped.splice(dim as usize..dim as usize + 1, [*heads, 3, *head_dim]);
                let mut flat = fused.size();
                flat[dim as usize] = heads * head_dim;
                let view = fused.view(grouped.as_slice());
                (0..3)
                    .map(|i| view.select(dim + 1, i).reshape(flat.as_slice()))
                    .collect()
            }
        }
    }

    /// The fused tensor from its parts along `dim` (the inverse of
    /// [`RowSplit::split`]).
    pub fn join(&self, parts: &[&tch::Tensor], dim: i64) -> tch::Tensor {
        match self {
            RowSplit::Separate => {
                assert_eq!(parts.len(), 1, "separate parts are not joined");
                parts[0].shallow_clone()
            }
            RowSplit::Stacked(_) => tch::Tensor::cat(parts, dim),
            RowSplit::PerHead { heads, head_dim } => {
                let dim = if dim < 0 {
                    parts[0].dim() as i64 + dim
                } else {
                    dim
                };
                let mut grouped = parts[0].size();
                grouped.splice(dim as usize..dim as usize + 1, [*heads, 1, *head_dim]);
                let mut flat = parts[0].size();
                flat[dim as usize] = 3 * heads * head_dim;
                let views: Vec<tch::Tensor> =
                    parts.iter().map(|p| p.view(grouped.as_slice())).collect();
                tch::Tensor::cat(&views, dim + 1).reshape(flat.as_slice())
            }
        }
    }

    /// Where each part's rows are in the fused tensor, for a layout whose
    /// parts are contiguous (`None` for per-head groups).
    pub fn ranges(&self) -> Option<Vec<std::ops::Range<usize>>> {
        match self {
            RowSplit::Separate => None,
            RowSplit::Stacked(sizes) => {
                let mut start = 0;
                Some(
                    sizes
                        .iter()
                        .map(|&len| {
                            let range = start..start + len as usize;
                            start = range.end;
                            range
                        })
                        .collect(),
                )
            }
            RowSplit::PerHead { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Tensor;

    /// Rows numbered 0.. so every part can be read off its values.
    fn numbered(rows: i64, columns: i64) -> Tensor {
        Tensor::arange(rows * columns, (tch::Kind::Float, tch::Device::Cpu)).view([rows, columns])
    }

    fn rows_of(t: &Tensor) -> Vec<i64> {
        let first = t.select(-1, 0) / 2;
        Vec::<f32>::try_from(first.flatten(0, -1))
            .unwrap()
            .into_iter()
            .map(|v| v as i64)
            .collect()
    }

    #[test]
    fn fused_projections_split_into_their_parts_and_join_back() {
        let sep = |n: &str| n.to_owned();
        // [q; k; v] with 4 query heads, 2 KV heads, head_dim 3.
        let stacked = Projections::Concatenated(sep("qkv")).row_split(4, 2, 3);
        assert_eq!(stacked.ranges(), Some(vec![0..12, 12..18, 18..24]));
        let fused = numbered(24, 2);
        let parts = stacked.split(&fused, 0);
        assert_eq!(rows_of(&parts[1]), (12..18).collect::<Vec<_>>());
        let refs: Vec<&Tensor> = parts.iter().collect();
        assert!(stacked.join(&refs, 0).equal(&fused));

        // [q_h; k_h; v_h] per head, 2 heads of 3 rows: q is rows 0-2 and 9-11.
        let per_head = Projections::InterleavedByHead(sep("qkv")).row_split(2, 2, 3);
        assert_eq!(per_head.ranges(), None);
        let fused = numbered(18, 2);
        let parts = per_head.split(&fused, 0);
        assert_eq!(rows_of(&parts[0]), vec![0, 1, 2, 9, 10, 11]);
        assert_eq!(rows_of(&parts[2]), vec![6, 7, 8, 15, 16, 17]);
        let refs: Vec<&Tensor> = parts.iter().collect();
        assert!(per_head.join(&refs, 0).equal(&fused));
        // A projection's output splits along its last dimension the same way.
        let output = fused.transpose(0, 1).unsqueeze(0).contiguous(); // [1, 2, 18]
        let by_output = per_head.split(&output, -1);
        assert!(by_output[2].squeeze_dim(0).transpose(0, 1).equal(&parts[2]));

        let gate_up = MlpInput::GatedConcatenated(sep("gate_up")).row_split(5);
        assert_eq!(gate_up.ranges(), Some(vec![0..5, 5..10]));
        let separate = MlpInput::Gated([sep("gate"), sep("up")]).row_split(5);
        assert_eq!(separate, RowSplit::Separate);
        assert_eq!(separate.split(&fused, 0).len(), 1);
    }
}
