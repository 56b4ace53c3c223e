//! Sparsifiers for task vectors: which entries of a delta to keep, and the
//! L1-norm rescale that keeps the kept part's total magnitude.

use std::sync::Arc;

use tch::{Kind, Tensor};

use crate::elementwise::{flat_cpu, slice, with_element, Element, Real};
use crate::stream::{Stream, BLOCK};

/// Entries processed at a time by the fused loops: one chunk of every input's
/// delta stays in the CPU caches between the passes over it.
pub const CHUNK: usize = 1 << 14;

// DARE draws two decisions per 64-bit draw: a chunk's draws are one block.
const _: () = assert!(CHUNK / 2 == BLOCK);

/// `(start, len)` of each chunk of a flat tensor of `n` entries.
pub fn chunks(n: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..n)
        .step_by(CHUNK)
        .map(move |start| (start, CHUNK.min(n - start)))
}

/// A flat task vector (model − base), produced chunk by chunk without
/// materialising it.
pub struct Delta<'a, T> {
    pub model: &'a [T],
    pub base: &'a [T],
}

impl<T: Element> Delta<'_, T> {
    pub fn len(&self) -> usize {
        self.base.len()
    }

    pub fn is_empty(&self) -> bool {
        self.base.is_empty()
    }

    /// The entries from `start` into `out`, rounded to `T` as libtorch's
    /// subtraction in that dtype rounds them.
    #[inline(always)]
    pub fn values(&self, start: usize, out: &mut [T::Math]) {
        let end = start + out.len();
        for ((value, &model), &base) in out
            .iter_mut()
            .zip(&self.model[start..end])
            .zip(&self.base[start..end])
        {
            *value = T::round(model.widen() - base.widen());
        }
    }
}

/// How one model's task vector is pruned, decided chunk by chunk in flat order.
#[derive(Clone)]
pub enum Pruner {
    KeepAll,
    /// TIES: every entry above the k-th largest magnitude, then the first
    /// entries equal to it until exactly k are kept.
    Magnitude {
        threshold: f32,
        ties_left: usize,
    },
    /// DARE: Bernoulli(density) from a seeded stream: each 64-bit draw gives
    /// two 24-bit uniforms, an entry is kept when its uniform is below `limit`
    /// (density · 2²⁴, so integer compares decide).
    Random {
        rng: Stream,
        limit: u32,
    },
    /// A mask computed over the whole tensor (breadcrumbs, DELLA), read by range.
    Precomputed(Arc<KeepMask>),
}

/// One keep bit per entry of a flat tensor.
pub struct KeepMask {
    words: Vec<u64>,
}

impl KeepMask {
    pub fn new(len: usize) -> Self {
        KeepMask {
            words: vec![0; len.div_ceil(64)],
        }
    }

    /// Sets the bits from `start` (a multiple of 64, as chunk starts are) to `keep`.
    #[inline(always)]
    pub fn record(&mut self, start: usize, keep: &[bool]) {
        assert!(start % 64 == 0, "records start on a word");
        for (word, bits) in self.words[start / 64..].iter_mut().zip(keep.chunks(64)) {
            *word = bits
                .chunks(8)
                .enumerate()
                .fold(0, |w, (i, byte)| w | u64::from(pack8(byte)) << (8 * i));
        }
    }

    /// The bits from `start` (a multiple of 64) on, into `keep`.
    #[inline(always)]
    pub fn read(&self, start: usize, keep: &mut [bool]) {
        assert!(start % 64 == 0, "reads start on a word");
        for (&word, bits) in self.words[start / 64..].iter().zip(keep.chunks_mut(64)) {
            for (i, byte) in bits.chunks_mut(8).enumerate() {
                let unpacked = UNPACK[((word >> (8 * i)) & 0xff) as usize].to_le_bytes();
                for (k, &b) in byte.iter_mut().zip(&unpacked) {
                    *k = b == 1;
                }
            }
        }
    }
}

/// Up to eight keep flags as the bits of a byte (flag i → bit i): one
/// multiplication moves each flag's byte to its bit, with no carries.
#[inline(always)]
fn pack8(flags: &[bool]) -> u8 {
    let mut bytes = [0u8; 8];
    for (b, &f) in bytes.iter_mut().zip(flags) {
        *b = u8::from(f);
    }
    ((u64::from_le_bytes(bytes).wrapping_mul(0x0102_0408_1020_4080)) >> 56) as u8
}

