//! `nuslerp` — slerp between two models at t = w₂/(w₁ + w₂), over the whole
//! tensor (default), each row, or each column (`nuslerp_row_wise`); with a
//! base, it interpolates the two task vectors and adds them to the base.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{flag, weight};
use crate::{MergeContext, MergeMethod, Result};

pub struct Nuslerp;

impl MergeMethod for Nuslerp {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "nuslerp",
            base: BasePolicy::Optional,
            params: vec![
                weight(ParamScope::PerNonBase),
                flag("nuslerp_flatten", true),
                flag("nuslerp_row_wise", false),
            ],
            min_models: 2,
            max_models: Some(2),
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let others = cx.others();
        let (w1, w2) = (
            cx.input_number(others[0], "weight"),
            cx.input_number(others[1], "weight"),
        );
        let t = if (w1 + w2).abs() < 1e-6 {
            0.5
        } else {
            w2 / (w1 + w2)
        };
        // New tensors: the inputs are shared and must not be changed in place.
        let (v0, v1) = match cx.base {
            Some(_) => (
                &cx.inputs[others[0]] - cx.base_tensor(),
                &cx.inputs[others[1]] - cx.base_tensor(),
            ),
            None => (
                cx.inputs[others[0]].shallow_clone(),
                cx.inputs[others[1]].shallow_clone(),
            ),
        };
        let shape = v0.size();
        let transpose =
            !cx.flag("nuslerp_flatten") && cx.flag("nuslerp_row_wise") && shape.len() > 1;
        let as_vectors = |v: &Tensor| -> Tensor {
            if cx.flag("nuslerp_flatten") || shape.len() == 1 {
                v.reshape([1, -1])
            } else if transpose {
                let v = v.transpose(0, -1);
                let last = *v.size().last().unwrap();
                v.reshape([-1, last])
            } else {
                v.reshape([-1, *shape.last().unwrap()])
            }
        };
        let merged = slerp_rows(t, &as_vectors(&v0), &as_vectors(&v1));
        let merged = if transpose {
            let mut t_shape = shape.clone();
            let last = t_shape.len() - 1;
            t_shape.swap(0, last);
            merged.reshape(t_shape).transpose(0, -1)
        } else {
            merged.reshape(shape)
        };
        Ok(match cx.base {
            Some(_) => cx.base_tensor() + merged,
            None => merged,
        })
    }
}

/// Row-by-row slerp of `[rows, n]` tensors, linear where rows are colinear.
fn slerp_rows(t: f64, v0: &Tensor, v1: &Tensor) -> Tensor {
    let unit = |v: &Tensor| v / v.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-7);
    let cos = (unit(v0) * unit(v1))
        .sum_dim_intlist([-1i64].as_slice(), true, v0.kind())
        .clamp(-1.0, 1.0);
    let colinear = (cos.square().neg() + 1.0).le(1e-16);
    let theta = cos
        .where_self(&colinear.logical_not(), &cos.zeros_like())
        .acos();
    let spherical = ((&theta * (1.0 - t)).sin() * v0 + (&theta * t).sin() * v1) / theta.sin();
    let linear = v0 * (1.0 - t) + v1 * t;
    linear.where_self(&colinear, &spherical)
}
