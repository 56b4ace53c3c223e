//! Sparsifiers for task vectors: which entries of a delta to keep, and the
//! L1-norm rescale that keeps the kept part's total magnitude.

use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

/// Below this L1 norm a delta (or its kept part) is not rescaled.
const RESCALE_EPS: f64 = 1e-7;

/// Keeps exactly `max(1, ⌊density·n⌋)` entries with the largest |δ| over the
/// whole tensor (ties at the threshold go to the lower flat index). Selection
/// by the k-th value, not a full sort.
pub fn magnitude_mask(delta: &Tensor, density: f64) -> Tensor {
    let n = delta.numel() as i64;
    let k = ((density * n as f64) as i64).max(1);
    let magnitude = delta.abs().to_kind(Kind::Float).reshape([-1]);
    top_k_mask(&magnitude, k).reshape(delta.size())
}

/// A boolean mask of exactly `k` entries of a flat tensor: every entry above
/// the k-th largest value, plus the first entries equal to it.
fn top_k_mask(values: &Tensor, k: i64) -> Tensor {
    let n = values.numel() as i64;
    if k >= n {
        return values.ones_like().to_kind(Kind::Bool);
    }
    // The k-th largest is the (n − k + 1)-th smallest.
    let (threshold, _) = values.kthvalue(n - k + 1, 0, false);
    let above = values.gt_tensor(&threshold);
    let equal = values.eq_tensor(&threshold);
    let still_needed = k - above.sum(Kind::Int64).int64_value(&[]);
    let first_equal = equal
        .to_kind(Kind::Int64)
        .cumsum(0, Kind::Int64)
        .le(still_needed);
    above.logical_or(&equal.logical_and(&first_equal))
}

/// Breadcrumbs: drop the largest `⌊γ·n⌋` magnitudes and the smallest ones,
/// keeping `⌊density·n⌋` entries just below the top (mergekit's positions
/// `[n_bot, n_bot + target)` of the ascending order).
pub fn outlier_mask(delta: &Tensor, density: f64, gamma: f64) -> Tensor {
    let n = delta.numel() as i64;
    let target = (density * n as f64) as i64;
    let top = (gamma * n as f64) as i64;
    let bottom = (n - target - top).max(0);
    let magnitude = delta.abs().to_kind(Kind::Float).reshape([-1]);
    let order = magnitude.argsort_stable(true, 0, false);
    let keep = order.narrow(0, bottom, target.min(n - bottom));
    let mask = Tensor::zeros([n], (Kind::Bool, delta.device()));
    mask.index_fill(0, &keep, 1).reshape(delta.size())
}

/// Uniform draws in [0, 1) with 24 bits, one per entry, from the stream `seed`
/// (independent of thread count and device).
pub fn uniform_like(delta: &Tensor, seed: u64) -> Tensor {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let values: Vec<f32> = (0..delta.numel())
        .map(|_| (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0))
        .collect();
    Tensor::from_slice(&values)
        .reshape(delta.size())
        .to_device(delta.device())
}

/// DARE: keep each entry with probability `density`.
pub fn random_mask(delta: &Tensor, density: f64, seed: u64) -> Tensor {
    uniform_like(delta, seed).lt(density)
}

/// DELLA's MAGPRUNE: within each row (a 1-D tensor is one row), keep
/// probabilities rise linearly with the magnitude rank from `density − ε` to
/// `density + ε`.
pub fn della_mask(delta: &Tensor, density: f64, epsilon: f64, seed: u64) -> Tensor {
    let rows = if delta.dim() == 1 {
        delta.reshape([1, -1])
    } else {
        delta.reshape([delta.size()[0], -1])
    };
    let width = rows.size()[1];
    let rank = rows
        .abs()
        .to_kind(Kind::Float)
        .argsort_stable(true, 1, false)
        .argsort_stable(true, 1, false)
        .to_kind(Kind::Float);
    let rank_norm = if width > 1 {
        rank / (width - 1) as f64
    } else {
        rank.zeros_like()
    };
    let low = (density - epsilon) as f32 as f64;
    let span = 2.0 * (epsilon as f32 as f64);
    let probability = rank_norm * span + low;
    uniform_like(&rows, seed)
        .lt_tensor(&probability)
        .reshape(delta.size())
}

/// `δ·mask`, scaled (if asked) so its L1 norm equals δ's.
pub fn apply_mask(delta: &Tensor, mask: &Tensor, rescale: bool) -> Tensor {
    let kept = delta * mask.to_kind(delta.kind());
    if !rescale {
        return kept;
    }
    let before = delta.abs().sum(Kind::Double).double_value(&[]);
    let after = kept.abs().sum(Kind::Double).double_value(&[]);
    if before < RESCALE_EPS || after < RESCALE_EPS {
        return kept;
    }
    kept * (before / after)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn magnitude_keeps_exactly_k_even_with_ties() {
        let delta = Tensor::from_slice(&[0.0f32, 3.0, -3.0, 1.0, 3.0, 0.0, -5.0, 2.0]);
        let mask = magnitude_mask(&delta, 0.5); // k = 4: -5 and the first three 3s
        let kept: Vec<bool> = Vec::<bool>::try_from(&mask).unwrap();
        assert_eq!(kept, [false, true, true, false, true, false, true, false]);
        let mask = magnitude_mask(&delta, 0.01); // k = max(1, 0)
        assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), 1);
    }

    #[test]
    fn outliers_drop_the_top_gamma_and_the_bottom() {
        let delta = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0]);
        // target 5, top 2 → keep ranks [3, 8): values 4..=8
        let kept: Vec<bool> = Vec::<bool>::try_from(&outlier_mask(&delta, 0.5, 0.2)).unwrap();
        assert_eq!(
            kept,
            [false, false, false, true, true, true, true, true, false, false]
        );
        // gamma 0 keeps the top `target` (no empty-slice bug)
        let kept: Vec<bool> = Vec::<bool>::try_from(&outlier_mask(&delta, 0.3, 0.0)).unwrap();
        assert_eq!(
            kept,
            [false, false, false, false, false, false, false, true, true, true]
        );
    }

    #[test]
    fn rescale_matches_the_l1_norm() {
        let delta = Tensor::from_slice(&[1.0f32, -2.0, 3.0, -4.0]);
        let mask = Tensor::from_slice(&[true, false, true, false]);
        let out = apply_mask(&delta, &mask, true);
        let l1 = out.abs().sum(Kind::Float).double_value(&[]);
        assert!((l1 - 10.0).abs() < 1e-5);
        assert_eq!(apply_mask(&delta, &mask, false).double_value(&[1]), 0.0);
    }

    #[test]
    fn random_masks_depend_only_on_the_seed() {
        let delta = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        let a = random_mask(&delta, 0.3, 7);
        assert!(a.equal(&random_mask(&delta, 0.3, 7)));
        assert!(!a.equal(&random_mask(&delta, 0.3, 8)));
    }
}
