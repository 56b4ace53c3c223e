//! The parts of a decoder's `config.json` the forward pass needs: the shape
//! every family shares, and what differs between families ([`Architecture`]),
//! read through the family's description in `amalgam-checkpoint`.

use amalgam_checkpoint::decoder::{DecoderLayout, MlpInput, NormKind, Projections, SlidingLayers};
use amalgam_checkpoint::{family, ModelConfig};
use serde_json::{json, Map, Value};

use crate::{NnError, Result};

/// MatFormer's granularities: names and fractions of each FFN's width.
pub const GRANULARITIES: [(&str, f64); 4] = [("S", 0.125), ("M", 0.25), ("L", 0.5), ("XL", 1.0)];

/// The nested width at `fraction` of an FFN `full` units wide: rounded, at least 1.
pub fn nested_width(full: usize, fraction: f64) -> usize {
    ((full as f64 * fraction).round() as usize).clamp(1, full)
}

/// How RoPE frequencies are rescaled (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq)]
pub enum RopeScaling {
    /// Positions divided by `factor`.
    Linear { factor: f64 },
    /// Llama 3's band-wise rescale of the inverse frequencies.
    Llama3 {
        factor: f64,
        low_freq_factor: f64,
        high_freq_factor: f64,
        original_max_position_embeddings: f64,
    },
}

/// The MLP's activation function.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    Silu,
    /// GELU, exact (erf).
    Gelu,
    /// GELU's tanh approximation (`gelu_pytorch_tanh`, `gelu_new`).
    GeluTanh,
    Relu,
}

impl Activation {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "silu" | "swish" => Activation::Silu,
            "gelu" => Activation::Gelu,
            "gelu_pytorch_tanh" | "gelu_new" | "gelu_fast" => Activation::GeluTanh,
            "relu" => Activation::Relu,
            _ => return None,
        })
    }
}

/// What differs between decoder families, for one config: the family's
/// description ([`DecoderLayout`]) and the values its config keys hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Architecture {
    pub model_type: String,
    pub layout: &'static DecoderLayout,
    pub activation: Activation,
    pub qkv_bias: bool,
    pub output_bias: bool,
    pub mlp_bias: bool,
    pub parallel_residual: bool,
    /// The fraction of each head's dimensions RoPE rotates (the first ones).
    pub partial_rotary_factor: f64,
    /// Sliding-window layers' own RoPE θ (unscaled), where they have one (Gemma 3).
    pub local_rope_theta: Option<f64>,
    /// The window of the layers marked in `sliding_layers`.
    pub sliding_window: Option<usize>,
    /// Per layer: attends within `sliding_window` (empty: no layer does).
    pub sliding_layers: Vec<bool>,
    pub attention_softcap: Option<f64>,
    pub final_softcap: Option<f64>,
    /// The scalar whose inverse square root scales attention scores (`None`: head_dim).
    pub query_scale: Option<f64>,
    /// The `config.json` this was read from; written back (sizes updated) on
    /// save, so every family field survives. `None` for models built here.
    pub source: Option<ModelConfig>,
}

impl Architecture {
    /// The Llama family as amalgam's own models use it: no biases, SiLU,
    /// full rotary, no sliding window.
    pub fn llama() -> Self {
        Architecture {
            model_type: "llama".into(),
            layout: family::llama_decoder(),
            activation: Activation::Silu,
            qkv_bias: false,
            output_bias: false,
            mlp_bias: false,
            parallel_residual: false,
            partial_rotary_factor: 1.0,
            local_rope_theta: None,
            sliding_window: None,
            sliding_layers: Vec::new(),
            attention_softcap: None,
            final_softcap: None,
            query_scale: None,
            source: None,
        }
    }

    /// Whether block `layer` attends within the sliding window.
    pub fn slides(&self, layer: usize) -> bool {
        self.sliding_window.is_some() && self.sliding_layers.get(layer) == Some(&true)
    }
}

