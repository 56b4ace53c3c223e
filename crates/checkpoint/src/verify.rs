//! The last check before an output is committed: its `config.json` says what
//! its tensors are. A config that disagrees with the weights (a layer count,
//! a per-layer list, the vocabulary, the FFN width) loads nowhere, or loads
//! wrong; it is refused, never written.

use serde_json::Value;

use crate::arch::{classify, layer_count, PER_LAYER_CONFIG_FIELDS};
use crate::family;
use crate::{ModelConfig, TensorSpec};

/// What is wrong between `config` and the tensors of `specs`, if anything.
/// Multimodal configs (a `text_config`) are not checked: their towers number
/// layers of their own.
pub fn config_mismatch(config: &ModelConfig, specs: &[TensorSpec]) -> Option<String> {
    if let Some(problem) = config.invalid_size() {
        return Some(problem);
    }
    if config.get("text_config").is_some() {
        return None;
    }
    let layers = config.layer_count();
    let stored = layer_count(specs.iter().map(|s| s.name.as_str()));
    if let Some(layers) = layers {
        if stored > 0 && stored != layers {
            return Some(format!(
                "`{}` is {layers} but the weights hold {stored} layers",
                config.layer_count_key()
            ));
        }
        for field in PER_LAYER_CONFIG_FIELDS {
            if let Some(Value::Array(entries)) = config.get(field) {
                if entries.len() != layers {
                    return Some(format!(
                        "`{field}` has {} entries but the model has {layers} layers",
                        entries.len()
                    ));
                }
            }
        }
    }
    if let Some(vocab) = config.get("vocab_size").and_then(Value::as_u64) {
        let embedding = specs
            .iter()
            .find(|s| family::is_embedding(family::of(config), &s.name) && s.shape.len() == 2);
        if let Some(embedding) = embedding {
            if embedding.shape[0] as u64 != vocab {
                return Some(format!(
                    "`vocab_size` is {vocab} but {} has {} rows",
                    embedding.name, embedding.shape[0]
                ));
            }
        }
    }
    let widths = specs.iter().filter_map(|s| {
        let width = family::mlp_width(family::of(config), &s.name, &s.shape)?;
        Some((classify(&s.name).layer?, width))
    });
    for (layer, width) in widths {
        let expected = match config.get("intermediate_size") {
            Some(Value::Array(entries)) => entries.get(layer).and_then(Value::as_u64),
            Some(value) => value.as_u64(),
            None => continue,
        };
        if expected != Some(width as u64) {
            return Some(format!(
                "layer {layer}'s FFN is {width} wide but `intermediate_size` says {}",
                expected.map_or("otherwise".to_owned(), |w| w.to_string())
            ));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::LlamaShape;
    use crate::Dtype;
    use serde_json::json;

    fn with(config: &ModelConfig, key: &str, value: Value) -> ModelConfig {
        let mut config = config.clone();
        config.set(key, value);
        config
    }

    #[test]
    fn a_consistent_config_passes_and_each_disagreement_is_named() {
        let shape = LlamaShape::TINY;
        let specs = shape.specs(Dtype::F32);
        let config = shape.config(Dtype::F32);
        assert_eq!(config_mismatch(&config, &specs), None);
        let cases = [
            ("num_hidden_layers", json!(6), "hold 4 layers"),
            (
                "num_hidden_layers",
                json!("4"),
                "must be a positive integer",
            ),
            ("num_hidden_layers", json!(-1), "must be a positive integer"),
            ("hidden_size", json!(4.5), "must be a positive integer"),
            ("layer_types", json!(vec!["full_attention"; 3]), "3 entries"),
            ("vocab_size", json!(512), "384 rows"),
            ("intermediate_size", json!(128), "160 wide"),
            (
                "intermediate_size",
                json!([160, 160, 99, 160]),
                "layer 2's FFN",
            ),
        ];
        for (key, value, needle) in cases {
            let message = config_mismatch(&with(&config, key, value.clone()), &specs)
                .unwrap_or_else(|| panic!("{key}: {value} passed"));
            assert!(message.contains(needle), "{key}: {message}");
        }
        let per_layer = with(&config, "intermediate_size", json!(vec![160; 4]));
        assert_eq!(config_mismatch(&per_layer, &specs), None);
    }
}
