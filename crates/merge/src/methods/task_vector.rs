//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA):
//! deltas from the base, optionally sparsified, weighted, optionally combined
//! by sign election, optionally normalised, scaled by λ, added to the base.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Kind, Tensor};

use super::{density, flag, number, weight};
use crate::sparsify::{chunks, della_mask, outlier_mask, Delta, Pruner};
use crate::{MergeContext, MergeMethod, Result};

/// How a member of the family prunes each delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsifier {
    None,
    /// TIES: the largest magnitudes over the whole tensor.
    Magnitude,
    /// DARE: a Bernoulli(density) mask.
    Random,
    /// Breadcrumbs: drop the largest `gamma` fraction and the smallest.
    Outliers,
    /// DELLA: Bernoulli with keep probability rising with the magnitude rank.
    Della,
}

/// A member of the family, fully described by these switches.
#[derive(Debug, Clone, Copy)]
pub struct TaskVectorMethod {
    pub name: &'static str,
    pub sparsifier: Sparsifier,
    /// Sign election: keep only entries agreeing with the weighted majority
    /// sign, and normalise by the weights of the agreeing models per entry.
    pub consensus: bool,
    /// Default of `normalize`.
    pub normalize: bool,
    /// Default of `rescale`: the L1-norm rescale of sparsified deltas
    /// (mergekit's rule). `dare_rescale_reciprocal: true` instead divides kept
    /// entries by the density, as the DARE paper does.
    pub rescale: bool,
}

impl MergeMethod for TaskVectorMethod {
    /// Chunked: only the output is allocated at full size.
    fn working_copies(&self, _inputs: usize) -> usize {
        1
    }

    fn spec(&self) -> MethodSpec {
        let mut params = vec![
            weight(ParamScope::PerNonBase),
            density(),
            flag("normalize", self.normalize),
            flag("rescale", self.rescale),
            flag("int8_mask", false),
            number("lambda", ParamScope::Shared, Some(1.0)),
            flag("dare_rescale_reciprocal", false),
        ];
        match self.sparsifier {
            Sparsifier::Outliers => {
                params.push(number("gamma", ParamScope::PerNonBase, Some(0.01)))
            }
            Sparsifier::Della => params.push(number("epsilon", ParamScope::PerNonBase, Some(0.15))),
            _ => {}
        }
        MethodSpec {
            name: self.name,
            base: BasePolicy::Required,
            params,
            min_models: 1,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let others = cx.others();
        if others.is_empty() {
            return Ok(base.shallow_clone());
        }
        let kind = base.kind();
        let flat_base = base.reshape([-1]);
        let flat: Vec<Tensor> = others.iter().map(|&i| cx.inputs[i].reshape([-1])).collect();
        let deltas: Vec<Delta<'_>> = flat
            .iter()
            .map(|model| Delta {
                model,
                base: &flat_base,
            })
            .collect();
        let mut pruners = Vec::with_capacity(others.len());
        let mut scales = Vec::with_capacity(others.len());
        for (delta, &input) in deltas.iter().zip(&others) {
            let (pruner, scale) = self.pruner(cx, input, delta)?;
            pruners.push(pruner);
            scales.push(scale);
        }
        // Weights are rounded to the math dtype, as the deltas are.
        let weights: Vec<Tensor> = others
            .iter()
            .map(|&i| {
                Tensor::from_slice(&[cx.input_number(i, "weight")])
                    .to_kind(kind)
                    .to_device(base.device())
            })
            .collect();
        let out = flat_base.empty_like();
        // Chunk by chunk, so every temporary stays in cache.
        for (start, len) in chunks(flat_base.numel() as i64) {
            let weighted: Vec<Tensor> = deltas
                .iter()
                .zip(pruners.iter_mut())
                .zip(&scales)
                .zip(&weights)
                .map(|(((delta, pruner), scale), w)| {
                    let d = delta.chunk(start, len);
                    let d = match pruner.mask(&d, start) {
                        Some(mask) => d * mask.to_kind(kind),
                        None => d,
                    };
                    let d = match scale {
                        Some(scale) => d * *scale,
                        None => d,
                    };
                    d * w
                })
                .collect();
            let merged = self.combine(cx, &flat_base.narrow(0, start, len), &weighted, &weights);
            out.narrow(0, start, len).copy_(&merged);
        }
        Ok(out.reshape(base.size()))
    }
}

/// Σ of tensors as torch's `stack(…).sum(0)` computes it: accumulated in f32
/// for 16-bit floats, rounded once.
fn sum(tensors: &[Tensor], kind: Kind) -> Tensor {
    let wide = if matches!(kind, Kind::BFloat16 | Kind::Half) {
        Kind::Float
    } else {
        kind
    };
    let total = tensors
        .iter()
        .skip(1)
        .fold(tensors[0].to_kind(wide), |acc, t| acc + t.to_kind(wide));
    total.to_kind(kind)
}

impl TaskVectorMethod {
    /// Sign election (optional), normalisation, λ, and the base, for one chunk
    /// of weighted task vectors.
    fn combine(
        &self,
        cx: &MergeContext<'_>,
        base: &Tensor,
        weighted: &[Tensor],
        weights: &[Tensor],
    ) -> Tensor {
        let kind = base.kind();
        let (mut mixed, divisor) = if self.consensus {
            // The weighted majority sign; an exact tie counts as positive, and
            // zero entries never agree.
            let majority = sum(weighted, kind).ge(0.0).to_kind(kind) * 2.0 - 1.0;
            let agree: Vec<Tensor> = weighted
                .iter()
                .map(|w| w.sign().eq_tensor(&majority).to_kind(kind))
                .collect();
            let kept: Vec<Tensor> = weighted.iter().zip(&agree).map(|(w, a)| w * a).collect();
            let shares: Vec<Tensor> = agree.iter().zip(weights).map(|(a, w)| a * w).collect();
            let divisor = sum(&shares, kind);
            let divisor = divisor.where_self(&divisor.ne(0.0), &divisor.ones_like());
            (sum(&kept, kind), divisor)
        } else {
            let total = sum(weights, kind);
            let total = if total.abs().double_value(&[0]) < 1e-8 {
                total.ones_like()
            } else {
                total
            };
            (sum(weighted, kind), total)
        };
        if cx.flag("normalize") {
            mixed /= divisor;
        }
        let lambda = cx.number("lambda");
        if lambda != 1.0 {
            mixed *= lambda;
        }
        (base + mixed).to_kind(kind)
    }