/// The model types amalgam's forward pass runs, for error messages.
pub fn supported_model_types() -> Vec<&'static str> {
    family::families()
        .iter()
        .filter(|f| f.decoder.is_some())
        .map(|f| f.model_type.as_str())
        .collect()
}

/// What a parameter is, which decides how a fresh model initialises it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParameterRole {
    /// A projection or embedding matrix: N(0, 0.02²).
    Weight,
    /// Zero.
    Bias,
    /// A norm's scale: the identity (1, or 0 where the norm adds 1).
    Norm,
}

/// One parameter of a model: its stored name, shape and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Parameter {
    pub name: String,
    pub shape: Vec<i64>,
    pub kind: ParameterRole,
}

/// [`DecoderConfig::parameters`]' list as it is built.
struct ParameterList {
    out: Vec<Parameter>,
    /// Norms carry a bias (LayerNorm).
    norm_bias: bool,
}

impl ParameterList {
    fn push(&mut self, stem: &str, suffix: &str, shape: Vec<i64>, kind: ParameterRole) {
        self.out.push(Parameter {
            name: format!("{stem}.{suffix}"),
            shape,
            kind,
        });
    }

    fn norm(&mut self, stem: &str, width: i64) {
        self.push(stem, "weight", vec![width], ParameterRole::Norm);
        if self.norm_bias {
            self.push(stem, "bias", vec![width], ParameterRole::Bias);
        }
    }

    fn linear(&mut self, stem: &str, rows: i64, cols: i64, bias: bool) {
        self.push(stem, "weight", vec![rows, cols], ParameterRole::Weight);
        if bias {
            self.push(stem, "bias", vec![rows], ParameterRole::Bias);
        }
    }
}

/// The stored-name stems (no `.weight`/`.bias`) of one block's parts.
pub struct BlockNames {
    /// Attention input, attention output, MLP input and MLP output norms.
    pub norms: [Option<String>; 4],
    /// q, k, v; or one fused tensor.
    pub qkv: Vec<String>,
    pub qk_norm: Option<[String; 2]>,
    pub output: String,
    /// gate and up; or one fused or ungated tensor.
    pub mlp_input: Vec<String>,
    pub mlp_output: String,
}

/// The most layers a config may claim.
const MAX_LAYERS: usize = 1 << 16;

/// A decoder's shape and family. `intermediate_sizes` holds one FFN width per
/// layer: config.json's `intermediate_size` is an integer for a uniform model
/// (what `transformers` loads) or a list for a nested one (ours only).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_sizes: Vec<usize>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
    pub architecture: Architecture,
}

impl DecoderConfig {
    pub fn num_hidden_layers(&self) -> usize {
        self.intermediate_sizes.len()
    }

    /// Query heads, key/value heads and head_dim, as tensor sizes.
    pub fn attention_sizes(&self) -> (i64, i64, i64) {
        (
            self.num_attention_heads as i64,
            self.num_key_value_heads as i64,
            self.head_dim as i64,
        )
    }

