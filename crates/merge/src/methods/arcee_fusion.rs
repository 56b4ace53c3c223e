//! `arcee_fusion` — take the other model's value only where it matters: the
//! importance of an entry is |x − base| times the KL divergence between the
//! softmax of the other model's row and the base's (last dimension); entries
//! whose importance reaches median + 1.5·IQR (a Tukey fence over the tensor's
//! importances) take the other model's value, the rest keep the base's.
//!
//! The quartiles are exact up to 2²⁰ entries. Beyond, like mergekit, they are
//! estimated from 2²⁰ entries drawn with replacement — here from the tensor's
//! own seeded stream, so the result is reproducible (mergekit's draws come
//! from torch's global generator and are not).

use amalgam_recipe::{BasePolicy, MethodSpec};
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use crate::{MergeContext, MergeMethod, Result};

pub struct ArceeFusion;

/// Entries sampled for the quartiles of a larger tensor (mergekit's 1,000,000).
const QUANTILE_SAMPLE: i64 = 1_000_000;

impl MergeMethod for ArceeFusion {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "arcee_fusion",
            base: BasePolicy::Required,
            params: vec![],
            min_models: 1,
            max_models: Some(1),
        }
    }

    fn working_copies(&self, _inputs: usize, _numel: u64) -> usize {
        6
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let other_index = cx.others()[0];
        let other = &cx.inputs[other_index];
        let importance = importance(other, base);
        let threshold = tukey_fence(&importance, cx.stream(other_index));
        // A float32 mask whatever the math dtype, as mergekit makes it.
        let mask = importance.ge_tensor(&threshold).to_kind(Kind::Float);
        Ok(base + (other - base) * mask)
    }
}

/// |x − base| · KL(softmax(x) ‖ softmax(base)) per row (the last dimension).
fn importance(x: &Tensor, base: &Tensor) -> Tensor {
    const EPS: f64 = 1e-8;
    let p = x.softmax(-1, None::<Kind>) + EPS;
    let q = base.softmax(-1, None::<Kind>) + EPS;
    let kl = (&p * (&p / &q).log()).sum_dim_intlist([-1i64].as_slice(), true, None::<Kind>);
    (x - base).abs() * kl
}

/// median + 1.5 · (q3 − q1) of the importances, as a 0-dimensional tensor:
/// quartiles read off the sorted values at ⌊q · (n − 1)⌋ (in f32, as mergekit
/// computes the positions).
fn tukey_fence(importance: &Tensor, seed: u64) -> Tensor {
    let mut flat = importance.reshape([-1]);
    let n = flat.size()[0];
    if n > QUANTILE_SAMPLE {
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        let picks: Vec<i64> = (0..QUANTILE_SAMPLE)
            .map(|_| rng.random_range(0..n))
            .collect();
        flat = flat.index_select(0, &Tensor::from_slice(&picks).to_device(flat.device()));
    }
    let (sorted, _) = flat.sort(0, false);
    let last = (sorted.size()[0] - 1) as f32;
    let at = |q: f32| sorted.get((q * last) as i64);
    let (q1, median, q3) = (at(0.25), at(0.5), at(0.75));
    median + (q3 - q1) * 1.5
}
