//! Training is seeded and reproducible, and it learns: the same seeds give
//! bit-identical weights, and the loss on held-out text falls.

use amalgam_nn::data::{Domain, Sampler, Split};
use amalgam_nn::eval::{evaluate, EvalOptions};
use amalgam_nn::train::{train, TrainOptions};
use amalgam_nn::Decoder;
use amalgam_zoo::ZooSize;
use tch::Device;

fn trained(steps: usize, data_seed: u64) -> Decoder {
    let size = ZooSize::named("micro").unwrap();
    let mut model = Decoder::new(size.shape.clone(), Device::Cpu, 7);
    let mut sampler = Sampler::new(&[Domain::Code], Split::Train, data_seed);
    let options = TrainOptions {
        steps,
        ..size.pretrain.clone()
    };
    train(&mut model, &mut sampler, &options, &mut |_, _| {}).unwrap();
    model
}

fn same_weights(a: &Decoder, b: &Decoder) -> bool {
    let (a, b) = (a.vs.variables(), b.vs.variables());
    a.len() == b.len() && a.iter().all(|(name, t)| t.equal(&b[name]))
}

#[test]
fn same_seeds_same_weights_other_data_seed_other_weights() {
    let first = trained(6, 1);
    assert!(same_weights(&first, &trained(6, 1)));
    assert!(!same_weights(&first, &trained(6, 2)));
}

#[test]
fn training_lowers_held_out_loss() {
    let options = EvalOptions {
        seq_len: 65,
        max_windows: 16,
        batch: 16,
    };
    let loss = |model: &Decoder| evaluate(model, None, Domain::Code, &options, &mut |_| {}).loss;
    let (before, after) = (loss(&trained(0, 1)), loss(&trained(150, 1)));
    assert!(
        after < before - 1.0,
        "held-out code loss {before} → {after}"
    );
}
