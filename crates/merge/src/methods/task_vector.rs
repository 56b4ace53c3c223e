//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA):
//! deltas from the base, optionally sparsified, weighted, optionally combined
//! by sign election, optionally normalised, scaled by λ, added to the base.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{density, flag, number, weight};
use crate::sparsify::{apply_mask, della_mask, magnitude_mask, outlier_mask, random_mask};
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
        let rescale = cx.flag("rescale");
        let kind = base.kind();
        let mut weighted = Vec::with_capacity(others.len());
        let mut weights = Vec::with_capacity(others.len());
        for &i in &others {
            let delta = &cx.inputs[i] - base;
            let delta = self.sparsify(cx, i, delta, rescale)?;
            // Weights are rounded to the math dtype, as the deltas are.
            let w = Tensor::from_slice(&[cx.input_number(i, "weight")])
                .to_kind(kind)
                .to_device(base.device());
            weighted.push(&delta * &w);
            weights.push(w);
        }
        let (mut mixed, divisor) = if self.consensus {
            let sum = weighted
                .iter()
                .skip(1)
                .fold(weighted[0].shallow_clone(), |acc, w| acc + w);
            let majority = sum.ge(0.0);
            let mut mixed = base.zeros_like();
            let mut divisor = base.zeros_like();
            for (w_delta, w) in weighted.iter().zip(&weights) {
                // sign(x) == majority sign; zeros never agree.
                let agrees = w_delta
                    .gt(0.0)
                    .logical_and(&majority)
                    .logical_or(&w_delta.lt(0.0).logical_and(&majority.logical_not()));
                let agrees = agrees.to_kind(kind);
                mixed += w_delta * &agrees;
                divisor += &agrees * w;
            }
            let divisor = divisor.where_self(&divisor.ne(0.0), &divisor.ones_like());
            (mixed, divisor)
        } else {
            let mixed = weighted
                .iter()
                .skip(1)
                .fold(weighted[0].shallow_clone(), |acc, w| acc + w);
            let total = weights
                .iter()
                .skip(1)
                .fold(weights[0].shallow_clone(), |acc, w| acc + w);
            let total = if total.abs().double_value(&[0]) < 1e-8 {
                total.ones_like()
            } else {
                total
            };
            (mixed, total)
        };
        if cx.flag("normalize") {
            mixed /= divisor;
        }
        let lambda = cx.number("lambda");
        if lambda != 1.0 {
            mixed *= lambda;
        }
        Ok((base + mixed).to_kind(kind))
    }
}

impl TaskVectorMethod {
    fn sparsify(
        &self,
        cx: &MergeContext<'_>,
        input: usize,
        delta: Tensor,
        rescale: bool,
    ) -> Result<Tensor> {
        let density = cx.input_number(input, "density");
        if self.sparsifier == Sparsifier::None || density >= 1.0 {
            return Ok(delta);
        }
        let mask = match self.sparsifier {
            Sparsifier::None => unreachable!("returned above"),
            Sparsifier::Magnitude => magnitude_mask(&delta, density),
            Sparsifier::Outliers => outlier_mask(&delta, density, cx.input_number(input, "gamma")),
            Sparsifier::Random => random_mask(&delta, density, cx.stream(input)),
            Sparsifier::Della => {
                let epsilon = cx.input_number(input, "epsilon");
                if density - epsilon <= 0.0 || density + epsilon >= 1.0 {
                    return Err(cx.error(format!(
                        "della needs 0 < density ± epsilon < 1 (density {density}, epsilon {epsilon})"
                    )));
                }
                della_mask(&delta, density, epsilon, cx.stream(input))
            }
        };
        if cx.flag("dare_rescale_reciprocal") {
            // The DARE paper's rescale: every kept entry divided by the keep probability.
            let kind = delta.kind();
            return Ok(delta * mask.to_kind(kind) / density);
        }
        Ok(apply_mask(&delta, &mask, rescale))
    }
}
