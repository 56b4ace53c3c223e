//! `nearswap` — move the base towards the other model only where they are
//! close: λ = clamp(t / max(|base − x|, 1e-6), 0, 1), result λx + (1 − λ)base.

use amalgam_recipe::MethodSpec;
use tch::Tensor;

use super::base_and_one_other_at_t;
use crate::{MergeContext, MergeMethod, Result};

pub struct Nearswap;

impl MergeMethod for Nearswap {
    fn spec(&self) -> MethodSpec {
        base_and_one_other_at_t("nearswap")
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let other = &cx.inputs[cx.others()[0]];
        let distance = (base - other).abs().clamp_min(1e-6);
        let lambda = (distance.reciprocal() * cx.number("t")).clamp(0.0, 1.0);
        Ok(&lambda * other + (lambda.ones_like() - &lambda) * base)
    }
}