    /// Reads the shape and family from a checkpoint's config. A family
    /// without a description, or a feature the forward pass does not
    /// implement (an unknown activation or RoPE scaling), is an error that
    /// says what is supported.
    pub fn from_model_config(config: &ModelConfig, path: &std::path::Path) -> Result<Self> {
        let fail = |message: String| NnError::Config {
            path: path.to_path_buf(),
            message,
        };
        let model_type = config
            .model_type()
            .ok_or_else(|| fail("config.json names no `model_type`".into()))?;
        let layout = family::of(config)
            .and_then(|f| f.decoder.as_ref())
            .ok_or_else(|| {
                fail(format!(
                    "model_type `{model_type}`{} is not a decoder family amalgam can run; \
                     supported: {}",
                    config
                        .architecture()
                        .map(|a| format!(" ({a})"))
                        .unwrap_or_default(),
                    supported_model_types().join(", ")
                ))
            })?;
        // Every size the forward pass divides by or allocates from is a
        // positive integer: zero heads would divide by zero, a negative or
        // fractional count is no count at all.
        let positive = |key: &str, value: Option<&Value>| match value {
            Some(v) => match v.as_u64() {
                Some(n) if n > 0 => Ok(n as usize),
                _ => Err(fail(format!("`{key}` must be a positive integer, got {v}"))),
            },
            None => Err(fail(format!("missing `{key}`"))),
        };
        let int = |key: &str| positive(key, config.get(key));
        let present = |key: &str| config.get(key).filter(|v| !v.is_null());
        let optional = |key: &str| match present(key) {
            None => Ok(None),
            value => positive(key, value).map(Some),
        };
        let number = |key: &str| match present(key) {
            None => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(Some(x)),
                _ => Err(fail(format!("`{key}` must be a positive number, got {v}"))),
            },
        };
        let activation_name = layout
            .mlp
            .activation_keys
            .iter()
            .find_map(|k| present(k).and_then(Value::as_str))
            .unwrap_or(&layout.mlp.default_activation);
        let activation_name = layout
            .mlp
            .activation_aliases
            .get(activation_name)
            .map_or(activation_name, String::as_str);
        let activation = Activation::parse(activation_name).ok_or_else(|| {
            fail(format!(
                "activation `{activation_name}` is not supported \
                 (silu, gelu, gelu_pytorch_tanh, gelu_new, relu)"
            ))
        })?;
        let layers = int("num_hidden_layers")?;
        // Checked before anything is made per layer (a claimed 10¹² layers
        // would be an allocation the process cannot survive).
        if layers > MAX_LAYERS {
            return Err(fail(format!(
                "`num_hidden_layers` is {layers}, more than amalgam runs (at most {MAX_LAYERS}; \
                 the deepest published models have about 130)"
            )));
        }
        let intermediate_sizes = match config.get("intermediate_size") {
            Some(Value::Array(widths)) => widths
                .iter()
                .map(|w| w.as_u64().filter(|&w| w > 0).map(|w| w as usize))
                .collect::<Option<Vec<_>>>()
                .filter(|w| w.len() == layers)
                .ok_or_else(|| {
                    fail(format!(
                        "`intermediate_size` must be a positive integer or {layers} of them \
                         (one per layer)"
                    ))
                })?,
            _ => vec![int("intermediate_size")?; layers],
        };
        let hidden_size = int("hidden_size")?;
        let heads = int("num_attention_heads")?;
        let kv_heads = optional("num_key_value_heads")?.unwrap_or(heads);
        if heads % kv_heads != 0 {
            return Err(fail(format!(
                "{heads} attention heads are not a multiple of {kv_heads} key/value heads"
            )));
        }
        let head_dim = match optional("head_dim")? {
            Some(head_dim) => head_dim,
            None if hidden_size % heads == 0 => hidden_size / heads,
            None => {
                return Err(fail(format!(
                    "`hidden_size` {hidden_size} is not a multiple of {heads} attention heads \
                     (and there is no `head_dim`)"
                )))
            }
        };
        if matches!(layout.attention.qkv, Projections::InterleavedByHead(_)) && kv_heads != heads {
            return Err(fail(format!(
                "a fused per-head q/k/v projection needs as many key/value heads as heads \
                 ({kv_heads} ≠ {heads})"
            )));
        }
        let rope = RopeSettings::read(config, layout).map_err(fail)?;
        let rotary = rotary_dim(head_dim, rope.partial_rotary_factor);
        if rotary < 2 || rotary % 2 != 0 {
            return Err(fail(format!(
                "RoPE would rotate {rotary} of each head's {head_dim} dimensions \
                 (partial rotary factor {}); it needs a positive even number",
                rope.partial_rotary_factor
            )));
        }
        let sliding_window = match layout.sliding_layers {
            SlidingLayers::None => None,
            // Qwen2/3 keep a window size in configs that do not use it.
            SlidingLayers::FromMaxWindowLayers
                if present("use_sliding_window").and_then(Value::as_bool) != Some(true) =>
            {
                None
            }
            _ => optional("sliding_window")?,
        };
        let sliding_layers = match present("layer_types") {
            Some(Value::Array(types)) => {
                if types.len() != layers {
                    return Err(fail(format!(
                        "`layer_types` lists {} layers, the model has {layers}",
                        types.len()
                    )));
                }
                types
                    .iter()
                    .map(|t| match t.as_str() {
                        Some("sliding_attention") => Ok(true),
                        Some("full_attention") => Ok(false),
                        _ => Err(fail(format!(
                            "layer type {t} is not supported (sliding_attention, full_attention)"
                        ))),
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            _ => layout.default_sliding(config, layers),
        };
        // No sliding layer reads the same however the config says it.
        let sliding_layers = match sliding_layers.contains(&true) {
            true => sliding_layers,
            false => Vec::new(),
        };
        let key_number = |key: &Option<String>| key.as_deref().map_or(Ok(None), number);
        let architecture = Architecture {
            model_type: model_type.to_owned(),
            layout,
            activation,
            qkv_bias: layout.attention.qkv_bias.of(config),
            output_bias: layout.attention.output_bias.of(config),
            mlp_bias: layout.mlp.bias.of(config),
            parallel_residual: layout.parallel_residual.of(config),
            partial_rotary_factor: rope.partial_rotary_factor,
            local_rope_theta: rope.local_theta,
            sliding_window,
            sliding_layers,
            attention_softcap: key_number(&layout.attention_softcap)?,
            final_softcap: key_number(&layout.final_softcap)?,
            query_scale: key_number(&layout.query_scale)?,
            source: Some(config.clone()),
        };
        Ok(DecoderConfig {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_sizes,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            norm_eps: number(&layout.norm_eps)?.unwrap_or(1e-6),
            rope_theta: rope.theta,
            rope_scaling: rope.scaling,
            tie_word_embeddings: config.tie_word_embeddings(),
            max_position_embeddings: optional("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id: config.get("bos_token_id").and_then(Value::as_i64),
            eos_token_id: config.get("eos_token_id").and_then(Value::as_i64),
            architecture,
        })
    }

    /// The config.json of this shape (F32 weights), loadable by `transformers`
    /// when the FFN width is uniform.
    /// A config read from a checkpoint is written back with its sizes
    /// updated, every family field kept.
    pub fn to_model_config(&self) -> ModelConfig {
        let widths = &self.intermediate_sizes;
        let intermediate = if widths.iter().all(|&w| w == widths[0]) {
            json!(widths[0])
        } else {
            json!(widths)
        };
        if let Some(source) = &self.architecture.source {
            let mut config = source.clone();
            config.set("intermediate_size", intermediate);
            config.set_layer_count(self.num_hidden_layers());
            config.set("vocab_size", self.vocab_size.into());
            config.set("hidden_size", self.hidden_size.into());
            config.set("num_attention_heads", self.num_attention_heads.into());
            if config.get("num_key_value_heads").is_some()
                || self.num_key_value_heads != self.num_attention_heads
            {
                config.set("num_key_value_heads", self.num_key_value_heads.into());
            }
            if config.get("head_dim").is_some()
                || self.head_dim * self.num_attention_heads != self.hidden_size
            {
                config.set("head_dim", self.head_dim.into());
            }
            config.set("tie_word_embeddings", self.tie_word_embeddings.into());
            if config.get("layer_types").is_some_and(Value::is_array) {
                let types = (0..self.num_hidden_layers()).map(|i| {
                    let sliding = self.architecture.sliding_layers.get(i) == Some(&true);
                    if sliding {
                        "sliding_attention"
                    } else {
                        "full_attention"
                    }
                });
                config.set("layer_types", json!(types.collect::<Vec<_>>()));
            }
            config.set_dtype(amalgam_checkpoint::Dtype::F32);
            return config;
        }
        let rope_scaling = match &self.rope_scaling {
            None => Value::Null,
            Some(RopeScaling::Linear { factor }) => {
                json!({"rope_type": "linear", "factor": factor})
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => json!({
                "rope_type": "llama3",
                "factor": factor,
                "low_freq_factor": low_freq_factor,
                "high_freq_factor": high_freq_factor,
                "original_max_position_embeddings": original_max_position_embeddings,
            }),
        };
        let value = json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": intermediate,
            "num_hidden_layers": self.num_hidden_layers(),
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": rope_scaling,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "attention_bias": false,
            "mlp_bias": false,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "float32",
        });
        match value {
            Value::Object(fields) => ModelConfig::from_json(fields),
            _ => unreachable!("a JSON object"),
        }
    }

    /// The nested FFN widths at `fraction` of every layer's width (MatFormer's
    /// granularities 1/8, 1/4, 1/2, 1), rounded, at least 1.
    pub fn nested_widths(&self, fraction: f64) -> Vec<usize> {
        self.intermediate_sizes
            .iter()
            .map(|&f| nested_width(f, fraction))
            .collect()
    }

    /// The stored-name stems of block `layer`'s parts, from the family's description.
    /// The tensor stems (names without `.weight`/`.bias`) of block `layer`.
    pub fn block_names(&self, layer: usize) -> BlockNames {
        let layout = self.architecture.layout;
        let name = |part: &str| layout.layer_tensor(layer, part);
        let optional = |part: &Option<String>| part.as_deref().map(name);
        let norms = &layout.norms;
        let attention = &layout.attention;
        BlockNames {
            norms: [
                optional(&norms.attention_input),
                optional(&norms.attention_output),
                optional(&norms.mlp_input),
                optional(&norms.mlp_output),
            ],
            qkv: match &attention.qkv {
                Projections::Separate(parts) => parts.iter().map(|p| name(p)).collect(),
                Projections::Concatenated(part) | Projections::InterleavedByHead(part) => {
                    vec![name(part)]
                }
            },
            qk_norm: attention.qk_norm.as_ref().map(|n| [name(&n.q), name(&n.k)]),
            output: name(&attention.output),
            mlp_input: match &layout.mlp.input {
                MlpInput::Gated(parts) => parts.iter().map(|p| name(p)).collect(),
                MlpInput::GatedConcatenated(part) | MlpInput::Plain(part) => vec![name(part)],
            },
            mlp_output: name(&layout.mlp.output),
        }
    }

    /// Every parameter of a model of this shape: its Hugging Face name,
    /// shape and kind (the output head only when untied). The one place the
    /// model's tensors are listed: building, loading and counting follow it.
    pub fn parameters(&self) -> Vec<Parameter> {
        let arch = &self.architecture;
        let layout = arch.layout;
        let d = self.hidden_size as i64;
        let (heads, kv, hd) = self.attention_sizes();
        let mut list = ParameterList {
            out: Vec::new(),
            norm_bias: layout.norm == NormKind::Layer,
        };
        list.push(
            &layout.embedding,
            "weight",
            vec![self.vocab_size as i64, d],
            ParameterRole::Weight,
        );
        for (i, &width) in self.intermediate_sizes.iter().enumerate() {
            let f = width as i64;
            let names = self.block_names(i);
            for stem in names.norms.iter().flatten() {
                list.norm(stem, d);
            }
            let qkv_rows = match names.qkv.len() {
                3 => vec![heads * hd, kv * hd, kv * hd],
                _ => vec![(heads + 2 * kv) * hd],
            };
            for (stem, rows) in names.qkv.iter().zip(qkv_rows) {
                list.linear(stem, rows, d, arch.qkv_bias);
            }
            if let Some([q, k]) = &names.qk_norm {
                let across = layout
                    .attention
                    .qk_norm
                    .as_ref()
                    .is_some_and(|n| n.across_heads);
                let (q_width, k_width) = if across {
                    (heads * hd, kv * hd)
                } else {
                    (hd, hd)
                };
                list.push(q, "weight", vec![q_width], ParameterRole::Norm);
                list.push(k, "weight", vec![k_width], ParameterRole::Norm);
            }
            list.linear(&names.output, d, heads * hd, arch.output_bias);
            let mlp_rows = match &layout.mlp.input {
                MlpInput::Gated(_) => vec![f, f],
                MlpInput::GatedConcatenated(_) => vec![2 * f],
                MlpInput::Plain(_) => vec![f],
            };
            for (stem, rows) in names.mlp_input.iter().zip(mlp_rows) {
                list.linear(stem, rows, d, arch.mlp_bias);
            }
            list.linear(&names.mlp_output, d, f, arch.mlp_bias);
        }
        list.norm(&layout.final_norm, d);
        if !self.tie_word_embeddings {
            list.push(
                &layout.head[0],
                "weight",
                vec![self.vocab_size as i64, d],
                ParameterRole::Weight,
            );
        }
        list.out
    }

    /// Parameters, embeddings (and an untied head) included.
    pub fn parameter_count(&self) -> usize {
        self.parameters()
            .iter()
            .map(|p| p.shape.iter().product::<i64>() as usize)
            .sum()
    }

    /// Bytes of the F32 weights.
    pub fn weight_bytes(&self) -> u64 {
        4 * self.parameter_count() as u64
    }

    /// Bytes a no-grad F32 forward pass of `batch` sequences of `seq_len`
    /// tokens needs at its peak besides the weights: the residual stream and
    /// one block's attention (q, k, v and the output: the fused attention
    /// kernel never holds the scores) and FFN at a time, then the logits and
    /// their log-softmax. An estimate for refusing what cannot fit before
    /// anything is allocated; saturates, never wraps.
    pub fn forward_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        let tokens = (batch as u64).saturating_mul(seq_len as u64);
        let logits = tokens.saturating_mul(2 * self.vocab_size as u64 * 4);
        self.block_forward_bytes(batch, seq_len)
            .saturating_add(logits)
    }

    /// [`DecoderConfig::forward_bytes`] without the logits: running blocks alone.
    pub fn block_forward_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        let tokens = (batch as u64).saturating_mul(seq_len as u64);
        let widest_ffn = self.intermediate_sizes.iter().copied().max().unwrap_or(0) as u64;
        let per_token = 4 * self.hidden_size as u64
            + (2 * self.num_attention_heads as u64 + 2 * self.num_key_value_heads as u64)
                * self.head_dim as u64
            + 3 * widest_ffn;
        tokens.saturating_mul(per_token).saturating_mul(4)
    }

