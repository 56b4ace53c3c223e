//! `linear` — a weighted average Σ wᵢxᵢ / Σ wᵢ (`normalize: false` drops the
//! division). The base, if named, is an ordinary input with its own weight.
//! Computed in f32 (f64 for f64 inputs), like mergekit.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Device, Tensor};

use super::{flag, weight};
use crate::elementwise::{flat_cpu, slice, slice_mut, with_element, Element, Real, Rounding};
use crate::sparsify::{chunks, CHUNK};
use crate::{MergeContext, MergeMethod, Result};

pub struct Linear;

impl MergeMethod for Linear {
    /// Chunked: only the output is allocated at full size.
    fn working_copies(&self, _inputs: usize, _numel: u64) -> usize {
        1
    }

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
        let weights: Vec<f64> = (0..cx.inputs.len())
            .map(|i| f64::from(cx.input_number(i, "weight") as f32))
            .collect();
        let total = f64::from(weights.iter().map(|&w| w as f32).sum::<f32>());
        let divisor = cx.flag("normalize").then_some(total);
        if cx.inputs[0].device() != Device::Cpu {
            return Ok(average_by_kernels(cx.inputs, &weights, divisor));
        }
        let flat: Vec<Tensor> = cx.inputs.iter().map(flat_cpu).collect();
        let mut out = flat[0].empty_like();
        with_element!(out.kind(), T => average::<T>(&flat, &weights, divisor, &mut out));
        Ok(out.reshape(cx.inputs[0].size()))
    }
}

/// [`average`] as libtorch kernels on the inputs' device (an accelerator),
/// with the same operations in the same order: the same bits.
pub fn average_by_kernels(inputs: &[Tensor], weights: &[f64], divisor: Option<f64>) -> Tensor {
    let rounding = Rounding::new(inputs[0].kind());
    let sum = inputs.iter().zip(weights).fold(
        inputs[0].zeros_like().to_kind(rounding.wide),
        |sum, (x, &w)| sum + x.to_kind(rounding.wide) * w,
    );
    match divisor {
        Some(divisor) => rounding.divide(sum, divisor),
        None => sum,
    }
    .to_kind(rounding.kind)
}

/// Σ wᵢxᵢ (÷ `divisor`) accumulated in f32 (f64 for f64), chunk by chunk so
/// the accumulator stays in cache, rounded once into `out`.
fn average<T: Element>(inputs: &[Tensor], weights: &[f64], divisor: Option<f64>, out: &mut Tensor) {
    let inputs: Vec<&[T]> = inputs.iter().map(slice::<T>).collect();
    let out = slice_mut::<T>(out);
    let mut sum = [T::Math::ZERO; CHUNK];
    for (start, len) in chunks(out.len()) {
        let sum = &mut sum[..len];
        sum.fill(T::Math::ZERO);
        for (x, &w) in inputs.iter().zip(weights) {
            let w = T::Math::from_f64(w);
            for (acc, x) in sum.iter_mut().zip(&x[start..start + len]) {
                *acc = *acc + x.widen() * w;
            }
        }
        if let Some(divisor) = divisor {
            let divisor = T::Math::from_f64(divisor);
            sum.iter_mut().for_each(|acc| *acc = *acc / divisor);
        }
        for (y, &acc) in out[start..start + len].iter_mut().zip(sum.iter()) {
            *y = T::narrow(acc);
        }
    }
}
