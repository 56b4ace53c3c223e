//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA):
//! deltas from the base, optionally sparsified, weighted, optionally combined
//! by sign election, optionally normalised, scaled by λ, added to the base.

use std::sync::Arc;

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{density, flag, number, weight};
use crate::elementwise::{flat_cpu, slice, slice_mut, with_element, Element, Real};
use crate::sparsify::{chunks, della_mask, outlier_mask, Delta, KeepMask, Pruner, CHUNK};
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
        if cx.others().is_empty() {
            return Ok(base.shallow_clone());
        }
        let flat_base = flat_cpu(base);
        let mut out = flat_base.empty_like();
        with_element!(base.kind(), T => self.merge_flat::<T>(cx, &flat_base, &mut out))?;
        Ok(out.reshape(base.size()).to_device(base.device()))
    }
}

/// How one chunk of weighted task vectors becomes the mixed delta, in the
/// math type `M`.
struct Combine<M> {
    consensus: bool,
    /// Divide by the total weight (of the agreeing models, with consensus).
    normalize: bool,
    /// Each model's weight, rounded to the math dtype.
    weights: Vec<M>,
    /// Σ weights, the divisor without consensus (1 when it is ~0).
    total: M,
    lambda: Option<M>,
}

impl TaskVectorMethod {
    /// The whole merge over flat CPU data, chunk by chunk: each model's δ is
    /// computed, pruned, rescaled and weighted into a buffer, the buffers are
    /// combined into the mixed delta, and the base is added — every step a
    /// plain loop over cache-resident buffers.
    fn merge_flat<T: Element>(
        &self,
        cx: &MergeContext<'_>,
        flat_base: &Tensor,
        out: &mut Tensor,
    ) -> Result<()> {
        let others = cx.others();
        let flat: Vec<Tensor> = others.iter().map(|&i| flat_cpu(&cx.inputs[i])).collect();
        let base = slice::<T>(flat_base);
        let deltas: Vec<Delta<'_, T>> = flat
            .iter()
            .map(|model| Delta {
                model: slice::<T>(model),
                base,
            })
            .collect();
        let mut pruners = Vec::with_capacity(others.len());
        let mut scales = Vec::with_capacity(others.len());
        for (delta, &input) in deltas.iter().zip(&others) {
            let (pruner, scale) = self.pruner(cx, input, delta)?;
            pruners.push(pruner);
            scales.push(scale.map(T::Math::from_f64));
        }
        // Weights are rounded to the math dtype, as the deltas are.
        let weights: Vec<T::Math> = others
            .iter()
            .map(|&i| T::round(T::Math::from_f64(cx.input_number(i, "weight"))))
            .collect();
        let total = T::round(weights[1..].iter().fold(weights[0], |acc, &w| acc + w));
        let lambda = cx.number("lambda");
        let combine = Combine {
            consensus: self.consensus,
            normalize: cx.flag("normalize"),
            total: if total.abs().to_f64() < 1e-8 {
                T::Math::ONE
            } else {
                total
            },
            weights,
            lambda: (lambda != 1.0).then(|| T::Math::from_f64(lambda)),
        };
        let out = slice_mut::<T>(out);
        let mut weighted = vec![vec![T::Math::ZERO; CHUNK]; deltas.len()];
        let mut mixed = [T::Math::ZERO; CHUNK];
        let mut divisors = [T::Math::ZERO; CHUNK];
        let mut keep = vec![false; CHUNK];
        for (start, len) in chunks(base.len()) {
            for (((values, delta), pruner), (scale, &weight)) in weighted
                .iter_mut()
                .zip(&deltas)
                .zip(&mut pruners)
                .zip(scales.iter().zip(&combine.weights))
            {
                let values = &mut values[..len];
                delta.values(start, values);
                pruner.prune(values, start, &mut keep);
                if let Some(scale) = *scale {
                    values.iter_mut().for_each(|v| *v = T::round(*v * scale));
                }
                values.iter_mut().for_each(|v| *v = T::round(*v * weight));
            }
            let columns: Vec<&[T::Math]> = weighted.iter().map(|w| &w[..len]).collect();
            let mixed = &mut mixed[..len];
            combine.chunk::<T>(&columns, mixed, &mut divisors[..len], &mut keep[..len]);
            for ((y, &b), &m) in out[start..start + len]
                .iter_mut()
                .zip(&base[start..start + len])
                .zip(mixed.iter())
            {
                *y = T::narrow(b.widen() + m);
            }
        }
        Ok(())
    }
}

