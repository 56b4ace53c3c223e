//! `model_stock` (Jang et al. 2024) — interpolate between the base and the
//! average of the fine-tunes by t = N·c / (1 + (N − 1)·c), where c is the mean
//! pairwise cosine of their task vectors (per tensor, or per row with
//! `filter_wise`).

use amalgam_recipe::{BasePolicy, MethodSpec};
use tch::Tensor;

use super::flag;
use crate::{MergeContext, MergeMethod, Result};

pub struct ModelStock;

impl MergeMethod for ModelStock {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "model_stock",
            base: BasePolicy::Required,
            params: vec![flag("filter_wise", false)],
            min_models: 2,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let others = cx.others();
        let shape = base.size();
        let rows = |t: &Tensor| {
            if cx.flag("filter_wise") && shape.len() > 1 {
                t.reshape([-1, *shape.last().unwrap()])
            } else {
                t.reshape([1, -1])
            }
        };
        let offsets: Vec<Tensor> = others
            .iter()
            .map(|&i| rows(&(&cx.inputs[i] - base)))
            .collect();
        let kind = base.kind();
        let n = others.len();
        let mut cos_sum = Tensor::zeros([offsets[0].size()[0], 1], (kind, base.device()));
        let mut pairs = 0.0;
        for i in 0..n {
            for j in i + 1..n {
                let dot =
                    (&offsets[i] * &offsets[j]).sum_dim_intlist([-1i64].as_slice(), true, kind);
                let norms = offsets[i].norm_scalaropt_dim(2, [-1], true)
                    * offsets[j].norm_scalaropt_dim(2, [-1], true);
                cos_sum += (dot / norms.clamp_min(1e-6)).clamp(-1.0, 1.0);
                pairs += 1.0;
            }
        }
        let c = cos_sum / pairs;
        let denominator = (&c * (n as f64 - 1.0)) + 1.0;
        let t = (&c * n as f64) / &denominator;
        let t = t.where_self(&denominator.abs().ge(1e-6), &t.zeros_like());
        let mean = others
            .iter()
            .fold(base.zeros_like(), |acc, &i| acc + &cx.inputs[i])
            / n as f64;
        let merged = rows(&mean) * &t + rows(base) * (t.ones_like() - &t);
        Ok(merged.reshape(shape))
    }
}
