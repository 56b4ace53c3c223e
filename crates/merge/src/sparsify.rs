//! Sparsifiers for task vectors: which entries of a delta to keep, and the
//! L1-norm rescale that keeps the kept part's total magnitude.

use rand::{RngCore, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

/// Entries processed at a time by the streaming paths: one chunk of every
/// input and all temporaries stay in the CPU caches.
pub const CHUNK: i64 = 1 << 16;

/// `(start, len)` of each chunk of a flat tensor of `n` entries.
pub fn chunks(n: i64) -> impl Iterator<Item = (i64, i64)> {
    (0..n)
        .step_by(CHUNK as usize)
        .map(move |start| (start, CHUNK.min(n - start)))
}

/// A flat task vector, produced chunk by chunk without materialising it.
pub struct Delta<'a> {
    pub model: &'a Tensor,
    pub base: &'a Tensor,
}

impl Delta<'_> {
    pub fn numel(&self) -> i64 {
        self.base.numel() as i64
    }

    pub fn chunk(&self, start: i64, len: i64) -> Tensor {
        self.model.narrow(0, start, len) - self.base.narrow(0, start, len)
    }
}

/// How one model's task vector is pruned, applied chunk by chunk in flat order.
pub enum Pruner {
    KeepAll,
    /// TIES: every entry above the k-th largest magnitude, then the first
    /// entries equal to it until exactly k are kept.
    Magnitude {
        threshold: f32,
        ties_left: i64,
    },
    /// DARE: Bernoulli(density) from a seeded stream, one draw per entry.
    Random {
        rng: Xoshiro256PlusPlus,
        density: f64,
    },
    /// A mask computed over the whole tensor (breadcrumbs, DELLA), read by range.
    Precomputed(Tensor),
}

impl Pruner {
    /// TIES' trim: keeps exactly `max(1, ⌊density·n⌋)` entries with the largest
    /// |δ| (ties go to the lower flat index). The threshold comes from a radix
    /// selection over the magnitudes' bit patterns: two streaming passes, no sort.
    pub fn magnitude(delta: &Delta<'_>, density: f64) -> Self {
        let n = delta.numel();
        let k = ((density * n as f64) as i64).clamp(1, n.max(1));
        let (threshold, greater) = kth_largest_magnitude(delta, k);
        Pruner::Magnitude {
            threshold,
            ties_left: k - greater,
        }
    }

    pub fn random(density: f64, seed: u64) -> Self {
        Pruner::Random {
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
            density,
        }
    }

    /// A pruner in this one's initial state, to replay the same masks.
    pub fn replay(&self) -> Self {
        match self {
            Pruner::KeepAll => Pruner::KeepAll,
            Pruner::Magnitude {
                threshold,
                ties_left,
            } => Pruner::Magnitude {
                threshold: *threshold,
                ties_left: *ties_left,
            },
            Pruner::Random { rng, density } => Pruner::Random {
                rng: rng.clone(),
                density: *density,
            },
            Pruner::Precomputed(mask) => Pruner::Precomputed(mask.shallow_clone()),
        }
    }

    /// The keep mask for the next chunk (`None`: keep everything).
    pub fn mask(&mut self, delta: &Tensor, start: i64) -> Option<Tensor> {
        match self {
            Pruner::KeepAll => None,
            Pruner::Precomputed(mask) => Some(mask.narrow(0, start, delta.numel() as i64)),
            Pruner::Random { rng, density } => {
                let keep: Vec<bool> = (0..delta.numel())
                    .map(|_| uniform(rng) < *density as f32)
                    .collect();
                Some(Tensor::from_slice(&keep).to_device(delta.device()))
            }
            Pruner::Magnitude {
                threshold,
                ties_left,
            } => {
                let magnitude = delta.abs().to_kind(Kind::Float);
                let mut keep = magnitude.gt(f64::from(*threshold));
                if *ties_left > 0 {
                    let equal = magnitude.eq(f64::from(*threshold));
                    let count = equal.sum(Kind::Int64).int64_value(&[]);
                    let taken = if count <= *ties_left {
                        equal
                    } else {
                        equal.logical_and(
                            &equal
                                .to_kind(Kind::Int64)
                                .cumsum(0, Kind::Int64)
                                .le(*ties_left),
                        )
                    };
                    *ties_left -= count.min(*ties_left);
                    keep = keep.logical_or(&taken);
                }
                Some(keep)
            }
        }
    }
}

