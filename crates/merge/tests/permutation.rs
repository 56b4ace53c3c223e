//! The Llama permutation spec is a true symmetry: any valid permutation of
//! every group leaves a model's logits unchanged (F32, 1e-5).

mod common;

use std::collections::BTreeMap;

use amalgam_merge::pleas::permutation::{apply, llama, mlp, DecoderShape};
use amalgam_nn::Decoder;
use common::{config, shape, structured_model};
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
    #![proptest_config(ProptestConfig::with_cases(12))]
    #[test]
    fn permuting_every_group_leaves_the_logits_unchanged(seed in any::<u64>(), tied in any::<bool>()) {
        let config = config(tied, vec![40, 56]);
        let model = structured_model(config.clone(), seed, 6.0);
        let shape = shape(&config);
        let groups = llama(&shape);
        let mut state = seed;
        let perms: Vec<Vec<usize>> = groups.iter().map(|g| shuffle(g.units, &mut state)).collect();
        let mut tensors: BTreeMap<String, Tensor> =
            model.vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
        apply(&mut tensors, &groups, &perms).unwrap();
        let permuted = Decoder::new(config, Device::Cpu, 0);
        tch::no_grad(|| {
            for (name, mut var) in permuted.vs.variables() {
                var.copy_(&tensors[&name]);
            }
        });
        let ids: Vec<i64> = (0..2 * 16).map(|i| (i * 41 + (seed % 7) as i64) % 258).collect();
        let ids = Tensor::from_slice(&ids).view([2, 16]);
        let (a, b) = tch::no_grad(|| (model.forward(&ids), permuted.forward(&ids)));
        let diff = (&a - &b).abs().max().double_value(&[]);
        prop_assert!(diff <= 1e-5, "logits differ by {}", diff);
        prop_assert!(a.std(true).double_value(&[]) > 0.1, "the logits move");
        // And the permutation did change the weights (a real test).
        let q = "model.layers.0.self_attn.q_proj.weight";
        prop_assert!(!tensors[q].equal(&model.vs.variables()[q].to_kind(Kind::Float)));
    }
}

#[test]
fn invalid_permutations_are_refused() {
    let shape = DecoderShape {
        hidden: 4,
        heads: 2,
        kv_heads: 1,
        head_dim: 2,
        ffn: vec![3],
        untied_head: false,
        rms_norm_eps: 1e-5,
    };
    let groups = llama(&shape);
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
