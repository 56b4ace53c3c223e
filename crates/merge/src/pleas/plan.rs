//! The plan of a PLeaS merge, from shapes alone (before any data is read):
//! how many units of each group the budget keeps separate, the merged
//! model's widths, and the memory the streamed run needs at its peak.

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_nn::DecoderConfig;
use tch::Kind;

use super::permutation::DecoderShape;
use super::{Matching, Options, Widen};
use crate::{MergeError, Result};

/// What a merge of two models of `shape` will produce and hold.
#[derive(Debug, Clone)]
pub struct PleasPlan {
    /// Model A's config (both models have its shape).
    pub config: DecoderConfig,
    pub shape: DecoderShape,
    pub allocation: Allocation,
    /// Stored parameters of one input.
    pub input_parameters: usize,
}

impl PleasPlan {
    /// The plan for merging two models of `config`'s shape at
    /// `options.budget` (1 to 2 times one model's parameters).
    pub fn new(config: &DecoderConfig, options: &Options) -> Result<Self> {
        let shape = DecoderShape::of(config);
        if !(1.0..=2.0).contains(&options.budget) {
            return Err(MergeError::Permutation(format!(
                "budget {} is outside 1 to 2 (a multiple of one model's parameters)",
                options.budget
            )));
        }
        let input_parameters = config.parameter_count();
        let allocation = allocate(
            config,
            options.widen,
            options.budget * input_parameters as f64,
        );
        Ok(PleasPlan {
            config: config.clone(),
            shape,
            allocation,
            input_parameters,
        })
    }

    /// The merged residual stream's width.
    pub fn hidden(&self) -> usize {
        self.shape.hidden + self.allocation.residual
    }

    /// The merged model's KV heads (each with its query heads).
    pub fn kv_heads(&self) -> usize {
        self.shape.kv_heads + self.allocation.kv_groups
    }

    /// The merged model's query heads.
    pub fn heads(&self) -> usize {
        self.kv_heads() * (self.shape.heads / self.shape.kv_heads)
    }

    /// The merged model's FFN width per layer.
    pub fn ffn(&self) -> Vec<usize> {
        self.shape
            .ffn
            .iter()
            .zip(&self.allocation.ffn)
            .map(|(f, s)| f + s)
            .collect()
    }

    /// The merged model's config: the inputs' with the plan's widths.
    pub fn merged_config(&self) -> DecoderConfig {
        let mut config = self.config.clone();
        config.intermediate_sizes = self.ffn();
        config.hidden_size = self.hidden();
        config.num_attention_heads = self.heads();
        config.num_key_value_heads = self.kv_heads();
        config
    }

    pub fn parameters(&self) -> usize {
        self.merged_config().parameter_count()
    }

    /// Whether the streamed run needs its first pass (the residual stream's
    /// features at every block boundary): to match the residual stream on
    /// activations, or to choose which of its channels stay separate.
    pub fn needs_residual_pass(&self, matching: Matching) -> bool {
        matches!(matching, Matching::Activation(_)) || self.allocation.residual > 0
    }

