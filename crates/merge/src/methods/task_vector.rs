//! The task-vector family (task arithmetic, TIES, DARE, breadcrumbs, DELLA):
//! deltas from the base, optionally sparsified, weighted, optionally combined
//! by sign election, optionally normalised, scaled by λ, added to the base.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamScope};
use tch::{Device, Kind, Tensor};

use super::{density, flag, number, weight};
use crate::elementwise::{flat_cpu, slice, slice_mut, with_element, Element, Real, Rounding};
use crate::sparsify::{chunks, della_mask, outlier_mask, random_keep, Delta, Pruner, CHUNK};
use crate::{MergeContext, MergeMethod, Result};

/// How a member of the family prunes each delta.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sparsifier {
    None,
    /// TIES: the largest magnitudes over the whole tensor.
    Magnitude,
    /// DARE: a Bernoulli(density) mask.
    Random,
    /// Breadcrumbs: drop the largest `gamma` fraction and the smallest.
    Outliers,
    /// DELLA: Bernoulli with keep probability rising with the magnitude rank.
    Della,
}

/// A member of the family, fully described by these switches.
#[derive(Debug, Clone, Copy)]
pub struct TaskVectorMethod {
    pub name: &'static str,
    pub sparsifier: Sparsifier,
    /// Sign election: keep only entries agreeing with the weighted majority
    /// sign, and normalise by the weights of the agreeing models per entry.
    pub consensus: bool,
    /// Default of `normalize`.
    pub normalize: bool,
    /// Default of `rescale`: the L1-norm rescale of sparsified deltas
    /// (mergekit's rule). `dare_rescale_reciprocal: true` instead divides kept
    /// entries by the density, as the DARE paper does.
    pub rescale: bool,
}

impl MergeMethod for TaskVectorMethod {
    /// Chunked: only the output is allocated at full size, and the pruned
    /// deltas the L1 pass keeps (counted for every sparsifier: the recipe's
    /// `rescale` is not known here).
    fn working_copies(&self, inputs: usize, numel: u64) -> usize {
        let models = inputs.saturating_sub(1);
        let sparsified = self.sparsifier != Sparsifier::None;
        1 + if sparsified && keeps_pruned_deltas(models, numel) {
            models
        } else {
            0
        }
    }

    fn spec(&self) -> MethodSpec {
        let mut params = vec![
            weight(ParamScope::PerNonBase),
            density(),
            flag("normalize", self.normalize),
            flag("rescale", self.rescale),
            flag("int8_mask", false),
            number("lambda", ParamScope::Shared, Some(1.0)),
            flag("dare_rescale_reciprocal", false),
        ];
        match self.sparsifier {
            Sparsifier::Outliers => {
                params.push(number("gamma", ParamScope::PerNonBase, Some(0.01)))
            }
            Sparsifier::Della => params.push(number("epsilon", ParamScope::PerNonBase, Some(0.15))),
            _ => {}
        }
        MethodSpec {
            name: self.name,
            base: BasePolicy::Required,
            params,
            min_models: 1,
            max_models: None,
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        if cx.others().is_empty() {
            return Ok(base.shallow_clone());
        }
        if base.device() != Device::Cpu {
            return self.merge_by_kernels(cx);
        }
        let keep_pruned = keeps_pruned_deltas(cx.others().len(), base.numel() as u64);
        self.merge_fused(cx, keep_pruned)
    }
}

/// Which entries of one input's task vector are kept.
#[derive(Debug, Clone, Copy)]
enum Keep {
    All,
    /// TIES: the `density` fraction of largest magnitudes.
    Largest {
        density: f64,
    },
    /// DARE: Bernoulli(`density`) from the stream `seed`.
    Random {
        density: f64,
        seed: u64,
    },
    /// Breadcrumbs.
    Outliers {
        density: f64,
        gamma: f64,
    },
    /// DELLA.
    RankedRandom {
        density: f64,
        epsilon: f64,
        seed: u64,
    },
}

/// What the kept part of a task vector is multiplied by.
#[derive(Debug, Clone, Copy)]
enum Rescale {
    None,
    /// The DARE paper's 1/density.
    By(f64),
    /// Σ|δ| / Σ|kept δ| (mergekit's rule), when both are above `RESCALE_EPS`.
    L1,
}

/// How one chunk of weighted task vectors becomes the mixed delta, in the
/// math type `M`.
struct Combine<M> {
    consensus: bool,
    /// Divide by the total weight (of the agreeing models, with consensus).
    normalize: bool,
    /// Each model's weight, rounded to the math dtype.
    weights: Vec<M>,
    /// Σ weights, the divisor without consensus (1 when it is ~0).
    total: M,
    lambda: Option<M>,
}

impl TaskVectorMethod {
    /// The merge of CPU tensors by the fused chunk loops. `keep_pruned`:
    /// whether the L1 pass keeps the pruned deltas for the merge pass (see
    /// [`keeps_pruned_deltas`]); both ways give the same bits.
    pub fn merge_fused(&self, cx: &MergeContext<'_>, keep_pruned: bool) -> Result<Tensor> {
        let base = cx.base_tensor();
        if cx.others().is_empty() {
            return Ok(base.shallow_clone());
        }
        let flat_base = flat_cpu(base);
        let mut out = flat_base.empty_like();
        with_element!(base.kind(), T => self.merge_flat::<T>(cx, &flat_base, &mut out, keep_pruned))?;
        Ok(out.reshape(base.size()))
    }