/// Each byte value's bits as eight 0/1 bytes (bit i → byte i).
static UNPACK: [u64; 256] = {
    let mut table = [0u64; 256];
    let mut value = 0;
    while value < 256 {
        let mut bit = 0;
        while bit < 8 {
            table[value] |= (((value >> bit) & 1) as u64) << (8 * bit);
            bit += 1;
        }
        value += 1;
    }
    table
};

impl Pruner {
    /// TIES' trim: keeps exactly `max(1, ⌊density·n⌋)` entries with the largest
    /// |δ| (ties go to the lower flat index). The threshold comes from a radix
    /// selection over the magnitudes' bit patterns: two streaming passes, no sort.
    #[inline(always)]
    pub fn magnitude<T: Element>(delta: &Delta<'_, T>, density: f64) -> Self {
        let n = delta.len();
        let k = ((density * n as f64) as usize).clamp(1, n.max(1));
        let (threshold, greater) = kth_largest_magnitude(delta, k);
        Pruner::Magnitude {
            threshold,
            ties_left: k - greater,
        }
    }

    pub fn random(density: f64, seed: u64) -> Self {
        Pruner::Random {
            rng: Stream::seed_from_u64(seed),
            limit: (density * f64::from(1u32 << 24)).ceil() as u32,
        }
    }

    /// A pruner reading a whole-tensor boolean mask (on any device).
    pub fn precomputed(mask: &Tensor) -> Self {
        let flat = flat_cpu(&mask.to_kind(Kind::Bool));
        let bools = Vec::<bool>::try_from(&flat).expect("a bool mask");
        let mut bits = KeepMask::new(bools.len());
        bits.record(0, &bools);
        Pruner::Precomputed(Arc::new(bits))
    }

    /// Whether to keep each of the next `values.len()` entries, starting at
    /// flat index `start`, into `keep`.
    #[inline(always)]
    pub fn keep<M: Real>(&mut self, values: &[M], start: usize, keep: &mut [bool]) {
        let keep = &mut keep[..values.len()];
        match self {
            Pruner::KeepAll => keep.fill(true),
            Pruner::Precomputed(mask) => mask.read(start, keep),
            Pruner::Random { rng, limit } => {
                // The draws first (a whole chunk's in four lanes), then the
                // comparisons, which vectorise.
                let mut draws = [0u64; CHUNK / 2];
                let draws = &mut draws[..keep.len().div_ceil(2)];
                rng.fill(draws);
                let limit = *limit;
                let first = |draw: u64| (((draw >> 8) & 0xff_ffff) as u32) < limit;
                let mut pairs = keep.chunks_exact_mut(2);
                for (pair, &draw) in pairs.by_ref().zip(draws.iter()) {
                    pair[0] = first(draw);
                    pair[1] = ((draw >> 40) as u32) < limit;
                }
                if let [last] = pairs.into_remainder() {
                    *last = first(draws[draws.len() - 1]);
                }
            }
            Pruner::Magnitude {
                threshold,
                ties_left,
            } => {
                let bits = |value: &M| value.magnitude().to_bits();
                if let Some(floor) = magnitude_floor(*threshold, ties_left, values) {
                    for (k, value) in keep.iter_mut().zip(values) {
                        *k = bits(value) >= floor;
                    }
                    return;
                }
                // The quota runs out in this chunk: entry by entry.
                let threshold = threshold.to_bits();
                for (k, value) in keep.iter_mut().zip(values) {
                    let b = bits(value);
                    let tie = b == threshold && *ties_left > 0;
                    *k = b > threshold || tie;
                    *ties_left -= usize::from(tie);
                }
            }
        }
    }

    /// Drops (multiplies by zero, as a mask product would) the entries of the
    /// next chunk this pruner does not keep.
    #[inline(always)]
    pub fn prune<M: Real>(&mut self, values: &mut [M], start: usize, keep: &mut [bool]) {
        match self {
            Pruner::KeepAll => return,
            Pruner::Magnitude {
                threshold,
                ties_left,
            } => {
                // Most chunks in one pass, without keep flags.
                if let Some(floor) = magnitude_floor(*threshold, ties_left, values) {
                    for value in values.iter_mut() {
                        *value = *value * M::indicator(value.magnitude().to_bits() >= floor);
                    }
                    return;
                }
            }
            _ => {}
        }
        self.keep(values, start, keep);
        // A product with 0 or 1 rather than a branch: the keep pattern is random.
        for (value, &k) in values.iter_mut().zip(keep.iter()) {
            *value = *value * M::indicator(k);
        }
    }
}