    /// The peak memory of the run, in bytes, for `tokens` calibration
    /// tokens in batches of `batch_tokens`, by phase (the largest is the
    /// peak). Counted: the two residual streams, one block of each model and
    /// its aligned and folded copies, the layer's cached features (both
    /// models, B's aligned copy), its matching statistics and normal
    /// equations with the solver's copies; at the ends, the embeddings,
    /// heads and the head's equations; weight matching holds both models.
    pub fn memory(&self, options: &Options, tokens: usize, batch_tokens: usize) -> Memory {
        // In f64: a hostile config's sizes must give a huge estimate (and a
        // refusal), not an overflow.
        let s = &self.shape;
        let f32 = 4.0;
        let eq = if options.kind == Kind::Float {
            4.0
        } else {
            8.0
        };
        let size = |x: usize| x as f64;
        let (n, nb) = (size(tokens), size(batch_tokens));
        let (d, dm) = (size(s.hidden), size(self.hidden()));
        let q = size(s.heads) * size(s.head_dim);
        let k = size(s.kv_heads) * size(s.head_dim);
        let qm = size(self.heads()) * size(s.head_dim);
        let km = size(self.kv_heads()) * size(s.head_dim);
        let vocab = size(self.config.vocab_size);
        let streams = 2.0 * n * d * f32;
        let block = |f: f64| d * (2.0 * q + 2.0 * k) + 3.0 * d * f + 2.0 * d;
        let layer = |f: f64, fm: f64| -> f64 {
            // A's block, B's aligned copy, and both folded.
            let weights = 4.0 * block(f) * f32;
            // Per model: attention, FFN and the stream leaving the block; B's
            // attention and FFN again, aligned.
            let features = n * (2.0 * (q + f + d) + q + f) * f32;
            // Matching statistics (F64), freed before the least squares.
            let statistics = (f * f + q * q) * 8.0 * 2.0;
            let fitting = if options.least_squares {
                // One system at a time: XᵀX and XᵀY, the solver's copies of
                // them, and one batch's inputs and targets (F32, converted).
                [(dm, qm + 2.0 * km), (qm, dm), (dm, 2.0 * fm), (fm, dm)]
                    .iter()
                    .map(|&(i, o)| {
                        let held = i * (i + o) * eq;
                        let solve = 2.0 * i * (i + o) * eq;
                        let batch = nb * (i + o) * (f32 + eq) + nb * (2.0 * o + 2.0 * d) * f32;
                        held + solve.max(batch)
                    })
                    .fold(0.0, f64::max)
            } else {
                block(fm) * f32
            };
            weights + features + statistics.max(fitting)
        };
        let layers = s
            .ffn
            .iter()
            .zip(&self.ffn())
            .map(|(&f, &fm)| layer(size(f), size(fm)))
            .fold(0.0, f64::max);
        let widest = size(s.ffn.iter().copied().max().unwrap_or(0));
        let residual_pass = 4.0 * d * d * 8.0 + 2.0 * block(widest) * f32;
        // The embeddings: both models', B's aligned copy, the merged ones.
        let embeddings = vocab * (3.0 * d + dm) * f32;
        // An untied head: both models', B's aligned copy, both folded, the
        // merged one; its equations and the solver's copies; one chunk's
        // logits; B's final stream aligned.
        let head = if s.untied_head {
            let chunk = super::fit::HEAD_CHUNK as f64;
            let weights = vocab * (5.0 * d + dm) * f32;
            let equations = if options.least_squares {
                3.0 * dm * (dm + vocab) * eq + chunk * vocab * (3.0 * f32 + eq) + n * d * f32
            } else {
                0.0
            };
            weights + equations
        } else {
            0.0
        };
        let ends = embeddings.max(head);
        let weight_matching = match options.matching {
            Matching::Weight { .. } => 3.0 * 2.0 * size(self.input_parameters) * f32,
            _ => 0.0,
        };
        // `as` saturates: an estimate past u64 is u64::MAX.
        Memory {
            residual_pass: (streams + residual_pass) as u64,
            layers: (streams + layers) as u64,
            ends: (streams + ends) as u64,
            weight_matching: weight_matching as u64,
        }
    }
}

/// Bytes the streamed run holds at the peak of each phase (both models'
/// residual streams over the calibration tokens included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Memory {
    pub residual_pass: u64,
    /// The widest layer of the second pass.
    pub layers: u64,
    /// Embeddings, final norm and head.
    pub ends: u64,
    /// Both whole models and their working copies (weight matching only).
    pub weight_matching: u64,
}

impl Memory {
    /// The whole run's estimate: the phases, with one block's forward pass
    /// on one batch (`forward` bytes) and the process held throughout.
    pub fn estimate(&self, forward: u64) -> MemoryEstimate {
        MemoryEstimate::new()
            .held("one batch's forward pass", forward)
            .phase("residual pass", self.residual_pass)
            .phase("widest layer", self.layers)
            .phase("ends", self.ends)
            .phase("weight matching", self.weight_matching)
    }
}

/// Parameters stored by a model of `config`'s family and shape at hidden
/// size `hidden`, `kv_heads` KV heads (each with its query heads) and FFN
/// widths `ffn` (every tensor dense, zero blocks included).
pub fn stored_parameters(
    config: &DecoderConfig,
    hidden: usize,
    kv_heads: usize,
    ffn: &[usize],
) -> usize {
    let mut c = config.clone();
    c.num_attention_heads = kv_heads * (config.num_attention_heads / config.num_key_value_heads);
    c.num_key_value_heads = kv_heads;
    c.hidden_size = hidden;
    c.intermediate_sizes = ffn.to_vec();
    c.parameter_count()
}

/// How many units of each group a budget keeps separate from each model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Allocation {
    pub residual: usize,
    /// KV groups (a KV head with its query heads), the same in every layer.
    pub kv_groups: usize,
    pub ffn: Vec<usize>,
}