    /// The whole merge over flat CPU data, chunk by chunk: each model's δ is
    /// computed, pruned, rescaled and weighted into a buffer, the buffers are
    /// combined into the mixed delta, and the base is added — every step a
    /// plain loop over cache-resident buffers, in the AVX2 build where the
    /// CPU has it.
    fn merge_flat<T: Element>(
        &self,
        cx: &MergeContext<'_>,
        flat_base: &Tensor,
        out: &mut Tensor,
        keep_pruned: bool,
    ) -> Result<()> {
        #[cfg(target_arch = "x86_64")]
        if crate::elementwise::has_avx2() {
            // SAFETY: the CPU has AVX2 and FMA (checked).
            return unsafe { self.merge_flat_avx2::<T>(cx, flat_base, out, keep_pruned) };
        }
        self.merge_chunks::<T>(cx, flat_base, out, keep_pruned)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn merge_flat_avx2<T: Element>(
        &self,
        cx: &MergeContext<'_>,
        flat_base: &Tensor,
        out: &mut Tensor,
        keep_pruned: bool,
    ) -> Result<()> {
        self.merge_chunks::<T>(cx, flat_base, out, keep_pruned)
    }

    #[inline(always)]
    fn merge_chunks<T: Element>(
        &self,
        cx: &MergeContext<'_>,
        flat_base: &Tensor,
        out: &mut Tensor,
        keep_pruned: bool,
    ) -> Result<()> {
        let others = cx.others();
        let flat: Vec<Tensor> = others.iter().map(|&i| flat_cpu(&cx.inputs[i])).collect();
        let base = slice::<T>(flat_base);
        let deltas: Vec<Delta<'_, T>> = flat
            .iter()
            .map(|model| Delta {
                model: slice::<T>(model),
                base,
            })
            .collect();
        let mut pruners = Vec::with_capacity(others.len());
        let mut rescales = Vec::with_capacity(others.len());
        for (delta, &input) in deltas.iter().zip(&others) {
            let (keep, rescale) = self.keep_rule(cx, input)?;
            pruners.push(pruner(cx, input, keep, delta));
            rescales.push(rescale);
        }
        let first_pass = measure_kept_parts(&deltas, &pruners, &rescales, keep_pruned);
        let combine = Combine::<T::Math>::new::<T>(self, cx);
        let out = slice_mut::<T>(out);
        let mut weighted = vec![vec![T::Math::ZERO; CHUNK]; deltas.len()];
        let mut scratch = [[T::Math::ZERO; CHUNK]; 3];
        let mut keep = vec![false; CHUNK];
        for (start, len) in chunks(base.len()) {
            for ((((values, delta), pruner), measured), &weight) in weighted
                .iter_mut()
                .zip(&deltas)
                .zip(&mut pruners)
                .zip(&first_pass)
                .zip(&combine.weights)
            {
                let values = &mut values[..len];
                match &measured.pruned {
                    Some(pruned) => {
                        for (v, &p) in values.iter_mut().zip(&pruned[start..start + len]) {
                            *v = p.widen();
                        }
                    }
                    None => {
                        delta.values(start, values);
                        pruner.prune(values, start, &mut keep);
                    }
                }
                match measured.scale.map(T::Math::from_f64) {
                    Some(scale) => values
                        .iter_mut()
                        .for_each(|v| *v = T::round(T::round(*v * scale) * weight)),
                    None => values.iter_mut().for_each(|v| *v = T::round(*v * weight)),
                }
            }
            let columns: Vec<&[T::Math]> = weighted.iter().map(|w| &w[..len]).collect();
            let [sum, kept, shares] = &mut scratch;
            combine.chunk::<T>(
                &columns,
                [&mut sum[..len], &mut kept[..len], &mut shares[..len]],
                &base[start..start + len],
                &mut out[start..start + len],
            );
        }
        Ok(())
    }
}

impl TaskVectorMethod {
    /// The same merge as libtorch kernels on the tensors' device (an
    /// accelerator): the fused loop's operations in its order, rounded to the
    /// tensors' dtype where the loop rounds, so the result has the same bits.
    /// (The L1 rescale's sums run in another order; its F64 ratio is rounded
    /// to the math dtype, so the factors agree unless the ratio falls within
    /// ~1e-15 of a rounding boundary.)
    pub fn merge_by_kernels(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let base = cx.base_tensor();
        let kind = base.kind();
        let rounding = Rounding::new(kind);
        let combine = with_element!(kind, T => Combine::new::<T>(self, cx).in_f64());
        let wide_base = base.to_kind(rounding.wide);
        let mut columns = Vec::new();
        for (&input, &weight) in cx.others().iter().zip(&combine.weights) {
            let (keep, rescale) = self.keep_rule(cx, input)?;
            let delta = rounding.round(cx.inputs[input].to_kind(rounding.wide) - &wide_base);
            let whole = || &cx.inputs[input] - base;
            let mask = match keep {
                Keep::All => None,
                Keep::Largest { density } => Some(largest_mask(&delta, density)),
                Keep::Random { density, seed } => {
                    Some(random_keep(delta.numel(), density, seed).to_device(delta.device()))
                }
                Keep::Outliers { density, gamma } => Some(outlier_mask(&whole(), density, gamma)),
                Keep::RankedRandom {
                    density,
                    epsilon,
                    seed,
                } => Some(della_mask(&whole(), density, epsilon, seed)),
            };
            let mut values = match &mask {
                Some(mask) => &delta * mask.reshape(delta.size()).to_kind(rounding.wide),
                None => delta.shallow_clone(),
            };
            let scale = match rescale {
                Rescale::None => None,
                Rescale::By(factor) => Some(factor),
                Rescale::L1 => l1_scale(
                    delta.abs().sum(Kind::Double).double_value(&[]),
                    values.abs().sum(Kind::Double).double_value(&[]),
                ),
            };
            if let Some(scale) = scale {
                values = rounding.round(values * rounding.scalar(scale));
            }
            columns.push(rounding.round(values * weight));
        }
        let mixed = combine.tensors(&columns, &rounding);
        Ok((wide_base + mixed).to_kind(kind))
    }
}

/// TIES' trim as kernels: the entries the radix selection keeps (the k
/// largest magnitudes as F32 bit patterns; ties to the lower flat index).
fn largest_mask(delta: &Tensor, density: f64) -> Tensor {
    let n = delta.numel();
    if n == 0 {
        return delta.zeros_like().to_kind(Kind::Bool);
    }
    let k = ((density * n as f64) as usize).clamp(1, n) as i64;
    let bits = delta
        .abs()
        .to_kind(Kind::Float)
        .reshape([-1])
        .view_dtype(Kind::Int);
    let (threshold, _) = bits.kthvalue(n as i64 - k + 1, 0, false);
    let above = bits.gt_tensor(&threshold);
    let tie = bits.eq_tensor(&threshold);
    let ties_left = k - above.sum(Kind::Int64).int64_value(&[]);
    above.logical_or(&tie.logical_and(&tie.cumsum(0, Kind::Int64).le(ties_left)))
}

impl Combine<f64> {
    /// Sign election, normalisation and λ over whole weighted task vectors,
    /// as [`Combine::chunk`] does chunk by chunk.
    fn tensors(&self, columns: &[Tensor], rounding: &Rounding) -> Tensor {
        let (first, rest) = columns.split_first().expect("at least one model");
        let sum = rest.iter().fold(first.shallow_clone(), |sum, c| sum + c);
        let mixed = if self.consensus {
            let positive = rounding.round(sum).ge(0.0);
            let negative = positive.logical_not();
            let mut terms = columns.iter().zip(&self.weights).map(|(c, &weight)| {
                let agrees = positive
                    .logical_and(&c.gt(0.0))
                    .logical_or(&negative.logical_and(&c.lt(0.0)));
                let mask = agrees.to_kind(c.kind());
                (c * &mask, mask * weight)
            });
            let first = terms.next().expect("at least one model");
            let (kept, shares) = terms.fold(first, |(k, s), (term, share)| (k + term, s + share));
            let mixed = rounding.round(kept);
            let divisor = rounding.round(shares);
            let divisor = divisor.where_self(&divisor.ne(0.0), &divisor.ones_like());
            if self.normalize {
                rounding.round(mixed / divisor)
            } else {
                mixed
            }
        } else {
            let mixed = rounding.round(sum);
            if self.normalize {
                rounding.round(rounding.divide(mixed, self.total))
            } else {
                mixed
            }
        };
        match self.lambda {
            Some(lambda) => rounding.round(mixed * lambda),
            None => mixed,
        }
    }
}

impl<M: Real> Combine<M> {
    /// The recipe's weights, normalisation and λ for the inputs other than the base.
    fn new<T: Element<Math = M>>(method: &TaskVectorMethod, cx: &MergeContext<'_>) -> Self {
        // Weights are rounded to the math dtype, as the deltas are.
        let weights: Vec<M> = cx
            .others()
            .iter()
            .map(|&i| T::round(M::from_f64(cx.input_number(i, "weight"))))
            .collect();
        let total = T::round(weights[1..].iter().fold(weights[0], |acc, &w| acc + w));
        let lambda = cx.number("lambda");
        Combine {
            consensus: method.consensus,
            normalize: cx.flag("normalize"),
            total: if total.abs().to_f64() < 1e-8 {
                M::ONE
            } else {
                total
            },
            weights,
            lambda: (lambda != 1.0).then(|| M::from_f64(lambda)),
        }
    }