impl<M: Real> Combine<M> {
    /// Sign election (optional), normalisation and λ over one chunk of
    /// weighted task vectors (one column per model) into `mixed`, rounded to
    /// `T` after each step; `divisors` and `positive` are scratch space.
    /// Sums run in column order from the first term, as torch's
    /// `stack(…).sum(0)` accumulates (in f32 for 16-bit floats).
    fn chunk<T: Element<Math = M>>(
        &self,
        columns: &[&[M]],
        mixed: &mut [M],
        divisors: &mut [M],
        positive: &mut [bool],
    ) {
        let (first, rest) = columns.split_first().expect("at least one model");
        mixed.copy_from_slice(first);
        for column in rest {
            mixed
                .iter_mut()
                .zip(*column)
                .for_each(|(m, &w)| *m = *m + w);
        }
        if self.consensus {
            // The weighted majority sign; an exact tie counts as positive, and
            // zero entries never agree. Disagreeing entries and their weights
            // count as zeros (a mask product), keeping signed-zero results.
            for (p, &sum) in positive.iter_mut().zip(mixed.iter()) {
                *p = T::round(sum) >= M::ZERO;
            }
            let term = |w: M, positive: bool, weight: M| {
                let agrees = (positive && w > M::ZERO) | (!positive && w < M::ZERO);
                let mask = M::indicator(agrees);
                (w * mask, weight * mask)
            };
            for (j, (column, &weight)) in columns.iter().zip(&self.weights).enumerate() {
                for (((m, d), &w), &p) in mixed
                    .iter_mut()
                    .zip(divisors.iter_mut())
                    .zip(*column)
                    .zip(positive.iter())
                {
                    let (kept, share) = term(w, p, weight);
                    (*m, *d) = if j == 0 {
                        (kept, share)
                    } else {
                        (*m + kept, *d + share)
                    };
                }
            }
            for (m, d) in mixed.iter_mut().zip(divisors.iter_mut()) {
                *m = T::round(*m);
                let divisor = T::round(*d);
                *d = if divisor == M::ZERO { M::ONE } else { divisor };
            }
            if self.normalize {
                for (m, &d) in mixed.iter_mut().zip(divisors.iter()) {
                    *m = T::round(*m / d);
                }
            }
        } else {
            for m in mixed.iter_mut() {
                *m = T::round(*m);
                if self.normalize {
                    *m = T::round(*m / self.total);
                }
            }
        }
        if let Some(lambda) = self.lambda {
            mixed.iter_mut().for_each(|m| *m = T::round(*m * lambda));
        }
    }
}

impl TaskVectorMethod {
    /// How `input`'s task vector is pruned, and the factor its kept part is
    /// scaled by (L1-norm rescale, or the DARE paper's 1/density).
    fn pruner<T: Element>(
        &self,
        cx: &MergeContext<'_>,
        input: usize,
        delta: &Delta<'_, T>,
    ) -> Result<(Pruner, Option<f64>)> {
        let density = cx.input_number(input, "density");
        if self.sparsifier == Sparsifier::None || density >= 1.0 {
            return Ok((Pruner::KeepAll, None));
        }
        // Rank-based masks over the whole delta, in libtorch on the tensors' device.
        let whole = || &cx.inputs[input] - cx.base_tensor();
        let pruner = match self.sparsifier {
            Sparsifier::None => unreachable!("returned above"),
            Sparsifier::Magnitude => Pruner::magnitude(delta, density),
            Sparsifier::Random => Pruner::random(density, cx.stream(input)),
            Sparsifier::Outliers => Pruner::precomputed(&outlier_mask(
                &whole(),
                density,
                cx.input_number(input, "gamma"),
            )),
            Sparsifier::Della => {
                let epsilon = cx.input_number(input, "epsilon");
                if density - epsilon <= 0.0 || density + epsilon >= 1.0 {
                    return Err(cx.error(format!("della needs 0 < density ± epsilon < 1 (density {density}, epsilon {epsilon})")));
                }
                Pruner::precomputed(&della_mask(&whole(), density, epsilon, cx.stream(input)))
            }
        };
        if cx.flag("dare_rescale_reciprocal") {
            return Ok((pruner, Some(1.0 / density)));
        }
        if !cx.flag("rescale") {
            return Ok((pruner, None));
        }
        // L1 rescale: one pass to measure what the mask keeps, recording the
        // mask so the merge pass reads it instead of deciding again.
        let mut pruner = pruner;
        let mut record = KeepMask::new(delta.len());
        let (mut before, mut after) = (0.0, 0.0);
        let mut values = [T::Math::ZERO; CHUNK];
        let mut keep = vec![false; CHUNK];
        for (start, len) in chunks(delta.len()) {
            let values = &mut values[..len];
            delta.values(start, values);
            pruner.keep(values, start, &mut keep);
            record.record(start, &keep[..len]);
            let (all, kept) = l1_norms(values, &keep[..len]);
            before += all;
            after += kept;
        }
        let scale = (before >= RESCALE_EPS && after >= RESCALE_EPS).then(|| before / after);
        Ok((Pruner::Precomputed(Arc::new(record)), scale))
    }
}

/// Σ|v| and Σ|v| over the kept entries, in f64 with four accumulators (a
/// fixed order, so the result is deterministic; one chain would be latency-bound).
fn l1_norms<M: Real>(values: &[M], keep: &[bool]) -> (f64, f64) {
    let (mut all, mut kept) = ([0.0f64; 4], [0.0f64; 4]);
    let lanes = values.chunks(4).zip(keep.chunks(4));
    for (v, k) in lanes {
        for lane in 0..v.len() {
            let magnitude = v[lane].abs().to_f64();
            all[lane] += magnitude;
            kept[lane] += magnitude * f64::indicator(k[lane]);
        }
    }
    (all.iter().sum(), kept.iter().sum())
}

/// Below this L1 norm a task vector (or its kept part) is not rescaled.
const RESCALE_EPS: f64 = 1e-7;