/// The allocation rule, for a `target` stored parameter count. Attention
/// first: as many KV groups per layer as fit are kept separate (merged heads
/// are what an average of two unrelated models loses most — see the book's PLeaS results).
/// Then the residual stream and every FFN keep the same fraction `r` of
/// their units separate, `r` the largest in [0, 1] that fits (the residual
/// stream's width rounded to a multiple of the head count, as transformers
/// requires). With
/// [`Widen::Ffn`] only the FFNs grow. Within a group the least-alike matched
/// pairs are the separate ones ([`UnitLayout`]).
pub fn allocate(config: &DecoderConfig, widen: Widen, target: f64) -> Allocation {
    let shape = &DecoderShape::of(config);
    let fraction = |units: usize, r: f64| (r * units as f64).round() as usize;
    let count = |residual: usize, kv_groups: usize, r: f64| {
        let ffn: Vec<usize> = shape.ffn.iter().map(|&f| f + fraction(f, r)).collect();
        stored_parameters(
            config,
            shape.hidden + residual,
            shape.kv_heads + kv_groups,
            &ffn,
        ) as f64
    };
    // transformers wants the hidden size a multiple of the head count: the
    // fewest residual channels that make it so with `k` more KV groups. A
    // family whose head size is hidden / heads there needs exactly
    // heads × head_dim channels.
    let heads = |k: usize| (shape.kv_heads + k) * (shape.heads / shape.kv_heads);
    let head_dim_from_hidden = config.architecture.layout.head_dim_from_hidden;
    let least_residual = |k: usize| {
        if head_dim_from_hidden {
            (heads(k) * shape.head_dim).saturating_sub(shape.hidden)
        } else {
            shape.hidden.div_ceil(heads(k)) * heads(k) - shape.hidden
        }
    };
    let kv_groups = match widen {
        Widen::All => (0..=shape.kv_heads)
            .rev()
            .find(|&k| count(least_residual(k), k, 0.0) <= target)
            .unwrap_or(0),
        Widen::Ffn => 0,
    };
    let residual = |r: f64| match widen {
        Widen::All if head_dim_from_hidden => least_residual(kv_groups),
        Widen::All => {
            let step = heads(kv_groups);
            let wanted = shape.hidden + fraction(shape.hidden, r);
            (wanted / step * step)
                .saturating_sub(shape.hidden)
                .max(least_residual(kv_groups))
        }
        Widen::Ffn => 0,
    };
    let fits = |r: f64| count(residual(r), kv_groups, r) <= target;
    let r = if fits(1.0) {
        1.0
    } else {
        let (mut low, mut high) = (0.0, 1.0);
        for _ in 0..50 {
            let mid = (low + high) / 2.0;
            if fits(mid) {
                low = mid;
            } else {
                high = mid;
            }
        }
        low
    };
    Allocation {
        residual: residual(r),
        kv_groups,
        ffn: shape.ffn.iter().map(|&f| fraction(f, r)).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_separates_heads_first_then_the_rest_evenly() {
        let config = DecoderConfig {
            vocab_size: 10,
            hidden_size: 12,
            intermediate_sizes: vec![16, 16],
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: None,
            tie_word_embeddings: true,
            max_position_embeddings: 64,
            bos_token_id: None,
            eos_token_id: None,
            architecture: amalgam_nn::Architecture::llama(),
        };
        let stored = |a: &Allocation| {
            let ffn: Vec<usize> = config
                .intermediate_sizes
                .iter()
                .zip(&a.ffn)
                .map(|(f, s)| f + s)
                .collect();
            stored_parameters(&config, 12 + a.residual, 2 + a.kv_groups, &ffn) as f64
        };
        let one = stored(&allocate(&config, Widen::All, 0.0));
        // Embeddings 120 + final norm 12 + 2 layers × (norms 24 + q 192 + k, v 192 + o 192 + FFN 576).
        assert_eq!(one, 2484.0);
        let none = allocate(&config, Widen::All, one);
        assert_eq!(
            (none.residual, none.kv_groups, none.ffn.clone()),
            (0, 0, vec![0, 0])
        );
        // One KV group in each layer costs 2 × (96 + 48 + 48 + 96) = 576 (1.23x).
        for (widen, budget) in [(Widen::All, 1.3), (Widen::All, 1.8), (Widen::Ffn, 1.3)] {
            let a = allocate(&config, widen, budget * one);
            assert!(stored(&a) <= budget * one, "{widen:?} {budget}: {a:?}");
            // A larger budget buys more.
            let more = allocate(&config, widen, 1.2 * budget * one);
            assert!(
                stored(&more) > stored(&a),
                "{widen:?} {budget}: {a:?} {more:?}"
            );
            if widen == Widen::All {
                assert_eq!((12 + a.residual) % (2 * (2 + a.kv_groups)), 0, "{a:?}");
            }
            assert_eq!(a.kv_groups > 0, widen == Widen::All, "{a:?}");
        }
        // Keeping every FFN unit separate costs less than 2x.
        assert_eq!(allocate(&config, Widen::Ffn, 2.0 * one).ffn, vec![16, 16]);
    }
}
