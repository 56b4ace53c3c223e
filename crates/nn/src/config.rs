//! The parts of a Llama-family `config.json` the forward pass needs.

use amalgam_checkpoint::ModelConfig;
use serde_json::{json, Value};

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

/// A Llama-style decoder's shape. `intermediate_sizes` holds one FFN width per
/// layer: config.json's `intermediate_size` is an integer for a uniform model
/// (what `transformers` loads) or a list for a nested one (ours only).
#[derive(Debug, Clone, PartialEq)]
pub struct LlamaConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_sizes: Vec<usize>,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub tie_word_embeddings: bool,
    pub max_position_embeddings: usize,
    pub bos_token_id: Option<i64>,
    pub eos_token_id: Option<i64>,
}

impl LlamaConfig {
    pub fn num_hidden_layers(&self) -> usize {
        self.intermediate_sizes.len()
    }

    /// Reads the shape from a checkpoint's config; unsupported features
    /// (biases, another activation, an unknown RoPE scaling) are errors.
    pub fn from_model_config(config: &ModelConfig, path: &std::path::Path) -> Result<Self> {
        let fail = |message: String| NnError::Config {
            path: path.to_path_buf(),
            message,
        };
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
        let optional = |key: &str| match config.get(key) {
            None | Some(Value::Null) => Ok(None),
            value => positive(key, value).map(Some),
        };
        let float = |key: &str, default: f64| {
            config.get(key).map_or(Ok(default), |v| match v.as_f64() {
                Some(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(fail(format!("`{key}` must be a positive number, got {v}"))),
            })
        };
        if let Some(act) = config.get("hidden_act").and_then(Value::as_str) {
            if act != "silu" {
                return Err(fail(format!(
                    "hidden_act `{act}` is not supported (silu only)"
                )));
            }
        }
        for key in ["attention_bias", "mlp_bias"] {
            if config.get(key).and_then(Value::as_bool) == Some(true) {
                return Err(fail(format!("`{key}: true` is not supported")));
            }
        }
        let layers = int("num_hidden_layers")?;
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
        let rope_scaling = match config.get("rope_scaling") {
            None | Some(Value::Null) => None,
            Some(scaling) => Some(rope_scaling(scaling).map_err(fail)?),
        };
        Ok(LlamaConfig {
            vocab_size: int("vocab_size")?,
            hidden_size,
            intermediate_sizes,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: float("rms_norm_eps", 1e-6)?,
            rope_theta: float("rope_theta", 10_000.0)?,
            rope_scaling,
            tie_word_embeddings: config.tie_word_embeddings(),
            max_position_embeddings: optional("max_position_embeddings")?.unwrap_or(2048),
            bos_token_id: config.get("bos_token_id").and_then(Value::as_i64),
            eos_token_id: config.get("eos_token_id").and_then(Value::as_i64),
        })
    }

    /// The config.json of this shape (F32 weights), loadable by `transformers`
    /// when the FFN width is uniform.
    pub fn to_model_config(&self) -> ModelConfig {
        let widths = &self.intermediate_sizes;
        let intermediate = if widths.iter().all(|&w| w == widths[0]) {
            json!(widths[0])
        } else {
            json!(widths)
        };
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
            "rms_norm_eps": self.rms_norm_eps,
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

    /// Every parameter of a model of this shape: its Hugging Face name and
    /// shape (the output head only when untied). The one place the model's
    /// layout is spelled out: building, loading and counting follow it.
    pub fn parameter_shapes(&self) -> Vec<(String, Vec<i64>)> {
        let (d, hd) = (self.hidden_size as i64, self.head_dim as i64);
        let (heads, kv) = (
            self.num_attention_heads as i64,
            self.num_key_value_heads as i64,
        );
        let mut shapes = vec![(
            "model.embed_tokens.weight".to_owned(),
            vec![self.vocab_size as i64, d],
        )];
        for (i, &width) in self.intermediate_sizes.iter().enumerate() {
            let f = width as i64;
            let layer =
                |part: &str, shape: Vec<i64>| (format!("model.layers.{i}.{part}.weight"), shape);
            shapes.extend([
                layer("input_layernorm", vec![d]),
                layer("self_attn.q_proj", vec![heads * hd, d]),
                layer("self_attn.k_proj", vec![kv * hd, d]),
                layer("self_attn.v_proj", vec![kv * hd, d]),
                layer("self_attn.o_proj", vec![d, heads * hd]),
                layer("post_attention_layernorm", vec![d]),
                layer("mlp.gate_proj", vec![f, d]),
                layer("mlp.up_proj", vec![f, d]),
                layer("mlp.down_proj", vec![d, f]),
            ]);
        }
        shapes.push(("model.norm.weight".to_owned(), vec![d]));
        if !self.tie_word_embeddings {
            shapes.push(("lm_head.weight".to_owned(), vec![self.vocab_size as i64, d]));
        }
        shapes
    }

    /// Parameters, embeddings (and an untied head) included.
    pub fn parameter_count(&self) -> usize {
        self.parameter_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<i64>() as usize)
            .sum()
    }

    /// Bytes of the F32 weights.
    pub fn weight_bytes(&self) -> u64 {
        4 * self.parameter_count() as u64
    }

    /// Bytes of the taps [`crate::Llama::forward_taps`] records for `batch`
    /// sequences of `seq_len` tokens: every block boundary's residual stream,
    /// every block's attention heads and FFN hidden units (F32).
    pub fn taps_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        let tokens = (batch as u64).saturating_mul(seq_len as u64);
        let layers = self.num_hidden_layers() as u64;
        let per_token = (layers + 1) * self.hidden_size as u64
            + layers * (self.num_attention_heads * self.head_dim) as u64
            + self
                .intermediate_sizes
                .iter()
                .map(|&f| f as u64)
                .sum::<u64>();
        tokens.saturating_mul(per_token).saturating_mul(4)
    }

