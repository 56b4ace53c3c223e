//! Invariants of the merge methods, on random tensors (proptest).

use std::collections::BTreeMap;

use amalgam_merge::methods::task_vector::TaskVectorMethod;
use amalgam_merge::methods::*;
use amalgam_merge::sparsify::{magnitude_mask, random_mask};
use amalgam_merge::{MergeContext, MergeMethod};
use amalgam_recipe::{ParamScope, Resolved, Scalar};
use proptest::prelude::*;
use proptest::test_runner::RngSeed;
use tch::{Kind, Tensor};

/// Per-input parameters, by name.
type InputParams<'a> = Vec<Vec<(&'a str, f64)>>;
/// (method, has a base, shared parameters, per-input parameters)
type Case<'a> = (
    &'a dyn MergeMethod,
    bool,
    &'a [(&'a str, f64)],
    &'a InputParams<'a>,
);

/// Parameters for one call: shared ones and one map per input, with the
/// method's defaults filled in.
struct Call {
    shared: BTreeMap<String, Resolved>,
    per_input: Vec<BTreeMap<String, Resolved>>,
}

fn resolved(value: f64) -> Resolved {
    Resolved {
        value: Scalar::Number(value),
        at: None,
    }
}

fn call(
    method: &dyn MergeMethod,
    inputs: usize,
    base: Option<usize>,
    shared: &[(&str, f64)],
    per_input: &[Vec<(&str, f64)>],
) -> Call {
    let spec = method.spec();
    let mut shared_map = BTreeMap::new();
    let mut maps = vec![BTreeMap::new(); inputs];
    for p in &spec.params {
        let default = p.default.clone().map(|value| Resolved { value, at: None });
        match p.scope {
            ParamScope::Shared => {
                let given = shared
                    .iter()
                    .find(|(n, _)| *n == p.name)
                    .map(|(_, v)| resolved(*v));
                shared_map.insert(
                    p.name.to_owned(),
                    given
                        .or(default)
                        .expect("test gives required shared params"),
                );
            }
            scope => {
                for (i, map) in maps.iter_mut().enumerate() {
                    if scope == ParamScope::PerNonBase && Some(i) == base {
                        continue;
                    }
                    let given = per_input
                        .get(i)
                        .and_then(|ps| ps.iter().find(|(n, _)| *n == p.name))
                        .map(|(_, v)| resolved(*v));
                    if let Some(value) = given.or(default.clone()) {
                        map.insert(p.name.to_owned(), value);
                    }
                }
            }
        }
    }
    Call {
        shared: shared_map,
        per_input: maps,
    }
}

fn merge_with(
    method: &dyn MergeMethod,
    inputs: &[Tensor],
    base: Option<usize>,
    call: &Call,
    ids: Vec<u64>,
    seed: u64,
) -> Tensor {
    let cx = MergeContext {
        name: "model.layers.0.mlp.up_proj.weight",
        inputs,
        base,
        params: &call.shared,
        input_params: call.per_input.iter().collect(),
        input_ids: ids,
        seed,
    };
    method.merge(&cx).unwrap()
}

fn merge(
    method: &dyn MergeMethod,
    inputs: &[Tensor],
    base: Option<usize>,
    shared: &[(&str, f64)],
    per_input: &[Vec<(&str, f64)>],
) -> Tensor {
    let c = call(method, inputs.len(), base, shared, per_input);
    merge_with(
        method,
        inputs,
        base,
        &c,
        (0..inputs.len() as u64).collect(),
        0,
    )
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[])
}

/// A base and `n` fine-tunes of shape [rows, cols]: base ~ U(−1, 1), deltas smaller.
fn family(n: usize) -> impl Strategy<Value = (Tensor, Vec<Tensor>)> {
    (1usize..6, 1usize..9).prop_flat_map(move |(rows, cols)| {
        let len = rows * cols;
        (
            prop::collection::vec(-1.0f32..1.0, len),
            prop::collection::vec(prop::collection::vec(-0.1f32..0.1, len), n),
        )
            .prop_map(move |(base, deltas)| {
                let base = Tensor::from_slice(&base).reshape([rows as i64, cols as i64]);
                let models = deltas
                    .iter()
                    .map(|d| &base + Tensor::from_slice(d).reshape([rows as i64, cols as i64]))
                    .collect();
                (base, models)
            })
    })
}

