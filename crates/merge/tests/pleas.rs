//! PLeaS on a model and a hidden permutation of it: every matching method
//! finds the permutation again, and the least-squares merge reproduces the
//! model.

mod common;

use std::collections::BTreeMap;

use amalgam_merge::pleas::permutation::{apply, decoder};
use amalgam_merge::pleas::statistics::Metric;
use amalgam_merge::pleas::{merge, Matching, Options, PleasPlan, Widen};
use amalgam_merge::Progress;
use amalgam_nn::{supported_model_types, Decoder, Part};
use common::{config, family_config, random_model, structured_model};
use tch::{Device, Kind, Tensor};

/// A random model with some structure (larger weights, uneven norm scales)
/// and a copy of it with every group shuffled.
fn model_and_shuffled_copy() -> (Decoder, Decoder) {
    shuffled_copy(structured_model(config(false, vec![40, 32]), 11, 5.0))
}

/// The model and a copy of it with every permutation group shuffled.
fn shuffled_copy(model: Decoder) -> (Decoder, Decoder) {
    let groups = decoder(&model.config);
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

fn batches(vocab: i64) -> Vec<Tensor> {
    (0..3)
        .map(|b| {
            let ids: Vec<i64> = (0..4 * 24).map(|i| (i * 37 + b * 101) % vocab).collect();
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
    let options = Options {
        matching,
        budget,
        ridge: 1e-8,
        kind: Kind::Double,
        device: tch::Device::Cpu,
        least_squares,
        widen,
    };
    let plan = PleasPlan::new(&a.config, &options).unwrap();
    // Both models read part by part, as from a checkpoint: one block at a
    // time (weight matching, data-free, is the one step that needs both
    // whole models).
    let whole = matches!(matching, Matching::Weight { .. });
    let part_of = |model: &Decoder, part: &Part| {
        assert!(
            part.layers.len() <= 1 || whole,
            "asked for blocks {:?}",
            part.layers
        );
        Ok(model.part(part))
    };
    let source_a = |part: &Part| part_of(a, part);
    let source_b = |part: &Part| part_of(b, part);
    let mut tensors = BTreeMap::new();
    merge(
        &plan,
        [&source_a, &source_b],
        &batches(a.config.vocab_size as i64),
        &options,
        &mut |name, tensor| {
            assert!(tensors.insert(name, tensor).is_none(), "written twice");
            Ok(())
        },
        &Quiet,
    )
    .unwrap();
    Decoder::from_tensors(plan.merged_config(), &tensors, Device::Cpu).unwrap()
}

struct Quiet;

impl Progress for Quiet {
    fn start(&self, _: u64, _: &str) {}
    fn advance(&self, _: u64) {}
    fn finish(&self) {}
}

fn max_logit_difference(a: &Decoder, b: &Decoder) -> f64 {
    let vocab = a.config.vocab_size as i64;
    let ids = Tensor::from_slice(&(0..40).map(|i| (i * 13 + 5) % vocab).collect::<Vec<i64>>())
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

/// Every family (biases, fused projections, q/k norms, post-norms, `(1 + w)`
/// norms, LayerNorm with shifts, a parallel residual, tied and untied
/// heads): PLeaS of a model and a shuffled copy of it gives the model back.
#[test]
fn every_family_merged_with_its_shuffled_copy_is_itself() {
    let ids =
        Tensor::from_slice(&(0..64).map(|i| (i * 29 + 3) % 96).collect::<Vec<i64>>()).view([2, 32]);
    for family in supported_model_types() {
        for tied in [false, true] {
            let (model, shuffled) = shuffled_copy(random_model(&family_config(family, tied), 5));
            let matching = Matching::Activation(Metric::Correlation);
            let merged = run(&model, &shuffled, matching, 1.0, true);
            let (expected, got) = tch::no_grad(|| {
                (
                    model.loss(&ids).double_value(&[]),
                    merged.loss(&ids).double_value(&[]),
                )
            });
            assert!(
                (expected - got).abs() <= 1e-3,
                "{family} (tied {tied}): loss {got} against the model's {expected}"
            );
            let diff = max_logit_difference(&model, &merged);
            assert!(
                diff < 1e-2,
                "{family} (tied {tied}): logits differ by {diff}"
            );
        }
    }
}
