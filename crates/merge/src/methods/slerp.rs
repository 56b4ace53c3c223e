//! `slerp` — spherical interpolation from the base (t = 0) to the other model
//! (t = 1), treating each tensor as one vector; linear interpolation when the
//! two are nearly parallel (|cos| > 0.9995). Computed in f32.

use amalgam_recipe::MethodSpec;
use tch::{Kind, Tensor};

use super::{at_least_f32, base_and_one_other_at_t};
use crate::{MergeContext, MergeMethod, Result};

pub struct Slerp;

const PARALLEL: f64 = 0.9995;

impl MergeMethod for Slerp {
    fn spec(&self) -> MethodSpec {
        let mut spec = base_and_one_other_at_t("slerp");
        spec.params[0].warn = Some(|t| match t.as_f64() {
            Some(t) if (0.0..=1.0).contains(&t) => Ok(()),
            _ => Err(format!(
                "t = {t} is outside [0, 1]: slerp then extrapolates beyond the two models"
            )),
        });
        spec
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let other = &cx.inputs[cx.others()[0]];
        let kind = at_least_f32(base.kind());
        let (v0, v1) = (base.to_kind(kind), other.to_kind(kind));
        let (ca, cb) = slerp_coefficients(&v0, &v1, cx.number("t"), kind);
        Ok((v0 * ca + v1 * cb).to_kind(base.kind()))
    }
}

/// The weights of v0 and v1, with t rounded to the compute kind as mergekit does.
fn slerp_coefficients(v0: &Tensor, v1: &Tensor, t: f64, kind: Kind) -> (f64, f64) {
    let t = if kind == Kind::Float {
        t as f32 as f64
    } else {
        t
    };
    let unit = |v: &Tensor| {
        let n = v.norm().double_value(&[]);
        v / if n <= 1e-8 { 1.0 } else { n }
    };
    let dot = (unit(v0) * unit(v1))
        .sum(kind)
        .double_value(&[])
        .clamp(-1.0, 1.0);
    if dot.abs() > PARALLEL {
        return (1.0 - t, t);
    }
    let theta = dot.acos();
    let sin_theta = theta.sin();
    (
        ((1.0 - t) * theta).sin() / sin_theta,
        (t * theta).sin() / sin_theta,
    )
}