fn with_base(base: &Tensor, models: &[Tensor]) -> Vec<Tensor> {
    models
        .iter()
        .map(Tensor::shallow_clone)
        .chain(std::iter::once(base.shallow_clone()))
        .collect()
}

const TASK_VECTOR_METHODS: &[&TaskVectorMethod] = &[
    &task_arithmetic::TASK_ARITHMETIC,
    &ties::TIES,
    &dare_linear::DARE_LINEAR,
    &dare_ties::DARE_TIES,
];

proptest! {
    // A fixed seed: CI explores the same cases every run (set PROPTEST_CASES to explore more).
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: RngSeed::Fixed(20_261_126), ..ProptestConfig::default() })]

    #[test]
    fn averaging_n_copies_returns_the_model((base, _) in family(0), n in 1usize..5, weights in prop::collection::vec(0.1f64..3.0, 4)) {
        let copies: Vec<Tensor> = (0..n).map(|_| base.copy()).collect();
        let per_input: Vec<Vec<(&str, f64)>> = weights[..n].iter().map(|&w| vec![("weight", w)]).collect();
        let out = merge(&linear::Linear, &copies, None, &[], &per_input);
        prop_assert!(max_diff(&out, &base) <= 1e-6);
    }

    #[test]
    fn reordering_models_does_not_change_the_result((base, models) in family(3), weights in prop::collection::vec(0.1f64..2.0, 3), densities in prop::collection::vec(0.2f64..1.0, 3), seed in any::<u64>()) {
        let per_input: Vec<Vec<(&str, f64)>> = (0..3).map(|i| vec![("weight", weights[i]), ("density", densities[i])]).collect();
        let order = [2usize, 0, 1];
        let reordered: Vec<Tensor> = order.iter().map(|&i| models[i].shallow_clone()).collect();
        let reordered_params: Vec<Vec<(&str, f64)>> = order.iter().map(|&i| per_input[i].clone()).collect();
        let ids: Vec<u64> = vec![10, 11, 12, 99];
        let reordered_ids: Vec<u64> = order.iter().map(|&i| ids[i]).chain([99]).collect();
        let methods: Vec<&dyn MergeMethod> = vec![&linear::Linear, &task_arithmetic::TASK_ARITHMETIC, &ties::TIES, &dare_linear::DARE_LINEAR, &dare_ties::DARE_TIES];
        for method in methods {
            let (inputs, reordered_inputs, base_index) = if method.spec().name == "linear" {
                (models.iter().map(Tensor::shallow_clone).collect::<Vec<_>>(), reordered.iter().map(Tensor::shallow_clone).collect::<Vec<_>>(), None)
            } else {
                (with_base(&base, &models), with_base(&base, &reordered), Some(3))
            };
            let a = merge_with(method, &inputs, base_index, &call(method, inputs.len(), base_index, &[], &per_input), ids.clone(), seed);
            let b = merge_with(method, &reordered_inputs, base_index, &call(method, inputs.len(), base_index, &[], &reordered_params), reordered_ids.clone(), seed);
            prop_assert!(max_diff(&a, &b) <= 1e-6, "{}", method.spec().name);
        }
    }

    #[test]
    fn task_arithmetic_with_lambda_or_weights_zero_returns_the_base((base, models) in family(2)) {
        let inputs = with_base(&base, &models);
        let ta = &task_arithmetic::TASK_ARITHMETIC;
        let weighted = vec![vec![("weight", 0.7)], vec![("weight", 0.4)]];
        prop_assert!(merge(ta, &inputs, Some(2), &[("lambda", 0.0)], &weighted).equal(&base));
        let zero = vec![vec![("weight", 0.0)], vec![("weight", 0.0)]];
        prop_assert!(merge(ta, &inputs, Some(2), &[], &zero).equal(&base));
    }

    #[test]
    fn task_arithmetic_with_one_model_of_weight_one_returns_it((base, models) in family(1)) {
        let out = merge(&task_arithmetic::TASK_ARITHMETIC, &with_base(&base, &models), Some(1), &[], &[vec![("weight", 1.0)]]);
        prop_assert!(max_diff(&out, &models[0]) <= 1e-6);
    }

    #[test]
    fn ties_at_density_one_with_agreeing_signs_is_normalised_task_arithmetic((base, models) in family(3), weights in prop::collection::vec(0.1f64..2.0, 3)) {
        // Make every delta share its sign with the first one.
        let sign = (&models[0] - &base).sign();
        let models: Vec<Tensor> = models.iter().map(|m| &base + (m - &base).abs() * &sign).collect();
        let per_input: Vec<Vec<(&str, f64)>> = weights.iter().map(|&w| vec![("weight", w)]).collect();
        let inputs = with_base(&base, &models);
        let ties = merge(&ties::TIES, &inputs, Some(3), &[], &per_input);
        let ta = merge(&task_arithmetic::TASK_ARITHMETIC, &inputs, Some(3), &[], &per_input);
        // Normalised task arithmetic: base + Σwδ / Σw, where δ ≠ 0.
        let total: f64 = weights.iter().sum();
        let expected = &base + (ta - &base) / total;
        prop_assert!(max_diff(&ties, &expected) <= 1e-5);
    }

    #[test]
    fn ties_trim_keeps_exactly_floor_density_n((_, models) in family(1), density in 0.01f64..1.0) {
        let delta = &models[0];
        let n = delta.numel() as f64;
        let kept = magnitude_mask(delta, density).sum(Kind::Int64).int64_value(&[]);
        prop_assert_eq!(kept, ((density * n) as i64).max(1));
    }

    #[test]
    fn dare_at_density_one_is_task_arithmetic((base, models) in family(2), seed in any::<u64>()) {
        let per_input = vec![vec![("weight", 0.6), ("density", 1.0)], vec![("weight", 0.9), ("density", 1.0)]];
        let inputs = with_base(&base, &models);
        let dare = merge_with(&dare_linear::DARE_LINEAR, &inputs, Some(2), &call(&dare_linear::DARE_LINEAR, 3, Some(2), &[], &per_input), vec![1, 2, 3], seed);
        let ta = merge(&task_arithmetic::TASK_ARITHMETIC, &inputs, Some(2), &[], &per_input);
        prop_assert!(dare.equal(&ta));
    }

    #[test]
    fn slerp_at_t_zero_and_one_returns_the_endpoints((base, models) in family(1)) {
        let inputs = with_base(&base, &models);
        let at = |t: f64| merge(&slerp::Slerp, &inputs, Some(1), &[("t", t)], &[]);
        prop_assert!(max_diff(&at(0.0), &base) <= 1e-6);
        prop_assert!(max_diff(&at(1.0), &models[0]) <= 1e-6);
    }

    #[test]
    fn permuting_hidden_units_commutes_with_merging((base, models) in family(3), seed in any::<u64>()) {
        let rows = base.size()[0];
        // A permutation of the rows (output units) from the seed.
        let mut order: Vec<i64> = (0..rows).collect();
        order.sort_by_key(|&i| amalgam_checkpoint::stream_seed(seed, "perm", i as u64));
        let index = Tensor::from_slice(&order);
        let permute = |t: &Tensor| t.index_select(0, &index);
        // Weights no signed combination of which is zero: multislerp's mean direction
        // cannot vanish even for one-entry tensors.
        let per_input = vec![vec![("weight", 0.6), ("density", 0.6)], vec![("weight", 0.3), ("density", 0.8)], vec![("weight", 0.2), ("density", 0.7)]];
        let density_one: Vec<Vec<(&str, f64)>> = per_input.iter().map(|p| vec![p[0], ("density", 1.0)]).collect();
        let cases: Vec<Case<'_>> = vec![
            (&linear::Linear, false, &[], &per_input),
            (&task_arithmetic::TASK_ARITHMETIC, true, &[], &per_input),
            (&ties::TIES, true, &[], &per_input),
            (&dare_linear::DARE_LINEAR, true, &[], &density_one),
            (&dare_ties::DARE_TIES, true, &[], &density_one),
            (&della::DELLA, true, &[], &density_one),
            (&breadcrumbs::BREADCRUMBS, true, &[], &per_input),
            (&breadcrumbs_ties::BREADCRUMBS_TIES, true, &[], &per_input),
            (&nuslerp::Nuslerp, false, &[], &per_input),
            (&multislerp::Multislerp, true, &[], &per_input),
            (&karcher::Karcher, false, &[], &per_input),
            (&model_stock::ModelStock, true, &[], &per_input),
            (&sce::Sce, true, &[("select_topk", 0.5)], &per_input),
        ];
        for (method, based, shared, params) in cases {
            let count = if method.spec().max_models == Some(2) { 2 } else { 3 };
            let models = &models[..count];
            let (inputs, base_index) = if based { (with_base(&base, models), Some(count)) } else { (models.iter().map(Tensor::shallow_clone).collect(), None) };
            let permuted: Vec<Tensor> = inputs.iter().map(permute).collect();
            let params = &params[..count];
            let merged_then_permuted = permute(&merge(method, &inputs, base_index, shared, params));
            let permuted_then_merged = merge(method, &permuted, base_index, shared, params);
            prop_assert!(max_diff(&merged_then_permuted, &permuted_then_merged) <= 1e-5, "{}", method.spec().name);
        }
        let pair = [base.shallow_clone(), models[0].shallow_clone()];
        let permuted_pair = [permute(&base), permute(&models[0])];
        for method in [&slerp::Slerp as &dyn MergeMethod, &nearswap::Nearswap] {
            let a = permute(&merge(method, &pair, Some(0), &[("t", 0.3)], &[]));
            let b = merge(method, &permuted_pair, Some(0), &[("t", 0.3)], &[]);
            prop_assert!(max_diff(&a, &b) <= 1e-5, "{}", method.spec().name);
        }
    }
}