/// Radix selection of the k-th largest |δ| (f32): a histogram of the top 16
/// bits of every magnitude, then of the low 16 bits within the chosen bucket
/// (non-negative floats order like their bit patterns). Returns the value and
/// how many entries are strictly larger.
fn kth_largest_magnitude(delta: &Delta<'_>, k: i64) -> (f32, i64) {
    let histogram = |select: &dyn Fn(u32) -> Option<usize>| {
        let mut counts = vec![0i64; 1 << 16];
        for (start, len) in chunks(delta.numel()) {
            let magnitude = delta
                .chunk(start, len)
                .abs()
                .to_kind(Kind::Float)
                .contiguous();
            for &value in f32_slice(&magnitude) {
                if let Some(bucket) = select(value.to_bits()) {
                    counts[bucket] += 1;
                }
            }
        }
        counts
    };
    // From the top bucket down, the first where the running count reaches `want`.
    let locate = |counts: &[i64], want: i64| -> (usize, i64) {
        let mut above = 0;
        for bucket in (0..counts.len()).rev() {
            if above + counts[bucket] >= want {
                return (bucket, above);
            }
            above += counts[bucket];
        }
        (0, above)
    };
    let high_counts = histogram(&|bits| Some((bits >> 16) as usize));
    let (high, above_high) = locate(&high_counts, k);
    let low_counts =
        histogram(&|bits| ((bits >> 16) as usize == high).then_some((bits & 0xffff) as usize));
    let (low, above_low) = locate(&low_counts, k - above_high);
    (
        f32::from_bits(((high as u32) << 16) | low as u32),
        above_high + above_low,
    )
}

/// The contents of a contiguous CPU f32 tensor.
fn f32_slice(t: &Tensor) -> &[f32] {
    assert!(t.kind() == Kind::Float && t.is_contiguous() && t.device() == tch::Device::Cpu);
    let len = t.numel();
    if len == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU f32 tensor of `len` elements, borrowed for the slice's lifetime.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const f32, len) }
}

/// A uniform draw in [0, 1) with 24 random bits.
fn uniform(rng: &mut Xoshiro256PlusPlus) -> f32 {
    (rng.next_u32() >> 8) as f32 * (1.0 / 16_777_216.0)
}

/// The whole-tensor TIES mask (for tests and callers outside the engine).
pub fn magnitude_mask(delta: &Tensor, density: f64) -> Tensor {
    let flat = delta.reshape([-1]);
    let zero = flat.zeros_like();
    let source = Delta {
        model: &flat,
        base: &zero,
    };
    let mut pruner = Pruner::magnitude(&source, density);
    let parts: Vec<Tensor> = chunks(source.numel())
        .map(|(start, len)| {
            pruner
                .mask(&source.chunk(start, len), start)
                .expect("a magnitude mask")
        })
        .collect();
    Tensor::cat(&parts, 0).reshape(delta.size())
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
    let values: Vec<f32> = (0..delta.numel()).map(|_| uniform(&mut rng)).collect();
    Tensor::from_slice(&values)
        .reshape(delta.size())
        .to_device(delta.device())
}

/// DARE's whole-tensor mask: keep each entry with probability `density`.
pub fn random_mask(delta: &Tensor, density: f64, seed: u64) -> Tensor {
    let flat = delta.reshape([-1]);
    Pruner::random(density, seed)
        .mask(&flat, 0)
        .expect("a random mask")
        .reshape(delta.size())
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
    fn streaming_magnitude_masks_agree_across_chunk_boundaries() {
        // More than one chunk, with many equal magnitudes straddling chunk edges.
        let n = 3 * CHUNK + 17;
        let values = Tensor::arange(n, (Kind::Float, tch::Device::Cpu)).remainder(7.0) - 3.0;
        for density in [0.1, 0.5, 0.93] {
            let mask = magnitude_mask(&values, density);
            let k = ((density * n as f64) as i64).max(1);
            assert_eq!(mask.sum(Kind::Int64).int64_value(&[]), k, "exactly k kept");
            // Everything kept is at least as large as everything dropped.
            let kept_min = values.abs().masked_select(&mask).min().double_value(&[]);
            let dropped_max = values
                .abs()
                .masked_select(&mask.logical_not())
                .max()
                .double_value(&[]);
            assert!(kept_min >= dropped_max);
        }
    }

    #[test]
    fn random_masks_depend_only_on_the_seed() {
        let delta = Tensor::ones([1000], (Kind::Float, tch::Device::Cpu));
        let a = random_mask(&delta, 0.3, 7);
        assert!(a.equal(&random_mask(&delta, 0.3, 7)));
        assert!(!a.equal(&random_mask(&delta, 0.3, 8)));
    }
}