    /// How `input`'s task vector is pruned, and the factor its kept part is
    /// scaled by (L1-norm rescale, or the DARE paper's 1/density).
    fn pruner(
        &self,
        cx: &MergeContext<'_>,
        input: usize,
        delta: &Delta<'_>,
    ) -> Result<(Pruner, Option<f64>)> {
        let density = cx.input_number(input, "density");
        if self.sparsifier == Sparsifier::None || density >= 1.0 {
            return Ok((Pruner::KeepAll, None));
        }
        let whole = || delta.chunk(0, delta.numel());
        let pruner = match self.sparsifier {
            Sparsifier::None => unreachable!("returned above"),
            Sparsifier::Magnitude => Pruner::magnitude(delta, density),
            Sparsifier::Random => Pruner::random(density, cx.stream(input)),
            Sparsifier::Outliers => Pruner::Precomputed(outlier_mask(
                &whole(),
                density,
                cx.input_number(input, "gamma"),
            )),
            Sparsifier::Della => {
                let epsilon = cx.input_number(input, "epsilon");
                if density - epsilon <= 0.0 || density + epsilon >= 1.0 {
                    return Err(cx.error(format!("della needs 0 < density ± epsilon < 1 (density {density}, epsilon {epsilon})")));
                }
                let rows = cx.base_tensor().size();
                let shaped = whole().reshape(rows.as_slice());
                Pruner::Precomputed(
                    della_mask(&shaped, density, epsilon, cx.stream(input)).reshape([-1]),
                )
            }
        };
        if cx.flag("dare_rescale_reciprocal") {
            return Ok((pruner, Some(1.0 / density)));
        }
        if !cx.flag("rescale") {
            return Ok((pruner, None));
        }
        // L1 rescale: one pass with a replay of the mask to measure what it keeps.
        let mut replay = pruner.replay();
        let (mut before, mut after) = (0.0, 0.0);
        for (start, len) in chunks(delta.numel()) {
            let d = delta.chunk(start, len);
            before += d.abs().sum(Kind::Double).double_value(&[]);
            after += match replay.mask(&d, start) {
                Some(mask) => (&d * mask.to_kind(d.kind()))
                    .abs()
                    .sum(Kind::Double)
                    .double_value(&[]),
                None => d.abs().sum(Kind::Double).double_value(&[]),
            };
        }
        let scale = (before >= RESCALE_EPS && after >= RESCALE_EPS).then(|| before / after);
        Ok((pruner, scale))
    }
}

/// Below this L1 norm a task vector (or its kept part) is not rescaled.
const RESCALE_EPS: f64 = 1e-7;
