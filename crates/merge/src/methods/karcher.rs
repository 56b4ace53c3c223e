//! `karcher` — the Karcher (Riemannian) mean of all inputs' directions on the
//! unit sphere, iterated to `tol`, scaled by the mean norm. Unweighted; a
//! named base is an ordinary input.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{at_least_f32, number};
use crate::{MergeContext, MergeMethod, Result};

pub struct Karcher;

impl MergeMethod for Karcher {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "karcher",
            base: BasePolicy::Ignored,
            params: vec![
                number("max_iter", ParamScope::Shared, Some(10.0)),
                number("tol", ParamScope::Shared, Some(1e-5)),
            ],
            min_models: 1,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let n = cx.inputs.len();
        if n == 1 {
            return Ok(cx.inputs[0].shallow_clone());
        }
        let kind = at_least_f32(cx.inputs[0].kind());
        let tol = cx.number("tol");
        let alpha = 1.0 / n as f64;
        let xs: Vec<Tensor> = cx
            .inputs
            .iter()
            .map(|x| x.to_kind(kind).reshape([-1]))
            .collect();
        let norms: Vec<f64> = xs.iter().map(|x| x.norm().double_value(&[])).collect();
        let units: Vec<Tensor> = xs
            .iter()
            .zip(&norms)
            .map(|(x, &n)| if n == 0.0 { x.zeros_like() } else { x / n })
            .collect();
        let valid: Vec<usize> = (0..n).filter(|&i| norms[i] > tol).collect();
        let scale = alpha * norms.iter().sum::<f64>();
        if valid.is_empty() {
            return Ok(cx.inputs[0].zeros_like());
        }
        let weight = 1.0 / valid.len() as f64;
        let mut m = valid
            .iter()
            .fold(units[0].zeros_like(), |acc, &i| acc + &units[i] * weight);
        let m_norm = m.norm().double_value(&[]);
        m = if m_norm < tol {
            units[valid[0]].shallow_clone()
        } else {
            m / m_norm
        };
        for _ in 0..cx.number("max_iter") as usize {
            let mut gradient = m.zeros_like();
            for &i in &valid {
                let cos = (&m * &units[i])
                    .sum(kind)
                    .double_value(&[])
                    .clamp(-1.0, 1.0);
                let theta = cos.acos();
                if theta < tol {
                    continue;
                }
                gradient += (&units[i] - &m * cos) * (weight * theta / theta.sin());
            }
            let g = gradient.norm().double_value(&[]);
            if g < tol {
                break;
            }
            m = &m * g.cos() + gradient * (g.sin() / g);
            let m_norm = m.norm().double_value(&[]);
            if m_norm > tol {
                m /= m_norm;
            }
        }
        Ok((m * scale)
            .reshape(cx.inputs[0].size())
            .to_kind(cx.inputs[0].kind()))
    }
}
