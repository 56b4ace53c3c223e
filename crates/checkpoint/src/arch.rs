//! Where a tensor name's block index is: `…layers.N.…` (also `h.N`,
//! `layer.N`, `blocks.N`: the segment before `{i}` in any family's layer
//! template, and a vision tower's). Merge slices, renumbering, FFN slicing
//! and stitching all key off this one reading. What a tensor *is*
//! (embedding, head, MLP projection) is the family's description's to say
//! ([`crate::family`]).

use std::ops::Range;
use std::sync::OnceLock;

/// Whether a name segment precedes a block index: the segment before `{i}`
/// in a described family's layer template (`model.layers.{i}`,
/// `transformer.h.{i}`, `encoder.layer.{i}`), or `blocks` (the vision
/// towers of multimodal checkpoints).
pub fn is_layer_keyword(segment: &str) -> bool {
    static KEYWORDS: OnceLock<Vec<String>> = OnceLock::new();
    let keywords = KEYWORDS.get_or_init(|| {
        let mut keywords: Vec<String> = crate::family::families()
            .iter()
            .filter_map(|f| f.layers())
            .filter_map(|layers| layers.strip_suffix(".{i}"))
            .map(|prefix| prefix.rsplit('.').next().unwrap_or(prefix).to_owned())
            .collect();
        keywords.push("blocks".into());
        keywords.sort();
        keywords.dedup();
        keywords
    });
    keywords.iter().any(|k| k == segment)
}

/// The block index of a tensor name and the byte range of its digits
/// (`model.layers.12.mlp.up_proj.weight` → `(12, 13..15)`): the first
/// segment of ASCII digits after a [layer keyword](is_layer_keyword).
/// Renumbering a block replaces that range.
pub fn locate(name: &str) -> Option<(usize, Range<usize>)> {
    let mut start = 0;
    let mut after_keyword = false;
    for part in name.split('.') {
        if after_keyword && !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()) {
            if let Ok(index) = part.parse() {
                return Some((index, start..start + part.len()));
            }
        }
        after_keyword = is_layer_keyword(part);
        start += part.len() + 1;
    }
    None
}

/// The block index of a tensor name, if it is inside the repeated layers.
pub fn layer_index(name: &str) -> Option<usize> {
    locate(name).map(|(index, _)| index)
}

/// `config.json` fields that hold one entry per layer (when they are lists).
pub const PER_LAYER_CONFIG_FIELDS: &[&str] = &[
    "layer_types",
    "mlp_layer_types",
    "intermediate_size",
    "activation_sparsity_pattern",
];

/// Where an output layer's per-layer config entries come from: the (text)
/// config of the model it was taken from, and its index there.
#[derive(Debug, Clone, Copy)]
pub struct LayerOrigin<'c> {
    pub config: &'c serde_json::Map<String, serde_json::Value>,
    pub layer: usize,
}

/// Rewrites the per-layer lists ([`PER_LAYER_CONFIG_FIELDS`]) that `config`
/// holds as lists for a model whose layer `i` is `origins[i]`: each entry
/// taken from the config and layer that layer comes from. The one rewrite
/// behind layer stacking (merge slices, passthrough) and layer dropping
/// (MatFormer extraction). Err: the field and output layer whose origin has
/// no entry.
pub fn restack_layer_lists(
    config: &mut serde_json::Map<String, serde_json::Value>,
    origins: &[LayerOrigin],
) -> Result<(), (&'static str, usize)> {
    for &field in PER_LAYER_CONFIG_FIELDS {
        if !config.get(field).is_some_and(serde_json::Value::is_array) {
            continue;
        }
        let entries = origins
            .iter()
            .enumerate()
            .map(|(i, origin)| {
                let list = origin.config.get(field).and_then(|l| l.as_array());
                list.and_then(|l| l.get(origin.layer))
                    .cloned()
                    .ok_or((field, i))
            })
            .collect::<Result<Vec<_>, _>>()?;
        config.insert(field.into(), entries.into());
    }
    Ok(())
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
    fn block_indices_are_located() {
        let cases = [
            ("model.embed_tokens.weight", None),
            ("lm_head.weight", None),
            ("model.norm.weight", None),
            ("model.layers.0.input_layernorm.weight", Some((0, 13..14))),
            ("model.layers.21.mlp.down_proj.weight", Some((21, 13..15))),
            ("transformer.h.7.attn.c_attn.weight", Some((7, 14..15))),
            ("encoder.layer.3.output.dense.bias", Some((3, 14..15))),
            // The first index after a keyword: the block, not the expert.
            (
                "model.layers.2.block_sparse_moe.experts.5.w1.weight",
                Some((2, 13..14)),
            ),
            // A keyword not followed by digits is passed over.
            ("model.layers.x.layers.4.a", Some((4, 22..23))),
            ("model.layers", None),
            ("model.layers.+3.a", None),
        ];
        for (name, located) in cases {
            assert_eq!(locate(name), located, "{name}");
            assert_eq!(layer_index(name), located.map(|(i, _)| i), "{name}");
        }
    }

    #[test]
    fn layer_count_is_one_past_the_largest_index() {
        let names = ["model.layers.0.a", "model.layers.11.b", "model.norm.weight"];
        assert_eq!(layer_count(names), 12);
        assert_eq!(layer_count(["lm_head.weight"]), 0);
    }
}