/// Bit-for-bit equality (signed zeros and NaN payloads included).
fn same_bits(a: &Tensor, b: &Tensor) -> bool {
    let bits = |t: &Tensor| {
        let int = match t.kind().elt_size_in_bytes() {
            2 => Kind::Int16,
            4 => Kind::Int,
            _ => Kind::Int64,
        };
        t.contiguous().reshape([-1]).view_dtype(int)
    };
    a.size() == b.size() && a.kind() == b.kind() && bits(a).equal(&bits(b))
}

/// Every task-vector method (and linear) merged by libtorch kernels — the
/// path a CUDA device takes — against the fused CPU loops, on `inputs` in
/// each dtype: the same bits.
fn kernels_match_fused_loops(
    base: &Tensor,
    models: &[Tensor],
    weights: &[f64],
    densities: &[f64],
    seed: u64,
) -> Result<(), TestCaseError> {
    use amalgam_merge::methods::linear::average_by_kernels;
    let methods: [&TaskVectorMethod; 8] = [
        &task_arithmetic::TASK_ARITHMETIC,
        &ties::TIES,
        &dare_linear::DARE_LINEAR,
        &dare_ties::DARE_TIES,
        &breadcrumbs::BREADCRUMBS,
        &breadcrumbs_ties::BREADCRUMBS_TIES,
        &della::DELLA,
        &della_linear::DELLA_LINEAR,
    ];
    let n = models.len();
    let per_input: Vec<Vec<(&str, f64)>> = (0..n)
        .map(|i| vec![("weight", weights[i]), ("density", densities[i])])
        .collect();
    for kind in [Kind::Float, Kind::BFloat16, Kind::Half, Kind::Double] {
        let inputs: Vec<Tensor> = with_base(base, models)
            .iter()
            .map(|t| t.to_kind(kind))
            .collect();
        for method in methods {
            for shared in [
                &[][..],
                &[("lambda", 0.7), ("normalize", 0.0)][..],
                &[("dare_rescale_reciprocal", 1.0)][..],
            ] {
                let mut c = call(method, n + 1, Some(n), &[], &per_input);
                for &(name, value) in shared {
                    let value = if name == "lambda" {
                        Scalar::Number(value)
                    } else {
                        Scalar::Bool(value != 0.0)
                    };
                    c.shared
                        .insert(name.to_owned(), Resolved { value, at: None });
                }
                let cx = MergeContext {
                    name: "model.layers.0.mlp.up_proj.weight",
                    inputs: &inputs,
                    base: Some(n),
                    params: &c.shared,
                    input_params: c.per_input.iter().collect(),
                    input_ids: (0..=n as u64).collect(),
                    seed,
                };
                let kernels = method.merge_by_kernels(&cx).unwrap();
                // The merge pass reading the L1 pass's pruned deltas, or
                // forming and pruning them again.
                for keep_pruned in [true, false] {
                    let fused = method.merge_fused(&cx, keep_pruned).unwrap();
                    prop_assert!(
                        same_bits(&fused, &kernels),
                        "{} {kind:?} {shared:?} keep_pruned {keep_pruned}: {fused} vs {kernels}",
                        method.name
                    );
                }
            }
        }
        let fused = merge(&linear::Linear, &inputs[..n], None, &[], &per_input);
        let rounded: Vec<f64> = weights[..n].iter().map(|&w| f64::from(w as f32)).collect();
        let total = f64::from(rounded.iter().map(|&w| w as f32).sum::<f32>());
        let kernels = average_by_kernels(&inputs[..n], &rounded, Some(total));
        prop_assert!(same_bits(&fused, &kernels), "linear {kind:?}");
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, rng_seed: RngSeed::Fixed(20_261_202), ..ProptestConfig::default() })]

    #[test]
    fn libtorch_kernels_give_the_fused_loops_bits((base, models) in family(3), weights in prop::collection::vec(-0.5f64..2.0, 3), densities in prop::collection::vec(0.2f64..0.8, 3), seed in any::<u64>()) {
        // Deltas on a coarse grid: many tied magnitudes at the trim threshold.
        let models: Vec<Tensor> = models.iter().map(|m| &base + ((m - &base) * 64.0).round() / 64.0).collect();
        kernels_match_fused_loops(&base, &models, &weights, &densities, seed)?;
    }
}