    /// The weights of block `layer`'s matrix products (attention projections
    /// and FFN; its two norms excluded): half its FLOPs per token.
    pub fn block_matrix_parameters(&self, layer: usize) -> usize {
        let (d, hd) = (self.hidden_size, self.head_dim);
        let attention = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads);
        let mlp_matrices = match self.architecture.layout.mlp.input {
            MlpInput::Plain(_) => 2,
            _ => 3,
        };
        attention + mlp_matrices * d * self.intermediate_sizes[layer]
    }
}

/// The dimensions of each head RoPE rotates (the first ones), as
/// transformers counts them.
pub(crate) fn rotary_dim(head_dim: usize, partial_rotary_factor: f64) -> usize {
    (head_dim as f64 * partial_rotary_factor) as usize
}

/// RoPE as a config states it: `rope_parameters` (transformers 5: flat, or
/// nested by layer type) or the legacy keys the family names.
struct RopeSettings {
    theta: f64,
    scaling: Option<RopeScaling>,
    partial_rotary_factor: f64,
    local_theta: Option<f64>,
}

impl RopeSettings {
    fn read(config: &ModelConfig, layout: &DecoderLayout) -> std::result::Result<Self, String> {
        let defaults = &layout.rope;
        let first_number = |keys: &[String]| {
            keys.iter()
                .find_map(|k| config.get(k).and_then(Value::as_f64))
        };
        let partial =
            first_number(&defaults.partial_keys).unwrap_or(defaults.partial_rotary_factor);
        let settings = match config.get("rope_parameters") {
            Some(Value::Object(parameters)) => {
                let nested = |key: &str| match parameters.get(key) {
                    Some(Value::Object(entry)) => Some(entry),
                    _ => None,
                };
                match (nested("full_attention"), nested("sliding_attention")) {
                    (None, None) => {
                        let (theta, scaling, partial) =
                            rope_entry(parameters, defaults.theta, partial)?;
                        RopeSettings {
                            theta,
                            scaling,
                            partial_rotary_factor: partial,
                            local_theta: None,
                        }
                    }
                    (full, sliding) => {
                        let empty = Map::new();
                        let (theta, scaling, partial) =
                            rope_entry(full.unwrap_or(&empty), defaults.theta, partial)?;
                        let local_default =
                            defaults.local_theta.as_ref().map_or(theta, |l| l.default);
                        let local =
                            match sliding {
                                None => None,
                                Some(entry) => match rope_entry(entry, local_default, partial)? {
                                    (theta, None, _) => Some(theta),
                                    (_, Some(_), _) => return Err(
                                        "RoPE scaling on sliding-window layers is not supported"
                                            .into(),
                                    ),
                                },
                            };
                        RopeSettings {
                            theta,
                            scaling,
                            partial_rotary_factor: partial,
                            local_theta: local,
                        }
                    }
                }
            }
            _ => RopeSettings {
                theta: first_number(&defaults.theta_keys).unwrap_or(defaults.theta),
                scaling: match config.get("rope_scaling") {
                    Some(Value::Object(scaling)) => rope_scaling(scaling)?,
                    _ => None,
                },
                partial_rotary_factor: partial,
                local_theta: defaults.local_theta.as_ref().map(|l| {
                    config
                        .get(&l.key)
                        .and_then(Value::as_f64)
                        .unwrap_or(l.default)
                }),
            },
        };
        let valid = |x: f64| x.is_finite() && x > 0.0;
        if !valid(settings.theta) || !settings.local_theta.is_none_or(valid) {
            return Err(format!(
                "RoPE θ must be a positive number, got {}",
                settings.theta
            ));
        }
        if !(settings.partial_rotary_factor > 0.0 && settings.partial_rotary_factor <= 1.0) {
            return Err(format!(
                "partial rotary factor must be in (0, 1], got {}",
                settings.partial_rotary_factor
            ));
        }
        Ok(settings)
    }
}

/// θ, scaling and rotary fraction from one `rope_parameters` entry.
fn rope_entry(
    entry: &Map<String, Value>,
    default_theta: f64,
    default_partial: f64,
) -> std::result::Result<(f64, Option<RopeScaling>, f64), String> {
    let theta = entry
        .get("rope_theta")
        .and_then(Value::as_f64)
        .unwrap_or(default_theta);
    let partial = entry
        .get("partial_rotary_factor")
        .and_then(Value::as_f64)
        .unwrap_or(default_partial);
    Ok((theta, rope_scaling(entry)?, partial))
}

/// The rescaling a RoPE entry (or legacy `rope_scaling`) names; `None` for the default.
fn rope_scaling(value: &Map<String, Value>) -> std::result::Result<Option<RopeScaling>, String> {
    let kind = value
        .get("rope_type")
        .or_else(|| value.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let number = |key: &str| {
        value
            .get(key)
            .and_then(Value::as_f64)
            .ok_or_else(|| format!("rope_scaling `{kind}` needs a number `{key}`"))
    };
    match kind {
        "default" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: number("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        })),
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (default, linear, llama3)"
        )),
    }
}
