//! `sce` (FuseChat 2.0) — Select the task-vector entries that vary most across
//! models, Calculate per-model weights from mean squared deltas, Erase entries
//! that disagree with the majority sign; user weights are not used.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Kind, Tensor};

use super::{flag, number};
use crate::{MergeContext, MergeMethod, Result};

pub struct Sce;

impl MergeMethod for Sce {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "sce",
            base: BasePolicy::Required,
            params: vec![
                number("select_topk", ParamScope::Shared, Some(1.0)),
                flag("int8_mask", false),
            ],
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
        let deltas: Vec<Tensor> = others.iter().map(|&i| &cx.inputs[i] - base).collect();
        let mut stacked = Tensor::stack(&deltas, 0);
        let topk = cx.number("select_topk");
        if topk < 1.0 {
            let variance = stacked.var_dim([0i64].as_slice(), false, false);
            let nonzero = variance.count_nonzero(None::<i64>).int64_value(&[]);
            // mergekit multiplies in f32.
            let k = if topk <= 0.0 {
                0
            } else {
                (nonzero as f32 * topk as f32) as i64
            };
            let mask = if k == 0 {
                variance.zeros_like()
            } else {
                let flat = variance.abs().reshape([-1]);
                let (_, idx) = flat.topk(k, 0, true, false);
                flat.zeros_like()
                    .index_fill(0, &idx, 1.0)
                    .reshape(variance.size())
            };
            stacked *= mask.unsqueeze(0);
        }
        let majority = stacked
            .sum_dim_intlist([0i64].as_slice(), false, kind)
            .ge(0.0)
            .unsqueeze(0);
        let agrees = stacked
            .gt(0.0)
            .logical_and(&majority)
            .logical_or(&stacked.lt(0.0).logical_and(&majority.logical_not()));
        let n = others.len() as i64;
        let mut omega = stacked
            .square()
            .reshape([n, -1])
            .mean_dim([1i64].as_slice(), false, kind);
        let total = omega.sum(Kind::Double).double_value(&[]);
        omega = if total.abs() < 1e-6 {
            omega.ones_like() / n as f64
        } else {
            omega / total
        };
        let mut weights_shape = vec![n];
        weights_shape.extend(std::iter::repeat_n(1, base.dim()));
        let erased = agrees.to_kind(kind) * omega.reshape(weights_shape.as_slice());
        let numerator = (&stacked * &erased).sum_dim_intlist([0i64].as_slice(), false, kind);
        let denominator = erased
            .sum_dim_intlist([0i64].as_slice(), false, kind)
            .clamp_min(1e-6);
        Ok(base + numerator / denominator)
    }
}