/// TIES' rule for the next chunk of `values` when one comparison decides it:
/// keep the magnitudes whose bit patterns (which order non-negative floats,
/// NaN above all as torch sorts it, and vectorise) are at least the returned
/// floor — above the threshold once the ties' quota is used up, from the
/// threshold on while the chunk's ties fit in it (counted off). `None`: the
/// quota runs out inside this chunk.
#[inline(always)]
fn magnitude_floor<M: Real>(threshold: f32, ties_left: &mut usize, values: &[M]) -> Option<u32> {
    let threshold = threshold.to_bits();
    if *ties_left == 0 {
        return Some(threshold.saturating_add(1));
    }
    let ties = values
        .iter()
        .filter(|v| v.magnitude().to_bits() == threshold)
        .count();
    (ties <= *ties_left).then(|| {
        *ties_left -= ties;
        threshold
    })
}

/// Radix selection of the k-th largest |δ| (as f32): a histogram of the top
/// 16 bits of every magnitude, then of the low 16 bits within the chosen
/// bucket (non-negative floats order like their bit patterns). The second
/// pass is skipped when no magnitude has low bits (BF16 data). Returns the
/// value and how many entries are strictly larger.
#[inline(always)]
fn kth_largest_magnitude<T: Element>(delta: &Delta<'_, T>, k: usize) -> (f32, usize) {
    let mut values = [<T::Math as Real>::ZERO; CHUNK];
    let mut bits = [0u32; CHUNK];
    let mut high_counts = vec![0u32; 1 << 16];
    let mut low_bits = 0;
    for (start, len) in chunks(delta.len()) {
        let bits = magnitude_bits(delta, start, &mut values[..len], &mut bits[..len]);
        low_bits |= bits.iter().fold(0, |acc, &b| acc | b) & 0xffff;
        for &b in bits.iter() {
            high_counts[(b >> 16) as usize] += 1;
        }
    }
    let (high, above_high) = locate(&high_counts, k);
    if low_bits == 0 {
        return (f32::from_bits((high as u32) << 16), above_high);
    }
    let mut low_counts = vec![0u32; 1 << 16];
    let high = high as u32;
    for (start, len) in chunks(delta.len()) {
        for &b in magnitude_bits(delta, start, &mut values[..len], &mut bits[..len]).iter() {
            if b >> 16 == high {
                low_counts[(b & 0xffff) as usize] += 1;
            }
        }
    }
    let (low, above_low) = locate(&low_counts, k - above_high);
    (
        f32::from_bits((high << 16) | low as u32),
        above_high + above_low,
    )
}

/// The bit patterns of |δ| (as f32) for the chunk at `start`, into `bits`.
#[inline(always)]
fn magnitude_bits<'b, T: Element>(
    delta: &Delta<'_, T>,
    start: usize,
    values: &mut [T::Math],
    bits: &'b mut [u32],
) -> &'b [u32] {
    delta.values(start, values);
    for (b, v) in bits.iter_mut().zip(values.iter()) {
        *b = v.magnitude().to_bits();
    }
    bits
}

/// From the top bucket down, the first where the running count reaches
/// `want`, and how many entries lie in the buckets above it.
fn locate(counts: &[u32], want: usize) -> (usize, usize) {
    let mut above = 0;
    for bucket in (0..counts.len()).rev() {
        let count = counts[bucket] as usize;
        if above + count >= want {
            return (bucket, above);
        }
        above += count;
    }
    (0, above)
}

