//! `ram` — Reinforced Agent Merging (arXiv 2601.13572): each entry of the
//! task vectors counts as contributed by a model when |δ| > ε; an entry only
//! one model contributes is kept whole, one several contribute is averaged
//! over them (not over every model, as plain averaging would dilute it).
//! [`ram_vectors`] is shared with `ramplus_tl`.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Kind, Tensor};

use super::number;
use crate::{MergeContext, MergeMethod, Result};

pub struct Ram;

impl MergeMethod for Ram {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "ram",
            base: BasePolicy::Required,
            params: vec![number("epsilon", ParamScope::Shared, Some(1e-5))],
            min_models: 0,
            max_models: None,
        }
    }

    fn working_copies(&self, inputs: usize, _numel: u64) -> usize {
        3 * inputs + 2
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let Some(v) = ram_vectors(cx, cx.number("epsilon")) else {
            return Ok(base.shallow_clone());
        };
        let merged = (&v.contributed * &v.unique
            + &v.contributed * &v.overlap / v.counts.clamp_min(1))
        .sum_dim_intlist([0i64].as_slice(), true, None::<Kind>);
        Ok(base + merged.reshape_as(base))
    }
}

/// The task vectors of the models other than the base, `[models, entries]`,
/// with which entries each model contributes (|δ| > ε) and how many do.
pub(crate) struct RamVectors {
    /// The task vectors, zero where a model does not contribute.
    pub contributed: Tensor,
    /// |δ| > ε, per model and entry.
    pub nonzero: Tensor,
    /// How many models contribute to each entry, `[1, entries]`.
    pub counts: Tensor,
    /// Entries more than one model contributes to.
    pub overlap: Tensor,
    /// Entries exactly one model contributes to.
    pub unique: Tensor,
}

/// `None` without models besides the base (the merge is then the base).
pub(crate) fn ram_vectors(cx: &MergeContext<'_>, epsilon: f64) -> Option<RamVectors> {
    let others = cx.others();
    if others.is_empty() {
        return None;
    }
    let base = cx.base_tensor();
    let deltas: Vec<Tensor> = others.iter().map(|&i| &cx.inputs[i] - base).collect();
    let task_vectors = Tensor::stack(&deltas, 0).view([others.len() as i64, -1]);
    let nonzero = task_vectors.abs().gt(epsilon);
    let counts = nonzero.sum_dim_intlist([0i64].as_slice(), true, None::<Kind>);
    Some(RamVectors {
        contributed: task_vectors * &nonzero,
        overlap: counts.gt(1),
        unique: counts.eq(1),
        nonzero,
        counts,
    })
}
