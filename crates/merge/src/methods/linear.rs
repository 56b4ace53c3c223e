//! `linear` — a weighted average Σ wᵢxᵢ / Σ wᵢ (`normalize: false` drops the
//! division). The base, if named, is an ordinary input with its own weight.
//! Computed in f32 (f64 for f64 inputs), like mergekit.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{at_least_f32, flag, weight};
use crate::{MergeContext, MergeMethod, Result};

pub struct Linear;

impl MergeMethod for Linear {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "linear",
            base: BasePolicy::Ignored,
            params: vec![weight(ParamScope::PerModel), flag("normalize", true)],
            min_models: 1,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let kind = at_least_f32(cx.inputs[0].kind());
        let mut sum = cx.inputs[0].zeros_like().to_kind(kind);
        let mut total = 0f32;
        for (i, x) in cx.inputs.iter().enumerate() {
            let w = cx.input_number(i, "weight") as f32;
            sum += x.to_kind(kind) * f64::from(w);
            total += w;
        }
        if cx.flag("normalize") {
            sum /= f64::from(total);
        }
        Ok(sum.to_kind(cx.inputs[0].kind()))
    }
}