    /// Bytes a no-grad F32 forward pass of `batch` sequences of `seq_len`
    /// tokens needs at its peak besides the weights: the residual stream and
    /// one block's attention (q, k, v and the output: the fused attention
    /// kernel never holds the scores) and FFN at a time, then the logits and
    /// their log-softmax. An estimate for refusing what cannot fit before
    /// anything is allocated; saturates, never wraps.
    pub fn forward_bytes(&self, batch: usize, seq_len: usize) -> u64 {
        let tokens = (batch as u64).saturating_mul(seq_len as u64);
        let widest_ffn = self.intermediate_sizes.iter().copied().max().unwrap_or(0) as u64;
        let per_token = 4 * self.hidden_size as u64
            + (2 * self.num_attention_heads as u64 + 2 * self.num_key_value_heads as u64)
                * self.head_dim as u64
            + 3 * widest_ffn
            + 2 * self.vocab_size as u64;
        tokens.saturating_mul(per_token).saturating_mul(4)
    }

    /// The weights of block `layer`'s matrix products (attention projections
    /// and FFN; its two norms excluded): half its FLOPs per token.
    pub fn block_matrix_parameters(&self, layer: usize) -> usize {
        let (d, hd) = (self.hidden_size, self.head_dim);
        let attention = d * hd * (2 * self.num_attention_heads + 2 * self.num_key_value_heads);
        attention + 3 * d * self.intermediate_sizes[layer]
    }
}

fn rope_scaling(value: &Value) -> std::result::Result<RopeScaling, String> {
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
        "linear" => Ok(RopeScaling::Linear {
            factor: number("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: number("factor")?,
            low_freq_factor: number("low_freq_factor")?,
            high_freq_factor: number("high_freq_factor")?,
            original_max_position_embeddings: number("original_max_position_embeddings")?,
        }),
        other => Err(format!(
            "rope_scaling type `{other}` is not supported (linear, llama3)"
        )),
    }
}
