//! Per-layer FFN widths: config.json carries them as a list, the model saves
//! and loads with them, the taps report them, and a uniform width is written
//! as the integer transformers expects.

use amalgam_checkpoint::{ModelCard, WriteOptions};
use amalgam_nn::{tokenizer, Decoder};
use amalgam_zoo::ZooSize;
use tch::{Device, Kind, Tensor};

#[test]
fn per_layer_widths_round_trip_and_drive_the_forward_pass() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.intermediate_sizes = vec![40, 12];
    let model = Decoder::new(shape.clone(), Device::Cpu, 3);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("nested");
    model
        .save_with_tokenizer(&dir, &ModelCard::default())
        .unwrap();
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(config["intermediate_size"], serde_json::json!([40, 12]));
    let loaded = Decoder::load(&dir, Device::Cpu).unwrap();
    let mut read = loaded.config.clone();
    assert!(
        read.architecture.source.take().is_some(),
        "keeps its config.json"
    );
    assert_eq!(read, shape);
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
    Decoder::new(shape.clone(), Device::Cpu, 1)
        .save(
            &dir,
            &ModelCard::default(),
            None,
            &[],
            &WriteOptions::default(),
        )
        .unwrap();
    // A config that implies other widths: the error names the tensor and both shapes.
    let mut config = shape.to_model_config();
    config.set("intermediate_size", serde_json::json!(50));
    std::fs::write(dir.join("config.json"), config.to_json_pretty()).unwrap();
    let error = Decoder::load(&dir, Device::Cpu)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        error.contains("model.layers.0.mlp.down_proj.weight") && error.contains("[32, 50]"),
        "{error}"
    );
}

/// A model whose FFN weights are the first `widths` units of `full`'s.
fn sliced(full: &Decoder, widths: &[usize]) -> Decoder {
    let mut shape = full.config.clone();
    shape.intermediate_sizes = widths.to_vec();
    let small = Decoder::new(shape, Device::Cpu, 0);
    let source = full.vs.variables();
    tch::no_grad(|| {
        for (name, var) in small.vs.variables() {
            let mut value = source[&name].shallow_clone();
            for (dim, (&have, &want)) in value.size().clone().iter().zip(&var.size()).enumerate() {
                if have != want {
                    value = value.narrow(dim as i64, 0, want);
                }
            }
            var.shallow_clone().copy_(&value);
        }
    });
    small
}

#[test]
fn nested_forward_equals_the_sliced_model() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.intermediate_sizes = vec![96, 64];
    let full = Decoder::new(shape, Device::Cpu, 5);
    let ids = Tensor::randint(
        tokenizer::VOCAB_SIZE as i64,
        [3, 17],
        (Kind::Int64, Device::Cpu),
    );
    tch::no_grad(|| {
        let whole = full.forward_nested(&ids, &[96, 64]).unwrap();
        assert!(whole.equal(&full.forward(&ids)));
        for widths in [[12, 8], [48, 64], [1, 1]] {
            let nested = full.forward_nested(&ids, &widths).unwrap();
            let reference = sliced(&full, &widths).forward(&ids);
            let diff = (nested - reference).abs().max().double_value(&[]);
            assert!(diff < 1e-5, "{widths:?}: {diff}");
        }
    });
    for bad in [&[97, 64][..], &[0, 64], &[96]] {
        assert!(full.forward_nested(&ids, bad).is_err(), "{bad:?}");
    }
    assert_eq!(full.config.nested_widths(0.125), [12, 8]);
}

#[test]
fn nested_training_makes_the_small_submodel_work() {
    use amalgam_nn::data::{Domain, Sampler, Split};
    use amalgam_nn::train::{train, TrainOptions};
    let size = ZooSize::named("micro").unwrap();
    let eighth = size.shape.nested_widths(0.125);
    let eval_ids = Sampler::new(&[Domain::Prose], Split::Eval, 3).batch(16, 65, Device::Cpu);
    let eighth_loss = |nested: Vec<f64>| {
        let mut model = Decoder::new(size.shape.clone(), Device::Cpu, 9);
        let options = TrainOptions {
            steps: 150,
            nested,
            ..size.pretrain.clone()
        };
        let mut sampler = Sampler::new(&[Domain::Prose], Split::Train, 4);
        train(&mut model, &mut sampler, &options, &mut |_, _| {}).unwrap();
        tch::no_grad(|| {
            model
                .loss_nested(&eval_ids, Some(&eighth))
                .double_value(&[])
        })
    };
    let (plain, nested) = (
        eighth_loss(vec![]),
        eighth_loss(vec![0.125, 0.25, 0.5, 1.0]),
    );
    assert!(
        nested < plain - 0.1,
        "1/8-width held-out loss: plain {plain}, nested {nested}"
    );
}
