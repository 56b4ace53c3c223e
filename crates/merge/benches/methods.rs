//! Per-method throughput on 16M-element tensors (4096 × 4096), a base and two
//! fine-tunes, one thread, as the executor runs each tensor. Prints a table.
//!
//!     cargo bench -p amalgam-merge --bench methods [-- METHOD | phases] [f32 | bf16]

use std::collections::BTreeMap;
use std::time::Instant;

use amalgam_merge::registry::METHODS;
use amalgam_merge::MergeContext;
use amalgam_recipe::{ParamScope, Resolved, Scalar};
use tch::{Device, Kind, Tensor};

const SIDE: i64 = 4096;
const RUNS: usize = 5;

/// Median seconds of `RUNS` calls.
fn time(mut f: impl FnMut()) -> f64 {
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let started = Instant::now();
            f();
            started.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

/// Where TIES' time goes, phase by phase, for one fine-tune of the base (BF16).
fn ties_phases(base: &Tensor, model: &Tensor) {
    use amalgam_merge::elementwise::{flat_cpu, slice};
    use amalgam_merge::sparsify::{chunks, Delta, Pruner, CHUNK};
    use half::bf16;
    let (base, model) = (
        flat_cpu(&base.to_kind(Kind::BFloat16)),
        flat_cpu(&model.to_kind(Kind::BFloat16)),
    );
    let delta = Delta {
        model: slice::<bf16>(&model),
        base: slice::<bf16>(&base),
    };
    let mut values = vec![0f32; CHUNK];
    let mut keep = vec![false; CHUNK];
    let n = delta.len();
    let pruner = Pruner::magnitude(&delta, 0.5);
    let rows = [
        (
            "δ chunks only (sub, round)",
            time(|| chunks(n).for_each(|(s, l)| delta.values(s, &mut values[..l]))),
        ),
        (
            "trim threshold (2 radix passes)",
            time(|| drop(Pruner::magnitude(&delta, 0.5))),
        ),
        (
            "δ and trim, chunk by chunk",
            time(|| {
                let mut p = pruner.clone();
                for (s, l) in chunks(n) {
                    delta.values(s, &mut values[..l]);
                    p.prune(&mut values[..l], s, &mut keep);
                }
            }),
        ),
        (
            "DARE keep decisions only",
            time(|| {
                let mut p = Pruner::random(0.5, 7);
                chunks(n).for_each(|(s, l)| p.keep(&values[..l], s, &mut keep));
            }),
        ),
        (
            "DARE δ and drop, chunk by chunk",
            time(|| {
                let mut p = Pruner::random(0.5, 7);
                for (s, l) in chunks(n) {
                    delta.values(s, &mut values[..l]);
                    p.prune(&mut values[..l], s, &mut keep);
                }
            }),
        ),
    ];
    println!();
    println!("| TIES phase (one model, BF16, 16M entries) | ms |");
    println!("|---|---|");
    for (phase, seconds) in rows {
        println!("| {phase} | {:.0} |", seconds * 1e3);
    }
}

fn main() {
    tch::set_num_threads(1);
    tch::manual_seed(0);
    let mut args = std::env::args().skip(1).filter(|a| !a.starts_with('-'));
    let filter = args.next();
    let kinds = match args.next().as_deref() {
        Some("f32") => vec![Kind::Float],
        Some("bf16") => vec![Kind::BFloat16],
        _ => vec![Kind::Float, Kind::BFloat16],
    };
    let base = Tensor::randn([SIDE, SIDE], (Kind::Float, Device::Cpu)) * 0.02;
    let models: Vec<Tensor> = (0..2)
        .map(|_| &base + Tensor::randn([SIDE, SIDE], (Kind::Float, Device::Cpu)) * 0.002)
        .collect();
    println!("| method | dtype | ms / tensor (median of {RUNS}) | M elements / s |");
    println!("|---|---|---|---|");
    for kind in kinds {
        let inputs: Vec<Tensor> = std::iter::once(&base)
            .chain(&models)
            .map(|t| t.to_kind(kind))
            .collect();
        for method in METHODS {
            let spec = method.spec();
            if filter.as_deref().is_some_and(|f| spec.name != f) {
                continue;
            }
            let takes_base = !matches!(spec.base, amalgam_recipe::BasePolicy::Ignored);
            let (inputs, base_index): (Vec<Tensor>, Option<usize>) =
                match (takes_base, spec.max_models) {
                    (true, Some(1)) => (
                        inputs[..2].iter().map(Tensor::shallow_clone).collect(),
                        Some(0),
                    ),
                    (true, _) => (inputs.iter().map(Tensor::shallow_clone).collect(), Some(0)),
                    (false, Some(1)) => (
                        inputs[1..2].iter().map(Tensor::shallow_clone).collect(),
                        None,
                    ),
                    (false, _) => (
                        inputs[1..].iter().map(Tensor::shallow_clone).collect(),
                        None,
                    ),
                };
            let mut shared = BTreeMap::new();
            let mut per_input = vec![BTreeMap::new(); inputs.len()];
            for p in &spec.params {
                let value = match p.name {
                    "density" => Some(Scalar::Number(0.5)),
                    "epsilon" => Some(Scalar::Number(0.1)),
                    "t" => Some(Scalar::Number(0.3)),
                    "weight" => Some(Scalar::Number(0.5)),
                    _ => p.default.clone(),
                }
                .map(|value| Resolved { value, at: None })
                .expect("every parameter has a value");
                match p.scope {
                    ParamScope::Shared => {
                        shared.insert(p.name.to_owned(), value);
                    }
                    scope => {
                        for (i, map) in per_input.iter_mut().enumerate() {
                            if !(scope == ParamScope::PerNonBase && Some(i) == base_index) {
                                map.insert(p.name.to_owned(), value.clone());
                            }
                        }
                    }
                }
            }
            let cx = MergeContext {
                name: "model.layers.0.mlp.up_proj.weight",
                inputs: &inputs,
                base: base_index,
                params: &shared,
                input_params: per_input.iter().collect(),
                input_ids: (0..inputs.len() as u64).collect(),
                seed: 0,
            };
            let median =
                time(|| assert_eq!(method.merge(&cx).expect("merge").size(), [SIDE, SIDE]));
            println!(
                "| {} | {:?} | {:.0} | {:.0} |",
                spec.name,
                kind,
                median * 1e3,
                (SIDE * SIDE) as f64 / median / 1e6
            );
        }
    }
    if filter.as_deref().is_none_or(|f| f == "phases") {
        ties_phases(&base, &models[0]);
    }
}
