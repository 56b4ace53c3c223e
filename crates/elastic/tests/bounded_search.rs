//! The Mix'n'Match budget search is polynomial: a 1,000-layer checkpoint
//! (whose exhaustive search did not finish in minutes) resolves to a
//! rule-abiding choice within the budget, quickly.

use amalgam_checkpoint::{Checkpoint, ModelCard, ModelConfig};
use amalgam_elastic::matformer::{resolve, Extraction, ModelLayout};
use amalgam_nn::{Decoder, DecoderConfig};
use amalgam_recipe::ExtractRecipe;
use tch::Device;

#[test]
fn a_budget_over_a_thousand_layers_resolves() {
    let layers = 1000;
    let serde_json::Value::Object(fields) = serde_json::json!({
        "model_type": "llama",
        "hidden_size": 8,
        "num_hidden_layers": layers,
        "num_attention_heads": 1,
        "num_key_value_heads": 1,
        "head_dim": 8,
        "intermediate_size": 16,
        "vocab_size": 16,
        "max_position_embeddings": 16,
        "tie_word_embeddings": true,
    }) else {
        unreachable!("an object")
    };
    let config = DecoderConfig::from_model_config(
        &ModelConfig::from_json(fields),
        std::path::Path::new("config.json"),
    )
    .unwrap();
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("deep");
    Decoder::new(config, Device::Cpu, 1)
        .save(&dir, &ModelCard::default(), None, &[], &Default::default())
        .unwrap();
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let layout = ModelLayout::read(&checkpoint).unwrap();
    assert_eq!(layout.layers(), layers);
    let total = checkpoint.parameter_count();
    for fraction in ["60%", "0.85", "0.999"] {
        let text = format!(
            "kind: extract\nmodel: {}\nbudget: {fraction}\n",
            dir.display()
        );
        let recipe = ExtractRecipe::parse(&text, "r.yml").unwrap();
        let spec = resolve(&recipe, &checkpoint, &layout).unwrap();
        assert_eq!(spec.kept.len(), layers);
        // Widths never narrow with depth; the FFN widths are 2, 4, 8, 16.
        assert!(spec.widths.windows(2).all(|w| w[0] <= w[1]), "{fraction}");
        let budget: f64 = fraction.trim_end_matches('%').parse().unwrap();
        let budget = if fraction.ends_with('%') {
            budget / 100.0
        } else {
            budget
        };
        let parameters = Extraction::plan(&checkpoint, &layout, spec)
            .unwrap()
            .parameters();
        assert!(
            parameters as f64 <= (total as f64 * budget).floor(),
            "{fraction}: {parameters} of {total}"
        );
        // Within one layer's step of the budget: the largest choice wins.
        assert!(
            parameters as f64 > total as f64 * budget - 8.0 * 3.0 * 8.0,
            "{fraction}: {parameters} of {total}"
        );
    }
}