#[test]
fn libtorch_kernels_give_the_fused_loops_bits_across_chunks() {
    // Several chunks of the fused loop, with magnitudes tied across chunk edges.
    let n = 3 * amalgam_merge::sparsify::CHUNK as i64 + 17;
    let base = Tensor::randn([n], (Kind::Float, tch::Device::Cpu));
    let models: Vec<Tensor> = (1..=2i64)
        .map(|k| {
            &base + (Tensor::arange(n, (Kind::Float, tch::Device::Cpu)) * k).remainder(7.0) / 8.0
                - 0.375
        })
        .collect();
    kernels_match_fused_loops(&base, &models, &[0.6, 0.8], &[0.3, 0.5], 11).unwrap();
}

#[test]
fn dare_keeps_a_binomial_fraction_and_depends_only_on_the_seed() {
    let delta = Tensor::ones([100_000], (Kind::Float, tch::Device::Cpu));
    for &p in &[0.1, 0.5, 0.9] {
        let kept = random_mask(&delta, p, 42).sum(Kind::Int64).int64_value(&[]) as f64;
        let n = 100_000.0;
        let sd = (n * p * (1.0 - p)).sqrt();
        assert!((kept - n * p).abs() < 5.0 * sd, "p={p}: kept {kept}");
    }
    let family: Vec<Tensor> = (0..3)
        .map(|i| {
            Tensor::from_slice(&[i as f32 * 0.1; 64]).reshape([8, 8])
                + Tensor::arange(64, (Kind::Float, tch::Device::Cpu)).reshape([8, 8])
                    * 0.01
                    * (i + 1) as f64
        })
        .collect();
    let dare = &dare_ties::DARE_TIES;
    let params = [
        vec![("weight", 0.5), ("density", 0.5)],
        vec![("weight", 0.5), ("density", 0.5)],
    ];
    let c = call(
        dare,
        3,
        Some(0),
        &[],
        &[vec![], params[0].clone(), params[1].clone()],
    );
    let run = |seed| merge_with(dare, &family, Some(0), &c, vec![1, 2, 3], seed);
    assert!(run(7).equal(&run(7)));
    assert!(!run(7).equal(&run(8)));
}