/// The keep mask over a whole tensor of the pruner `make` builds for it.
fn whole_mask<T: Element>(delta: &Tensor, make: impl FnOnce(&Delta<'_, T>) -> Pruner) -> Tensor {
    let flat = flat_cpu(delta);
    let zeros = vec![T::narrow(<T::Math as Real>::ZERO); flat.numel()];
    let source = Delta {
        model: slice::<T>(&flat),
        base: &zeros,
    };
    let mut pruner = make(&source);
    // Chunk by chunk, as the engine decides.
    let mut values = [<T::Math as Real>::ZERO; CHUNK];
    let mut keep = vec![false; source.len()];
    for (start, len) in chunks(source.len()) {
        source.values(start, &mut values[..len]);
        pruner.keep(&values[..len], start, &mut keep[start..start + len]);
    }
    Tensor::from_slice(&keep)
        .reshape(delta.size())
        .to_device(delta.device())
}

/// The whole-tensor TIES mask (for tests and callers outside the engine).
pub fn magnitude_mask(delta: &Tensor, density: f64) -> Tensor {
    with_element!(delta.kind(), T => whole_mask::<T>(delta, |source| Pruner::magnitude(source, density)))
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

/// The stream's next `n` draws as uniforms in [0, 1) with 24 bits (a flat
/// CPU tensor).
fn uniforms(rng: &mut Stream, n: usize) -> Tensor {
    let mut draws = vec![0u64; BLOCK.min(n)];
    let mut values = Vec::with_capacity(n);
    for start in (0..n).step_by(BLOCK) {
        let draws = &mut draws[..BLOCK.min(n - start)];
        rng.fill(draws);
        // The top 24 bits of the draw's high half (rand's `next_u32`).
        values.extend(
            draws
                .iter()
                .map(|&d| (d >> 40) as f32 * (1.0 / 16_777_216.0)),
        );
    }
    Tensor::from_slice(&values)
}

/// DARE's whole-tensor mask: keep each entry with probability `density`.
pub fn random_mask(delta: &Tensor, density: f64, seed: u64) -> Tensor {
    random_keep(delta.numel(), density, seed)
        .reshape(delta.size())
        .to_device(delta.device())
}

/// DARE's keep decisions for `n` entries from the stream `seed` (a flat CPU
/// bool tensor), drawn chunk by chunk as the fused loop draws them.
pub fn random_keep(n: usize, density: f64, seed: u64) -> Tensor {
    let mut pruner = Pruner::random(density, seed);
    let mut keep = vec![false; n];
    for (start, len) in chunks(n) {
        pruner.keep(&[0f32; CHUNK][..len], start, &mut keep[start..start + len]);
    }
    Tensor::from_slice(&keep)
}

/// Each entry's position in its row's stable ascending order of |value| (as
/// f32): the sorting permutation's inverse — what sorting the order again
/// gives — by a scatter instead of a second sort.
fn magnitude_ranks(rows: &Tensor) -> Tensor {
    let order = rows
        .abs()
        .to_kind(Kind::Float)
        .argsort_stable(true, 1, false);
    let positions = Tensor::arange(order.size()[1], (Kind::Int64, order.device()))
        .unsqueeze(0)
        .expand_as(&order);
    order.zeros_like().scatter(1, &order, &positions)
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
    let (count, width) = (rows.size()[0], rows.size()[1]);
    let low = (density - epsilon) as f32 as f64;
    let span = 2.0 * (epsilon as f32 as f64);
    // Rows a block at a time, so the sort's scratch stays small whatever the
    // tensor's size; the draws continue one stream in flat order.
    let per_block = (DELLA_BLOCK / width.max(1)).max(1);
    // Divided by a tensor: CUDA would multiply by a host scalar's reciprocal.
    let last = (width > 1).then(|| Tensor::from((width - 1) as f32).to_device(rows.device()));
    let mut rng = Stream::seed_from_u64(seed);
    let blocks: Vec<Tensor> = (0..count)
        .step_by(per_block as usize)
        .map(|start| {
            let block = rows.narrow(0, start, per_block.min(count - start));
            let rank = magnitude_ranks(&block).to_kind(Kind::Float);
            let rank_norm = match &last {
                Some(last) => rank / last,
                None => rank.zeros_like(),
            };
            let probability = rank_norm * span + low;
            uniforms(&mut rng, block.numel())
                .reshape(block.size())
                .to_device(block.device())
                .lt_tensor(&probability)
        })
        .collect();
    Tensor::cat(&blocks, 0).reshape(delta.size())
}

/// Entries of a DELLA block (whole rows, at least one).
const DELLA_BLOCK: i64 = 1 << 20;

#[cfg(test)]
mod tests {
    use super::*;

    /// The scatter gives the ranks a second stable sort gives, ties (equal
    /// magnitudes of either sign) included.
    #[test]
    fn magnitude_ranks_are_the_order_of_the_order() {
        let rows = (Tensor::randint(9, [7, 300], (Kind::Float, tch::Device::Cpu)) - 4.0)
            .to_kind(Kind::BFloat16);
        let twice = rows
            .abs()
            .to_kind(Kind::Float)
            .argsort_stable(true, 1, false)
            .argsort_stable(true, 1, false);
        assert!(magnitude_ranks(&rows).equal(&twice));
    }

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
        let n = 3 * CHUNK as i64 + 17;
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