    /// The same values as f64 (exactly: the math types are f32 and f64).
    fn in_f64(&self) -> Combine<f64> {
        Combine {
            consensus: self.consensus,
            normalize: self.normalize,
            weights: self.weights.iter().map(|w| w.to_f64()).collect(),
            total: self.total.to_f64(),
            lambda: self.lambda.map(M::to_f64),
        }
    }

    /// Sign election (optional), normalisation and λ over one chunk of
    /// weighted task vectors (one column per model), each step rounded to
    /// `T`, then the base added: the chunk `out`. Sums run in column order
    /// from the first term, as torch's `stack(…).sum(0)` accumulates (in f32
    /// for 16-bit floats); `sum`, `kept` and `shares` are scratch space.
    #[inline(always)]
    fn chunk<T: Element<Math = M>>(
        &self,
        columns: &[&[M]],
        [sum, kept, shares]: [&mut [M]; 3],
        base: &[T],
        out: &mut [T],
    ) {
        let (first, rest) = columns.split_first().expect("at least one model");
        sum.copy_from_slice(first);
        for column in rest {
            sum.iter_mut().zip(*column).for_each(|(s, &w)| *s = *s + w);
        }
        let finish = |m: M, divisor: M| {
            let mut m = T::round(m);
            if self.normalize {
                m = T::round(m / divisor);
            }
            if let Some(lambda) = self.lambda {
                m = T::round(m * lambda);
            }
            m
        };
        let outputs = out.iter_mut().zip(base);
        if !self.consensus {
            for ((y, &b), &s) in outputs.zip(sum.iter()) {
                *y = T::narrow(b.widen() + finish(s, self.total));
            }
            return;
        }
        // The weighted majority sign; an exact tie counts as positive, and
        // zero entries never agree. Disagreeing entries and their weights
        // count as zeros (a mask product), keeping signed-zero results.
        let term = |w: M, sum: M, weight: M| {
            let positive = T::round(sum) >= M::ZERO;
            let agrees = (positive && w > M::ZERO) | (!positive && w < M::ZERO);
            let mask = M::indicator(agrees);
            (w * mask, weight * mask)
        };
        for (j, (column, &weight)) in columns.iter().zip(&self.weights).enumerate() {
            let entries = kept
                .iter_mut()
                .zip(shares.iter_mut())
                .zip(*column)
                .zip(sum.iter());
            if j == 0 {
                for (((k, d), &w), &s) in entries {
                    (*k, *d) = term(w, s, weight);
                }
            } else {
                for (((k, d), &w), &s) in entries {
                    let (k_j, d_j) = term(w, s, weight);
                    (*k, *d) = (*k + k_j, *d + d_j);
                }
            }
        }
        for (((y, &b), &k), &d) in outputs.zip(kept.iter()).zip(shares.iter()) {
            let divisor = T::round(d);
            let divisor = if divisor == M::ZERO { M::ONE } else { divisor };
            *y = T::narrow(b.widen() + finish(k, divisor));
        }
    }
}

impl TaskVectorMethod {
    /// How `input`'s task vector is pruned and rescaled.
    fn keep_rule(&self, cx: &MergeContext<'_>, input: usize) -> Result<(Keep, Rescale)> {
        let density = cx.input_number(input, "density");
        if self.sparsifier == Sparsifier::None || density >= 1.0 {
            return Ok((Keep::All, Rescale::None));
        }
        let keep = match self.sparsifier {
            Sparsifier::None => unreachable!("returned above"),
            Sparsifier::Magnitude => Keep::Largest { density },
            Sparsifier::Random => Keep::Random {
                density,
                seed: cx.stream(input),
            },
            Sparsifier::Outliers => Keep::Outliers {
                density,
                gamma: cx.input_number(input, "gamma"),
            },
            Sparsifier::Della => {
                let epsilon = cx.input_number(input, "epsilon");
                if density - epsilon <= 0.0 || density + epsilon >= 1.0 {
                    return Err(cx.error(format!("della needs 0 < density ± epsilon < 1 (density {density}, epsilon {epsilon})")));
                }
                Keep::RankedRandom {
                    density,
                    epsilon,
                    seed: cx.stream(input),
                }
            }
        };
        let rescale = if cx.flag("dare_rescale_reciprocal") {
            Rescale::By(1.0 / density)
        } else if cx.flag("rescale") {
            Rescale::L1
        } else {
            Rescale::None
        };
        Ok((keep, rescale))
    }
}

/// `input`'s pruner over its flat CPU `delta`.
#[inline(always)]
fn pruner<T: Element>(
    cx: &MergeContext<'_>,
    input: usize,
    keep: Keep,
    delta: &Delta<'_, T>,
) -> Pruner {
    // Rank-based masks over the whole delta, in libtorch.
    let whole = || &cx.inputs[input] - cx.base_tensor();
    match keep {
        Keep::All => Pruner::KeepAll,
        Keep::Largest { density } => Pruner::magnitude(delta, density),
        Keep::Random { density, seed } => Pruner::random(density, seed),
        Keep::Outliers { density, gamma } => {
            Pruner::precomputed(&outlier_mask(&whole(), density, gamma))
        }
        Keep::RankedRandom {
            density,
            epsilon,
            seed,
        } => Pruner::precomputed(&della_mask(&whole(), density, epsilon, seed)),
    }
}

/// Whether the L1 pass keeps the pruned deltas of a tensor of `numel`
/// entries for the merge pass, which then reads them instead of forming and
/// pruning them again: for tensors whose `models` deltas together hold at
/// most [`KEPT_DELTAS_LIMIT`] entries.
fn keeps_pruned_deltas(models: usize, numel: u64) -> bool {
    models as u64 * numel <= KEPT_DELTAS_LIMIT
}

/// 2²⁶ entries: 128 MB of BF16 deltas (a 1B model's MLP matrix with four
/// fine-tunes, a 7B model's attention matrix with two), below the embeddings
/// whose need sets the peak.
const KEPT_DELTAS_LIMIT: u64 = 1 << 26;

/// What the first pass over one delta leaves for the merge pass.
struct Measured<T> {
    /// The factor the kept part is scaled by.
    scale: Option<f64>,
    /// The pruned delta, when the L1 pass kept it.
    pruned: Option<Vec<T>>,
}

/// Each delta's [`Measured`]. The L1 rule measures what each mask keeps, in
/// one pass over all the deltas chunk by chunk, keeping the pruned deltas
/// with `keep_pruned`; without them the merge pass decides again from the
/// pruners as they were (the same decisions: pruners are deterministic in
/// flat order).
#[inline(always)]
fn measure_kept_parts<T: Element>(
    deltas: &[Delta<'_, T>],
    pruners: &[Pruner],
    rescales: &[Rescale],
    keep_pruned: bool,
) -> Vec<Measured<T>> {
    struct Measure<'d, 'a, T> {
        delta: &'d Delta<'a, T>,
        pruner: Pruner,
        before: f64,
        after: f64,
        pruned: Option<Vec<T>>,
    }
    let mut measured: Vec<Measure<'_, '_, T>> = deltas
        .iter()
        .zip(pruners)
        .zip(rescales)
        .filter(|(_, rescale)| matches!(rescale, Rescale::L1))
        .map(|((delta, pruner), _)| Measure {
            delta,
            pruner: pruner.clone(),
            before: 0.0,
            after: 0.0,
            pruned: keep_pruned.then(|| Vec::with_capacity(delta.len())),
        })
        .collect();
    let mut values = [T::Math::ZERO; CHUNK];
    let mut keep = vec![false; CHUNK];
    let n = measured.first().map_or(0, |m| m.delta.len());
    for (start, len) in chunks(n) {
        let values = &mut values[..len];
        for m in measured.iter_mut() {
            m.delta.values(start, values);
            m.pruner.keep(values, start, &mut keep);
            let keep = &keep[..len];
            let (all, kept) = l1_norms(values, keep);
            m.before += all;
            m.after += kept;
            if let Some(pruned) = &mut m.pruned {
                // As `Pruner::prune` drops them: a product with 0 or 1.
                pruned.extend(
                    values
                        .iter()
                        .zip(keep)
                        .map(|(&v, &k)| T::narrow(v * T::Math::indicator(k))),
                );
            }
        }
    }
    let mut measured = measured.into_iter();
    rescales
        .iter()
        .map(|rescale| match rescale {
            Rescale::None => Measured {
                scale: None,
                pruned: None,
            },
            Rescale::By(factor) => Measured {
                scale: Some(*factor),
                pruned: None,
            },
            Rescale::L1 => {
                let m = measured.next().expect("one measure per L1 rescale");
                Measured {
                    scale: l1_scale(m.before, m.after),
                    pruned: m.pruned,
                }
            }
        })
        .collect()
}

/// The L1 rescale factor from Σ|δ| and Σ|kept δ|.
fn l1_scale(before: f64, after: f64) -> Option<f64> {
    (before >= RESCALE_EPS && after >= RESCALE_EPS).then(|| before / after)
}

/// Σ|v| and Σ|v| over the kept entries, in f64 with sixteen accumulators (a
/// fixed order, so the result is deterministic; fewer chains would be
/// latency-bound).
#[inline(always)]
fn l1_norms<M: Real>(values: &[M], keep: &[bool]) -> (f64, f64) {
    const LANES: usize = 16;
    let (mut all, mut kept) = ([0.0f64; LANES], [0.0f64; LANES]);
    let mut add = |v: &[M], k: &[bool]| {
        for lane in 0..v.len() {
            let magnitude = v[lane].abs().to_f64();
            all[lane] += magnitude;
            kept[lane] += magnitude * f64::indicator(k[lane]);
        }
    };
    // Whole groups of fixed length keep the accumulators in registers.
    let (mut v, mut k) = (values.chunks_exact(LANES), keep.chunks_exact(LANES));
    for (v, k) in v.by_ref().zip(k.by_ref()) {
        add(&v[..LANES], &k[..LANES]);
    }
    add(v.remainder(), k.remainder());
    (all.iter().sum(), kept.iter().sum())
}

/// Below this L1 norm a task vector (or its kept part) is not rescaled.
const RESCALE_EPS: f64 = 1e-7;
