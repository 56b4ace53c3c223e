//! Every family's permutation spec is a true symmetry: any valid permutation
//! of every group leaves a model's logits unchanged (F32, 1e-5).

mod common;

use std::collections::BTreeMap;

use amalgam_merge::pleas::permutation::{apply, decoder, mlp};
use amalgam_nn::{supported_model_types, Decoder};
use common::{config, family_config, random_model};
use proptest::prelude::*;
use tch::{Device, Kind, Tensor};

/// A seeded shuffle of 0..n (Fisher–Yates over a splitmix stream).
fn shuffle(n: usize, seed: &mut u64) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *seed;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        v.swap(i, ((z ^ (z >> 31)) % (i as u64 + 1)) as usize);
    }
    v
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(6))]
    /// Every family's spec, read from its description, is a true symmetry:
    /// biases move with their rows, q/k norms with their heads, fused
    /// projections by parts, NeoX's interleaved heads whole.
    #[test]
    fn permuting_every_group_leaves_every_familys_logits_unchanged(seed in any::<u64>(), tied in any::<bool>()) {
        for family in supported_model_types() {
            let config = family_config(family, tied);
            let model = random_model(&config, seed);
            let groups = decoder(&config);
            let mut state = seed;
            let perms: Vec<Vec<usize>> = groups.iter().map(|g| shuffle(g.units, &mut state)).collect();
            let mut tensors: BTreeMap<String, Tensor> =
                model.vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
            apply(&mut tensors, &groups, &perms).unwrap();
            // Every stored tensor is touched by some group (but per-head q/k
            // norms, which act on a head's dimensions, which never move).
            for (name, t) in &tensors {
                if t.size() == [config.head_dim as i64] {
                    continue;
                }
                prop_assert!(
                    groups.iter().any(|g| g.axes.iter().any(|a| &a.tensor == name)),
                    "{family}: {name} is in no group"
                );
            }
            let permuted = Decoder::from_tensors(config.clone(), &tensors, Device::Cpu).unwrap();
            let ids: Vec<i64> = (0..2 * 16).map(|i| (i * 41 + (seed % 7) as i64) % 96).collect();
            let ids = Tensor::from_slice(&ids).view([2, 16]);
            let (a, b) = tch::no_grad(|| (model.forward(&ids), permuted.forward(&ids)));
            let diff = ((&a - &b).abs().max() / a.abs().max()).double_value(&[]);
            prop_assert!(diff <= 1e-5, "{family}: logits differ by {diff} of their scale");
            prop_assert!(a.std(true).double_value(&[]) > 0.1, "{family}: the logits move");
            // And the permutation did change the weights (a real test).
            let moved = model
                .vs
                .variables()
                .iter()
                .filter(|(name, t)| t.dim() == 2 && !tensors[*name].equal(&t.to_kind(Kind::Float)))
                .count();
            prop_assert!(moved > 4, "{family}: only {moved} matrices moved");
        }
    }
}

#[test]
fn invalid_permutations_are_refused() {
    let mut small = config(false, vec![3]);
    (small.hidden_size, small.num_attention_heads) = (4, 2);
    (small.num_key_value_heads, small.head_dim) = (1, 2);
    let groups = decoder(&small);
    let mut tensors = BTreeMap::new();
    let mut perms: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units).collect()).collect();
    perms[0] = vec![0, 0, 1, 2];
    let message = apply(&mut tensors, &groups, &perms)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("group residual: not a permutation of 4 units"),
        "{message}"
    );
    perms[0] = vec![0, 1, 2, 3];
    let message = apply(&mut tensors, &groups, &perms)
        .unwrap_err()
        .to_string();
    assert!(
        message.contains("no tensor model.embed_tokens.weight"),
        "{message}"
    );
}

/// The plain-MLP spec is a symmetry too: permuting every hidden layer leaves
/// the outputs of a ReLU MLP unchanged.
#[test]
fn permuting_an_mlps_hidden_units_leaves_its_outputs_unchanged() {
    let widths = [5usize, 7, 6, 3];
    let hidden = &widths[1..widths.len() - 1];
    let mut tensors = BTreeMap::new();
    for (i, pair) in widths.windows(2).enumerate() {
        let options = (Kind::Float, Device::Cpu);
        tensors.insert(
            format!("layers.{i}.weight"),
            Tensor::randn([pair[1] as i64, pair[0] as i64], options),
        );
        tensors.insert(
            format!("layers.{i}.bias"),
            Tensor::randn([pair[1] as i64], options),
        );
    }
    let forward = |t: &BTreeMap<String, Tensor>, x: &Tensor| {
        let mut x = x.shallow_clone();
        for i in 0..widths.len() - 1 {
            x = x.linear(
                &t[&format!("layers.{i}.weight")],
                Some(&t[&format!("layers.{i}.bias")]),
            );
            if i < widths.len() - 2 {
                x = x.relu();
            }
        }
        x
    };
    let x = Tensor::randn([4, 5], (Kind::Float, Device::Cpu));
    let before = forward(&tensors, &x);
    let groups = mlp(hidden);
    let mut seed = 5;
    let perms: Vec<Vec<usize>> = groups.iter().map(|g| shuffle(g.units, &mut seed)).collect();
    let original = tensors["layers.1.weight"].copy();
    apply(&mut tensors, &groups, &perms).unwrap();
    assert!(!tensors["layers.1.weight"].equal(&original));
    let after = forward(&tensors, &x);
    assert!((before - after).abs().max().double_value(&[]) <= 1e-5);
}
