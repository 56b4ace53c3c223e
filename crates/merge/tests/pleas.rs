//! PLeaS on a model and a hidden permutation of it: every matching method
//! finds the permutation again, and the least-squares merge reproduces the
//! model.

mod common;

use std::collections::BTreeMap;

use amalgam_merge::pleas::permutation::{apply, llama};
use amalgam_merge::pleas::statistics::Metric;
use amalgam_merge::pleas::{merge, Activations, Matching, Model, Options, Taps, Widen};
use amalgam_nn::Decoder;
use common::{config, shape, structured_model};
use tch::{Device, Kind, Tensor};

struct Forward<'a>(&'a Decoder);

impl Activations for Forward<'_> {
    fn taps(&self, ids: &Tensor) -> amalgam_merge::Result<Taps> {
        let (_, taps) = tch::no_grad(|| self.0.forward_taps(ids));
        let [residual, attention, ffn] = taps.flattened();
        Ok(Taps {
            residual,
            attention,
            ffn,
        })
    }
}

/// A random model with some structure (larger weights, uneven norm scales)
/// and a copy of it with every group shuffled.
fn model_and_shuffled_copy() -> (Decoder, Decoder) {
    let model = structured_model(config(false, vec![40, 32]), 11, 5.0);
    let groups = llama(&shape(&model.config));
    let perms: Vec<Vec<usize>> = groups
        .iter()
        .enumerate()
        .map(|(i, g)| (0..g.units).map(|u| (u * 7 + 3 + i) % g.units).collect())
        .collect();
    let mut tensors = copy(&model.tensors());
    apply(&mut tensors, &groups, &perms).unwrap();
    let shuffled = Decoder::from_tensors(model.config.clone(), &tensors, Device::Cpu).unwrap();
    (model, shuffled)
}

fn copy(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.detach().copy()))
        .collect()
}

fn batches() -> Vec<Tensor> {
    (0..3)
        .map(|b| {
            let ids: Vec<i64> = (0..4 * 24).map(|i| (i * 37 + b * 101) % 258).collect();
            Tensor::from_slice(&ids).view([4, 24])
        })
        .collect()
}

fn run(a: &Decoder, b: &Decoder, matching: Matching, budget: f64, least_squares: bool) -> Decoder {
    run_widening(a, b, matching, budget, least_squares, Widen::Ffn)
}

fn run_widening(
    a: &Decoder,
    b: &Decoder,
    matching: Matching,
    budget: f64,
    least_squares: bool,
    widen: Widen,
) -> Decoder {
    let (ta, tb) = (copy(&a.tensors()), copy(&b.tensors()));
    let merged = merge(
        &shape(&a.config),
        Model {
            tensors: &ta,
            activations: &Forward(a),
        },
        Model {
            tensors: &tb,
            activations: &Forward(b),
        },
        &batches(),
        &Options {
            matching,
            budget,
            ridge: 1e-8,
            kind: Kind::Double,
            least_squares,
            widen,
        },
        &|| {},
    )
    .unwrap();
    let mut config = a.config.clone();
    config.intermediate_sizes = merged.ffn_widths.clone();
    config.hidden_size = merged.hidden;
    config.num_attention_heads =
        merged.kv_heads * (config.num_attention_heads / config.num_key_value_heads);
    config.num_key_value_heads = merged.kv_heads;
    Decoder::from_tensors(config, &merged.tensors, Device::Cpu).unwrap()
}

fn max_logit_difference(a: &Decoder, b: &Decoder) -> f64 {
    let ids = Tensor::from_slice(&(0..40).map(|i| (i * 13 + 5) % 258).collect::<Vec<i64>>())
        .view([2, 20]);
    tch::no_grad(|| {
        (a.forward(&ids) - b.forward(&ids))
            .abs()
            .max()
            .double_value(&[])
    })
}

#[test]
fn every_matching_finds_a_hidden_permutation() {
    let (model, shuffled) = model_and_shuffled_copy();
    // Without alignment the average is a different function.
    let naive = run(&model, &shuffled, Matching::None, 1.0, false);
    assert!(max_logit_difference(&model, &naive) > 1.0);
    for matching in [
        Matching::Activation(Metric::Correlation),
        Matching::Activation(Metric::Distance),
        Matching::Weight { seed: 3 },
    ] {
        // Averaging the model with its re-aligned copy gives the model back.
        let averaged = run(&model, &shuffled, matching, 1.0, false);
        let diff = max_logit_difference(&model, &averaged);
        assert!(diff < 1e-4, "{matching:?}: logits differ by {diff}");
    }
}

#[test]
fn least_squares_merge_of_a_model_with_its_shuffled_copy_is_the_model() {
    let (model, shuffled) = model_and_shuffled_copy();
    let matching = Matching::Activation(Metric::Correlation);
    let merged = run(&model, &shuffled, matching, 1.0, true);
    let diff = max_logit_difference(&model, &merged);
    assert!(diff < 1e-3, "PLeaS 1x: logits differ by {diff}");
    // Wider FFNs: separate units are duplicates; the function is still the
    // model's. (A wider residual stream is not: duplicated channels change
    // what RMSNorm divides by.)
    let wider = run(&model, &shuffled, matching, 1.4, true);
    assert!(wider.config.intermediate_sizes.iter().sum::<usize>() > 72);
    let diff = max_logit_difference(&model, &wider);
    assert!(diff < 1e-2, "PLeaS 1.4x: logits differ by {diff}");
}
