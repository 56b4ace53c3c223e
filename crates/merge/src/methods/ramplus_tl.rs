//! `ramplus_tl` — RAM+ with tensor-local statistics (arXiv 2601.13572): as
//! [`super::ram`], but a model's unique entries are scaled up by
//! λ = 1 + r·clamp(ρ, 0, α), where ρ is the ratio of its shared to its unique
//! contributions in this tensor (a model whose contribution is mostly shared
//! gets its few unique entries emphasised).

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Kind, Tensor};

use super::number;
use super::ram::ram_vectors;
use crate::{MergeContext, MergeMethod, Result};

pub struct RamplusTl;

impl MergeMethod for RamplusTl {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "ramplus_tl",
            base: BasePolicy::Required,
            params: vec![
                number("r", ParamScope::Shared, Some(0.1)),
                number("alpha", ParamScope::Shared, Some(0.2)),
                number("epsilon", ParamScope::Shared, Some(1e-5)),
            ],
            min_models: 0,
            max_models: None,
        }
    }

    fn working_copies(&self, inputs: usize, _numel: u64) -> usize {
        3 * inputs + 2
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let epsilon = cx.number("epsilon");
        let Some(v) = ram_vectors(cx, epsilon) else {
            return Ok(base.shallow_clone());
        };
        // Counts per model, as float32: torch promotes the integer counts
        // clamped by a float ε to its default dtype.
        let per_model = |mask: &Tensor| {
            v.nonzero
                .logical_and(mask)
                .sum_dim_intlist([1i64].as_slice(), false, Kind::Float)
        };
        let rho = per_model(&v.overlap) / per_model(&v.unique).clamp_min(epsilon);
        let lambda = rho.clamp(0.0, cx.number("alpha")) * cx.number("r") + 1.0;
        let merged = (&v.contributed * &v.unique * lambda.unsqueeze(-1)
            + &v.contributed * &v.overlap / v.counts.clamp_min(1))
        .sum_dim_intlist([0i64].as_slice(), true, None::<Kind>);
        Ok(base + merged.reshape_as(base))
    }
}
