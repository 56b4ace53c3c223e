//! `multislerp` — one step of a weighted spherical mean of several models (or
//! of their task vectors, with a base), rescaled by the weighted mean norm.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Kind, Tensor};

use super::{flag, number, weight};
use crate::{MergeContext, MergeMethod, Result};

pub struct Multislerp;

impl MergeMethod for Multislerp {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "multislerp",
            base: BasePolicy::Optional,
            params: vec![
                weight(ParamScope::PerNonBase),
                flag("normalize_weights", true),
                number("eps", ParamScope::Shared, Some(1e-8)),
            ],
            min_models: 1,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let others = cx.others();
        if others.len() == 1 {
            return Ok(cx.inputs[others[0]].shallow_clone());
        }
        let kind = cx.inputs[0].kind();
        let eps = cx.number("eps");
        let rows: Vec<Tensor> = others
            .iter()
            .map(|&i| match cx.base {
                Some(_) => (&cx.inputs[i] - cx.base_tensor()).reshape([-1]),
                None => cx.inputs[i].reshape([-1]),
            })
            .collect();
        let x = Tensor::stack(&rows, 0);
        let w: Vec<f64> = others
            .iter()
            .map(|&i| cx.input_number(i, "weight"))
            .collect();
        let mut w = Tensor::from_slice(&w).to_kind(kind).to_device(x.device());
        if cx.flag("normalize_weights") {
            w = &w / w.sum(kind);
        }
        let w_col = w.unsqueeze(1);
        let norms = x.norm_scalaropt_dim(2, [1], true);
        let units = &x / (&norms + eps);
        let mean = (&units * &w_col).sum_dim_intlist([0i64].as_slice(), false, kind);
        let mean_norm = mean.norm().double_value(&[]);
        let merged = if mean_norm < eps {
            if others.len() != 2 {
                return Err(
                    cx.error("multislerp: the weighted mean direction vanishes (opposite inputs)")
                );
            }
            (&x * &w_col).sum_dim_intlist([0i64].as_slice(), false, kind)
        } else {
            let m = &mean / mean_norm;
            let along = units.matmul(&m.unsqueeze(1));
            let tangent = ((&units - along * m.unsqueeze(0)) * &w_col).sum_dim_intlist(
                [0i64].as_slice(),
                false,
                kind,
            );
            let tau = tangent.norm().double_value(&[]) + eps;
            let direction = &m * tau.cos() + tangent * (tau.sin() / tau);
            direction
                * (norms.squeeze_dim(1) * &w)
                    .sum(Kind::Double)
                    .double_value(&[])
        };
        let merged = merged.reshape(cx.inputs[0].size());
        Ok(match cx.base {
            Some(_) => cx.base_tensor() + merged,
            None => merged,
        })
    }
}
