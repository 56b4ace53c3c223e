//! Per-layer FFN widths: config.json carries them as a list, the model saves
//! and loads with them, the taps report them, and a uniform width is written
//! as the integer transformers expects.

use amalgam_checkpoint::{ModelCard, WriteOptions};
use amalgam_nn::zoo::ZooSize;
use amalgam_nn::{tokenizer, Llama};
use tch::{Device, Kind, Tensor};

#[test]
fn per_layer_widths_round_trip_and_drive_the_forward_pass() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.intermediate_sizes = vec![40, 12];
    let model = Llama::new(shape.clone(), Device::Cpu, 3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested");
    model
        .save(
            &dir,
            &ModelCard::default(),
            &tokenizer::files(),
            &WriteOptions::default(),
        )
        .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["intermediate_size"], serde_json::json!([40, 12]));
    let loaded = Llama::load(&dir, Device::Cpu).unwrap();
    assert_eq!(loaded.config, shape);
    let ids = Tensor::randint(
        tokenizer::VOCAB_SIZE as i64,
        [2, 9],
        (Kind::Int64, Device::Cpu),
    );
    let (logits, taps) = tch::no_grad(|| loaded.forward_taps(&ids));
    assert!(logits.equal(&tch::no_grad(|| model.forward(&ids))));
    let widths: Vec<i64> = taps.ffn_hidden.iter().map(|t| t.size()[2]).collect();
    assert_eq!(widths, [40, 12]);
    assert_eq!(taps.residual.len(), 3);

    shape.intermediate_sizes = vec![24, 24];
    let config = shape.to_model_config();
    assert_eq!(
        config.get("intermediate_size"),
        Some(&serde_json::json!(24))
    );
}

#[test]
fn a_config_that_does_not_fit_the_weights_is_refused_by_tensor_name() {
    let shape = ZooSize::named("micro").unwrap().shape;
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("m");
    Llama::new(shape.clone(), Device::Cpu, 1)
        .save(&dir, &ModelCard::default(), &[], &WriteOptions::default())
        .unwrap();
    // A config that implies other widths: the error names the tensor and both shapes.
    let mut config = shape.to_model_config();
    config.set("intermediate_size", serde_json::json!(50));
    std::fs::write(dir.join("config.json"), config.to_json_pretty()).unwrap();
    let error = Llama::load(&dir, Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("model.layers.0.mlp.down_proj.weight") && error.contains("[32, 50]"),
        "{error}"
    );
}
