//! `linear` — a weighted average Σ wᵢxᵢ / Σ wᵢ (`normalize: false` drops the
//! division). The base, if named, is an ordinary input with its own weight.
//! Computed in f32 (f64 for f64 inputs), like mergekit.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::Tensor;

use super::{at_least_f32, flag, weight};
use crate::sparsify::chunks;
use crate::{MergeContext, MergeMethod, Result};

pub struct Linear;

impl MergeMethod for Linear {
    /// Chunked: only the output is allocated at full size.
    fn working_copies(&self, _inputs: usize) -> usize {
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
        let kind = cx.inputs[0].kind();
        let wide = at_least_f32(kind);
        let weights: Vec<f64> = (0..cx.inputs.len())
            .map(|i| f64::from(cx.input_number(i, "weight") as f32))
            .collect();
        let total = f64::from(weights.iter().map(|&w| w as f32).sum::<f32>());
        let flat: Vec<Tensor> = cx.inputs.iter().map(|x| x.reshape([-1])).collect();
        let out = flat[0].empty_like();
        // Chunk by chunk, so the f32 accumulator stays in cache.
        for (start, len) in chunks(out.numel() as i64) {
            let mut sum = Tensor::zeros([len], (wide, out.device()));
            for (x, &w) in flat.iter().zip(&weights) {
                sum += x.narrow(0, start, len).to_kind(wide) * w;
            }
            if cx.flag("normalize") {
                sum /= total;
            }
            out.narrow(0, start, len).copy_(&sum);
        }
        Ok(out.reshape(cx.inputs[0].size()))
    }
}