#[test]
fn every_task_vector_method_with_only_the_base_returns_it() {
    let base = Tensor::from_slice(&[1.0f32, -2.0, 3.0]);
    for method in TASK_VECTOR_METHODS {
        let out = merge(*method, &[base.copy()], Some(0), &[], &[]);
        assert!(out.equal(&base), "{}", method.name);
    }
}

#[test]
fn dare_reciprocal_rescale_divides_kept_entries_by_the_density() {
    let base = Tensor::zeros([2000], (Kind::Float, tch::Device::Cpu));
    let model = Tensor::ones([2000], (Kind::Float, tch::Device::Cpu));
    let dare = &dare_linear::DARE_LINEAR;
    let mut c = call(
        dare,
        2,
        Some(0),
        &[],
        &[vec![], vec![("weight", 1.0), ("density", 0.25)]],
    );
    c.shared.insert(
        "dare_rescale_reciprocal".into(),
        Resolved {
            value: Scalar::Bool(true),
            at: None,
        },
    );
    let out = merge_with(dare, &[base, model], Some(0), &c, vec![1, 2], 3);
    let kept = out.ne(0.0);
    // Every kept entry is 1 / 0.25; about a quarter are kept.
    assert!(out.masked_select(&kept).eq(4.0).all().int64_value(&[]) == 1);
    let fraction = kept.sum(Kind::Float).double_value(&[]) / 2000.0;
    assert!((fraction - 0.25).abs() < 0.05, "{fraction}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, rng_seed: RngSeed::Fixed(20_261_201), ..ProptestConfig::default() })]

    /// RAM: an entry one model alone changes keeps that model's whole change,
    /// so one fine-tune (or identical ones, all overlapping) gives it back;
    /// RAM+ with r = 0 is RAM; the order of the models does not matter.
    #[test]
    fn ram_keeps_unique_changes_whole_and_averages_shared_ones((base, models) in family(3), copies in 1usize..4) {
        let exact = [("epsilon", 0.0)];
        let one = merge(&ram::Ram, &with_base(&base, &models[..1]), Some(1), &exact, &[vec![], vec![]]);
        prop_assert!(max_diff(&one, &models[0]) <= 1e-6);
        let same: Vec<Tensor> = (0..copies).map(|_| models[0].copy()).collect();
        let averaged = merge(&ram::Ram, &with_base(&base, &same), Some(copies), &exact, &vec![vec![]; copies + 1]);
        prop_assert!(max_diff(&averaged, &models[0]) <= 1e-6);

        let per_input = vec![vec![]; 4];
        let all = with_base(&base, &models);
        let ram = merge(&ram::Ram, &all, Some(3), &[("epsilon", 0.01)], &per_input);
        let plus = merge(&ramplus_tl::RamplusTl, &all, Some(3), &[("epsilon", 0.01), ("r", 0.0)], &per_input);
        prop_assert!(max_diff(&ram, &plus) <= 1e-6);
        let reordered = with_base(&base, &[models[2].shallow_clone(), models[0].shallow_clone(), models[1].shallow_clone()]);
        for method in [&ram::Ram as &dyn MergeMethod, &ramplus_tl::RamplusTl] {
            let a = merge(method, &all, Some(3), &[("epsilon", 0.01)], &per_input);
            let b = merge(method, &reordered, Some(3), &[("epsilon", 0.01)], &per_input);
            prop_assert!(max_diff(&a, &b) <= 1e-6, "{}", method.spec().name);
        }
    }

    /// Arcee fusion takes each entry whole from one model or the other, and
    /// changes nothing when the other model is the base.
    #[test]
    fn arcee_fusion_picks_entries_from_one_model_or_the_other((base, models) in family(1)) {
        let inputs = with_base(&base, &models);
        let out = merge(&arcee_fusion::ArceeFusion, &inputs, Some(1), &[], &[vec![], vec![]]);
        let from_base = out.eq_tensor(&base);
        let from_other = out.eq_tensor(&models[0]);
        prop_assert!(from_base.logical_or(&from_other).all().int64_value(&[]) == 1);
        let same = merge(&arcee_fusion::ArceeFusion, &[base.copy(), base.copy()], Some(1), &[], &[vec![], vec![]]);
        prop_assert!(same.equal(&base));
    }
}
