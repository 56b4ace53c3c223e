//! What a tensor name means in a decoder-only transformer checkpoint: which
//! layer it belongs to and what role it plays. Merge slices, FFN slicing and
//! stitching all key off this.

/// The role of a tensor within a Llama-family checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    Embedding,
    LmHead,
    FinalNorm,
    InputNorm,
    PostAttentionNorm,
    AttnQ,
    AttnK,
    AttnV,
    AttnO,
    MlpGate,
    MlpUp,
    MlpDown,
    /// Anything this module does not recognise; still carried through.
    Other,
}

/// The layer index and role of a tensor name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TensorName {
    pub layer: Option<usize>,
    pub role: Role,
}

/// Classifies a tensor name such as `model.layers.3.mlp.up_proj.weight`.
pub fn classify(name: &str) -> TensorName {
    TensorName {
        layer: layer_index(name),
        role: role(name),
    }
}

/// The block index in `…layers.N.…` (also `h.N`, `blocks.N`), if any.
pub fn layer_index(name: &str) -> Option<usize> {
    let mut parts = name.split('.');
    while let Some(part) = parts.next() {
        if matches!(part, "layers" | "h" | "blocks" | "layer") {
            if let Some(Ok(index)) = parts.clone().next().map(str::parse) {
                return Some(index);
            }
        }
    }
    None
}

fn role(name: &str) -> Role {
    let stem = name
        .strip_suffix(".weight")
        .or_else(|| name.strip_suffix(".bias"))
        .unwrap_or(name);
    let last = stem.rsplit('.').next().unwrap_or(stem);
    match last {
        "embed_tokens" | "wte" => Role::Embedding,
        "lm_head" => Role::LmHead,
        "q_proj" => Role::AttnQ,
        "k_proj" => Role::AttnK,
        "v_proj" => Role::AttnV,
        "o_proj" => Role::AttnO,
        "gate_proj" => Role::MlpGate,
        "up_proj" => Role::MlpUp,
        "down_proj" => Role::MlpDown,
        "input_layernorm" => Role::InputNorm,
        "post_attention_layernorm" => Role::PostAttentionNorm,
        "norm" if layer_index(name).is_none() => Role::FinalNorm,
        _ => Role::Other,
    }
}

/// The output head of a Llama-family checkpoint; tied checkpoints may omit
/// it (it is then the input embedding).
pub const LM_HEAD: &str = "lm_head.weight";

/// `config.json` fields that hold one entry per layer (when they are lists).
pub const PER_LAYER_CONFIG_FIELDS: &[&str] = &[
    "layer_types",
    "mlp_layer_types",
    "intermediate_size",
    "activation_sparsity_pattern",
];

/// The FFN width of a dense block's MLP, from its down projection
/// (`…layers.N.mlp.down_proj.weight`, `[hidden, width]`); `None` for any
/// other tensor (experts and shared experts have widths of their own).
pub fn mlp_width(name: &str, shape: &[usize]) -> Option<usize> {
    let layer = layer_index(name)?;
    let suffix = format!(".{layer}.mlp.down_proj.weight");
    (name.ends_with(&suffix) && shape.len() == 2).then(|| shape[1])
}

/// The number of blocks named in a set of tensor names (1 + the largest index).
pub fn layer_count<'a>(names: impl IntoIterator<Item = &'a str>) -> usize {
    names
        .into_iter()
        .filter_map(layer_index)
        .map(|i| i + 1)
        .max()
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama_names_are_classified() {
        let cases = [
            ("model.embed_tokens.weight", None, Role::Embedding),
            ("lm_head.weight", None, Role::LmHead),
            ("model.norm.weight", None, Role::FinalNorm),
            (
                "model.layers.0.input_layernorm.weight",
                Some(0),
                Role::InputNorm,
            ),
            (
                "model.layers.21.mlp.down_proj.weight",
                Some(21),
                Role::MlpDown,
            ),
            (
                "model.layers.7.self_attn.k_proj.weight",
                Some(7),
                Role::AttnK,
            ),
            (
                "model.layers.3.self_attn.rotary_emb.inv_freq",
                Some(3),
                Role::Other,
            ),
        ];
        for (name, layer, role) in cases {
            assert_eq!(classify(name), TensorName { layer, role }, "{name}");
        }
    }

    #[test]
    fn layer_count_is_one_past_the_largest_index() {
        let names = ["model.layers.0.a", "model.layers.11.b", "model.norm.weight"];
        assert_eq!(layer_count(names), 12);
        assert_eq!(layer_count(["lm_head.weight"]), 0);
    }
}
