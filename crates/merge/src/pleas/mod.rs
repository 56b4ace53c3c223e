//! PLeaS (permutations and least squares): merging two Llama-family models
//! that do not share a base, into a model of a chosen size.
//!
//! 1. **Features** — both models run on calibration batches through a small
//!    interface ([`Activations`]); per site the cross statistics are kept.
//! 2. **Matching** — one permutation per group of [`permutation::llama`] lines
//!    B's units up with A's ([`matching`]: activations or weights).
//! 3. **Partial matching** — a parameter budget between 1× and 2× one model
//!    buys units kept separately from each model instead of merged
//!    ([`allocate`]: KV groups first, then the residual stream and every FFN
//!    by one common fraction; the least-alike matched pairs of a group are
//!    its separate ones). A group keeping `s` of its `n` units separate is
//!    `n + s` wide, in blocks `[merged | A-only | B-only]` ([`UnitLayout`]).
//! 4. **Least squares** — every linear layer of the merged model is solved in
//!    closed form ([`least_squares`]) from the two models' own features:
//!    inputs and targets in the block layouts (merged units averaged,
//!    separate ones each model's own), A-only outputs never reading B-only
//!    inputs. The layers' problems are independent, as in PLeaS.
//!
//! How the parts that are not plain linear layers are treated:
//! - **Norm scales** are folded into the weights that read the norm (exact:
//!   `W·diag(γ)`), the merged model's layer norms get scale 1, and the least
//!   squares see each model's normalised stream `x / rms(x)`. A wider
//!   residual stream is normalised over its whole width by the merged model;
//!   with separate channels that approximates each model's own statistics
//!   when the two streams' scales agree, and the least squares absorb the rest.
//! - The **residual stream** is one permutation for the whole network. The
//!   embeddings and every writer into it (`o_proj`, `down_proj`) are fitted
//!   to the two models' writes in its layout (merged channels: the average),
//!   so the merged stream tracks both streams. An untied head is fitted the
//!   same way (final norm folded in); a tied head reads the embeddings, and
//!   the final norm is the aligned average with separate channels' scales
//!   halved, so the logits are the average of the two models'.
//! - **Attention heads** move as whole heads (KV groups with their query
//!   heads); a separate KV group keeps its query heads separate too. Counts
//!   stay uniform across layers, as the config requires.

pub mod least_squares;
pub mod matching;
pub mod permutation;
mod run;
pub mod statistics;

pub use run::Pleas;

use std::collections::BTreeMap;
use std::time::Instant;

use amalgam_checkpoint::arch::{classify, Role, TensorName};
use tch::{Kind, Tensor};

use crate::{MergeError, Result};
use least_squares::NormalEquations;
use matching::{activation_matching, group_index, matched_scores, weight_matching, SiteStats};
use permutation::{apply, llama, DecoderShape, PermutationGroup};
use statistics::{block_diagonal_sums, CrossStats, Metric};

/// One model's features on a batch, flattened over tokens: `[tokens, width]`.
pub struct Taps {
    /// The residual stream at each block boundary (`layers + 1`, the last
    /// before the final norm).
    pub residual: Vec<Tensor>,
    /// Attention heads' outputs before `o_proj`, heads side by side, per layer.
    pub attention: Vec<Tensor>,
    /// act(gate)·up per layer.
    pub ffn: Vec<Tensor>,
}

/// A model PLeaS can read features from.
pub trait Activations {
    /// The features of a batch of token ids `[batch, seq]`.
    fn taps(&self, ids: &Tensor) -> Result<Taps>;
}

/// How B's units are lined up with A's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Matching {
    Activation(Metric),
    /// Git Re-Basin's weight matching (data-free), seeded sweep order.
    Weight {
        seed: u64,
    },
    /// No alignment (naive merging; a baseline).
    None,
}

/// Which permutation groups may keep units separate (be wider than one model's).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Widen {
    /// The residual stream and every FFN.
    All,
    /// Only the FFNs (the residual stream stays one model's width).
    Ffn,
}

#[derive(Debug, Clone)]
pub struct Options {
    pub matching: Matching,
    /// Target parameter count as a multiple of one input's, 1 to 2.
    pub budget: f64,
    /// Ridge, relative to the mean diagonal of each layer's XᵀX.
    pub ridge: f64,
    /// F32 or F64 normal equations.
    pub kind: Kind,
    /// Which groups a budget above 1 widens.
    pub widen: Widen,
    /// Fit the layers by least squares; otherwise average the aligned
    /// weights (PLeaS's initial model; with `budget: 1`, permute-then-average).
    pub least_squares: bool,
}

/// Seconds spent in each phase.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    pub features: f64,
    pub matching: f64,
    pub least_squares: f64,
}

/// The merged model.
pub struct Merged {
    pub tensors: BTreeMap<String, Tensor>,
    /// The residual stream's width: merged + A-only + B-only channels.
    pub hidden: usize,
    /// KV heads (each with its query heads), the same count in every layer.
    pub kv_heads: usize,
    /// FFN width per layer: merged + A-only + B-only units.
    pub ffn_widths: Vec<usize>,
    /// Residual channels kept separately from each model.
    pub separate_residual: usize,
    /// FFN units kept separately from each model, per layer.
    pub separate_ffn: Vec<usize>,
    pub parameters: usize,
    /// Parameters as a multiple of model A's.
    pub ratio: f64,
    pub timings: Timings,
}

/// A model to merge: its tensors (F32, Hugging Face names) and features.
pub struct Model<'a> {
    pub tensors: &'a BTreeMap<String, Tensor>,
    pub activations: &'a dyn Activations,
}

/// Merges `a` and `b` (same shape) with PLeaS on `batches` of calibration ids.
pub fn merge(
    shape: &DecoderShape,
    a: Model<'_>,
    b: Model<'_>,
    batches: &[Tensor],
    options: &Options,
    progress: &dyn Fn(),
) -> Result<Merged> {
    check_same_shapes(a.tensors, b.tensors)?;
    if !(1.0..=2.0).contains(&options.budget) {
        return Err(MergeError::Permutation(format!(
            "budget {} is outside 1 to 2 (a multiple of one model's parameters)",
            options.budget
        )));
    }
    let groups = llama(shape);
    let mut timings = Timings::default();
    let layers = shape.ffn.len();

    // 1. Feature statistics (for matching, and to rank matched pairs).
    let mut stats: Option<SiteStats> = None;
    for ids in batches {
        let started = Instant::now();
        let (ta, tb) = (a.activations.taps(ids)?, b.activations.taps(ids)?);
        timings.features += started.elapsed().as_secs_f64();
        let started = Instant::now();
        match &mut stats {
            None => {
                let sites = |x: &[Tensor], y: &[Tensor]| {
                    x.iter()
                        .zip(y)
                        .map(|(x, y)| CrossStats::new(x, y))
                        .collect()
                };
                stats = Some(SiteStats {
                    residual: sites(&ta.residual, &tb.residual),
                    attention: sites(&ta.attention, &tb.attention),
                    ffn: sites(&ta.ffn, &tb.ffn),
                });
            }
            Some(s) => {
                let add = |s: &mut [CrossStats], x: &[Tensor], y: &[Tensor]| {
                    s.iter_mut()
                        .zip(x.iter().zip(y))
                        .for_each(|(s, (x, y))| s.add(x, y))
                };
                add(&mut s.residual, &ta.residual, &tb.residual);
                add(&mut s.attention, &ta.attention, &tb.attention);
                add(&mut s.ffn, &ta.ffn, &tb.ffn);
            }
        }
        timings.matching += started.elapsed().as_secs_f64();
        progress();
    }
    let stats = stats.ok_or_else(|| MergeError::Permutation("no calibration batches".into()))?;

    // 2. Matching.
    let started = Instant::now();
    let perms = match options.matching {
        Matching::Activation(metric) => {
            activation_matching(&groups, &stats, metric, shape.head_dim)?
        }
        Matching::Weight { seed } => weight_matching(&groups, a.tensors, b.tensors, seed, 100)?,
        Matching::None => groups.iter().map(|g| (0..g.units).collect()).collect(),
    };
    let mut aligned = shallow_copy(b.tensors);
    apply(&mut aligned, &groups, &perms)?;

    // 3. Partial matching: which units stay separate.
    let matched = |g: usize, scores: Tensor| matched_scores(&scores, &perms[g]);
    let boundaries = stats.residual.len() as f64;
    let residual_scores = matched(
        group_index(&groups, "residual")?,
        stats
            .residual
            .iter()
            .map(|s| s.scores(Metric::Correlation))
            .reduce(|x, y| x + y)
            .expect("at least one boundary")
            / boundaries,
    );
    let ffn_scores: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            let g = group_index(&groups, &format!("layers.{l}.ffn"))?;
            Ok(matched(g, stats.ffn[l].scores(Metric::Correlation)))
        })
        .collect::<Result<_>>()?;
    let index = FeatureIndex::new(&groups, &perms, shape)?;
    let per_group = shape.heads / shape.kv_heads;
    // A KV group's score: the mean over its matched query heads' features.
    let kv_scores: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            let heads = block_diagonal_sums(
                &stats.attention[l].scores(Metric::Correlation),
                shape.head_dim as i64,
            );
            let matched = matched_scores(&heads, &index.heads[l]);
            matched
                .chunks(per_group)
                .map(|c| c.iter().sum::<f64>() / (per_group * shape.head_dim) as f64)
                .collect()
        })
        .collect();
    let vocab = get(a.tensors, "model.embed_tokens.weight")?.size()[0] as usize;
    let model_parameters: usize = a.tensors.values().map(|t| t.numel()).sum();
    let allocation = allocate(
        shape,
        vocab,
        options.widen,
        options.budget * model_parameters as f64,
    );
    let layouts = Layouts {
        residual: UnitLayout::new(allocation.residual, &residual_scores),
        kv_groups: kv_scores
            .iter()
            .map(|s| UnitLayout::new(allocation.kv_groups, s))
            .collect(),
        ffn: ffn_scores
            .iter()
            .zip(&allocation.ffn)
            .map(|(s, &count)| UnitLayout::new(count, s))
            .collect(),
    };
    timings.matching += started.elapsed().as_secs_f64();

    // 4. The merged weights.
    let tensors = if options.least_squares {
        fit_layers(
            shape,
            &a,
            &b,
            &aligned,
            &index,
            &layouts,
            batches,
            options,
            &mut timings,
            progress,
        )?
    } else {
        average_layers(shape, a.tensors, &aligned, &layouts)
    };
    let parameters: usize = tensors.values().map(|t| t.numel()).sum();
    Ok(Merged {
        hidden: layouts.residual.width(),
        kv_heads: layouts
            .kv_groups
            .first()
            .map_or(shape.kv_heads, UnitLayout::width),
        ffn_widths: layouts.ffn.iter().map(UnitLayout::width).collect(),
        separate_residual: layouts.residual.separate.len(),
        separate_ffn: layouts.ffn.iter().map(|l| l.separate.len()).collect(),
        parameters,
        ratio: parameters as f64 / model_parameters as f64,
        tensors,
        timings,
    })
}

/// Parameters stored by a Llama of this shape at hidden size `hidden`,
/// `kv_heads` KV heads (each with its query heads) and FFN widths `ffn`
/// (every tensor dense, zero blocks included).
pub fn stored_parameters(
    shape: &DecoderShape,
    vocab: usize,
    hidden: usize,
    kv_heads: usize,
    ffn: &[usize],
) -> usize {
    let kv = kv_heads * shape.head_dim;
    let heads = kv * (shape.heads / shape.kv_heads);
    let embeddings = vocab * hidden * if shape.untied_head { 2 } else { 1 };
    let layers: usize = ffn
        .iter()
        .map(|&f| 2 * hidden + (2 * heads + 2 * kv) * hidden + 3 * f * hidden)
        .sum();
    embeddings + hidden + layers
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
/// are what an average of two unrelated models loses most — see the README).
/// Then the residual stream and every FFN keep the same fraction `r` of
/// their units separate, `r` the largest in [0, 1] that fits (the residual
/// stream's width rounded to a multiple of the head count, as transformers
/// requires). With
/// [`Widen::Ffn`] only the FFNs grow. Within a group the least-alike matched
/// pairs are the separate ones ([`UnitLayout`]).
pub fn allocate(shape: &DecoderShape, vocab: usize, widen: Widen, target: f64) -> Allocation {
    let fraction = |units: usize, r: f64| (r * units as f64).round() as usize;
    let count = |residual: usize, kv_groups: usize, r: f64| {
        let ffn: Vec<usize> = shape.ffn.iter().map(|&f| f + fraction(f, r)).collect();
        stored_parameters(
            shape,
            vocab,
            shape.hidden + residual,
            shape.kv_heads + kv_groups,
            &ffn,
        ) as f64
    };
    // transformers wants the hidden size a multiple of the head count: the
    // fewest residual channels that make it so with `k` more KV groups.
    let heads = |k: usize| (shape.kv_heads + k) * (shape.heads / shape.kv_heads);
    let least_residual = |k: usize| shape.hidden.div_ceil(heads(k)) * heads(k) - shape.hidden;
    let kv_groups = match widen {
        Widen::All => (0..=shape.kv_heads)
            .rev()
            .find(|&k| count(least_residual(k), k, 0.0) <= target)
            .unwrap_or(0),
        Widen::Ffn => 0,
    };
    let residual = |r: f64| match widen {
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

/// One group's units in the merged model, in blocks `[merged | A-only |
/// B-only]`: the merged ones (A's unit indices, which after alignment are
/// also B's), then the separate ones taken once from A and once from B.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitLayout {
    merged: Vec<i64>,
    separate: Vec<i64>,
}

impl UnitLayout {
    /// Keeps the `count` matched pairs with the lowest scores separate
    /// (ties: lower unit first); the rest are merged.
    pub fn new(count: usize, scores: &[f64]) -> Self {
        let mut order: Vec<usize> = (0..scores.len()).collect();
        order.sort_by(|&x, &y| scores[x].total_cmp(&scores[y]).then(x.cmp(&y)));
        let mut separate: Vec<i64> = order[..count].iter().map(|&u| u as i64).collect();
        let mut merged: Vec<i64> = order[count..].iter().map(|&u| u as i64).collect();
        separate.sort_unstable();
        merged.sort_unstable();
        UnitLayout { merged, separate }
    }

    /// Every unit merged.
    fn merged_only(units: usize) -> Self {
        UnitLayout {
            merged: (0..units as i64).collect(),
            separate: vec![],
        }
    }

    fn width(&self) -> usize {
        self.merged.len() + 2 * self.separate.len()
    }

    /// The same layout over entries when each unit spans `block` consecutive ones.
    fn expand(&self, block: usize) -> UnitLayout {
        let entries = |units: &[i64]| {
            units
                .iter()
                .flat_map(|&u| u * block as i64..(u + 1) * block as i64)
                .collect()
        };
        UnitLayout {
            merged: entries(&self.merged),
            separate: entries(&self.separate),
        }
    }

    fn blocks(&self) -> least_squares::Blocks {
        let s = self.separate.len();
        [self.merged.len(), s, s]
    }

    /// `[merged average | A's separate | B's separate]` along `dim` of
    /// per-unit data of both models (features, or a weight's unit axis),
    /// the separate parts scaled by `separate_scale`.
    fn combine(&self, a: &Tensor, b: &Tensor, dim: i64, separate_scale: f64) -> Tensor {
        let (m, s) = (&self.merged, &self.separate);
        Tensor::cat(
            &[
                (pick(a, dim, m) + pick(b, dim, m)) * 0.5,
                pick(a, dim, s) * separate_scale,
                pick(b, dim, s) * separate_scale,
            ],
            dim,
        )
    }
}

fn pick(t: &Tensor, dim: i64, units: &[i64]) -> Tensor {
    t.index_select(dim, &Tensor::from_slice(units).to_device(t.device()))
}

/// A weight `[out, in]` of PLeaS's initial model in block layout: merged
/// outputs average both models' (each reading its own separate inputs at
/// half weight); separate outputs are each model's own, reading merged
/// inputs and their own model's separate inputs, never the other's.
fn combine_weight(out: &UnitLayout, input: &UnitLayout, a: &Tensor, b: &Tensor) -> Tensor {
    let rows = |w: &Tensor, units: &[i64]| pick(w, 0, units);
    let (a_merged, b_merged) = (rows(a, &out.merged), rows(b, &out.merged));
    let merged = input.combine(&a_merged, &b_merged, 1, 0.5);
    let own = |w: &Tensor, first: bool| {
        let r = rows(w, &out.separate);
        let zeros = pick(&r, 1, &input.separate).zeros_like();
        let (m, s) = (pick(&r, 1, &input.merged), pick(&r, 1, &input.separate));
        if first {
            Tensor::cat(&[m, s, zeros], 1)
        } else {
            Tensor::cat(&[m, zeros, s], 1)
        }
    };
    Tensor::cat(&[merged, own(a, true), own(b, false)], 0)
}

/// The layouts of the widened groups.
struct Layouts {
    residual: UnitLayout,
    /// Per layer, in units of KV groups (a KV head and its query heads).
    kv_groups: Vec<UnitLayout>,
    ffn: Vec<UnitLayout>,
}

/// Index vectors that put B's features into the aligned order.
struct FeatureIndex {
    residual: Tensor,
    ffn: Vec<Tensor>,
    /// Per layer, every head's features (heads × head_dim entries).
    attention: Vec<Tensor>,
    /// Per layer, B's head at each aligned head position.
    heads: Vec<Vec<usize>>,
}

impl FeatureIndex {
    fn new(
        groups: &[PermutationGroup],
        perms: &[Vec<usize>],
        shape: &DecoderShape,
    ) -> Result<Self> {
        let index =
            |v: &[usize]| Tensor::from_slice(&v.iter().map(|&u| u as i64).collect::<Vec<_>>());
        let per_group = shape.heads / shape.kv_heads;
        let mut ffn = vec![];
        let mut attention = vec![];
        let mut heads = vec![];
        for l in 0..shape.ffn.len() {
            ffn.push(index(
                &perms[group_index(groups, &format!("layers.{l}.ffn"))?],
            ));
            let kv = &perms[group_index(groups, &format!("layers.{l}.kv_heads"))?];
            let mut order = vec![];
            for (position, &source) in kv.iter().enumerate() {
                let q =
                    &perms[group_index(groups, &format!("layers.{l}.group{position}.q_heads"))?];
                order.extend(q.iter().map(|&head| source * per_group + head));
            }
            let entries: Vec<usize> = order
                .iter()
                .flat_map(|&h| h * shape.head_dim..(h + 1) * shape.head_dim)
                .collect();
            attention.push(index(&entries));
            heads.push(order);
        }
        Ok(FeatureIndex {
            residual: index(&perms[group_index(groups, "residual")?]),
            ffn,
            attention,
            heads,
        })
    }

    fn align(&self, taps: Taps) -> Taps {
        let by = |t: &Tensor, i: &Tensor| t.index_select(1, &i.to_device(t.device()));
        Taps {
            residual: taps
                .residual
                .iter()
                .map(|t| by(t, &self.residual))
                .collect(),
            attention: taps
                .attention
                .iter()
                .zip(&self.attention)
                .map(|(t, i)| by(t, i))
                .collect(),
            ffn: taps
                .ffn
                .iter()
                .zip(&self.ffn)
                .map(|(t, i)| by(t, i))
                .collect(),
        }
    }
}

fn layer(l: usize, part: &str) -> String {
    format!("model.layers.{l}.{part}.weight")
}

fn get<'t>(tensors: &'t BTreeMap<String, Tensor>, name: &str) -> Result<&'t Tensor> {
    tensors.get(name).ok_or_else(|| MergeError::Tensor {
        tensor: name.into(),
        message: "missing from the model".into(),
    })
}

fn shallow_copy(tensors: &BTreeMap<String, Tensor>) -> BTreeMap<String, Tensor> {
    tensors
        .iter()
        .map(|(n, t)| (n.clone(), t.shallow_clone()))
        .collect()
}

fn check_same_shapes(a: &BTreeMap<String, Tensor>, b: &BTreeMap<String, Tensor>) -> Result<()> {
    for (name, t) in a {
        match b.get(name) {
            Some(u) if u.size() == t.size() => {}
            Some(u) => {
                return Err(MergeError::Tensor {
                    tensor: name.clone(),
                    message: format!(
                        "shape {:?} in the first model, {:?} in the second (PLeaS merges models of one shape)",
                        t.size(),
                        u.size()
                    ),
                })
            }
            None => {
                return Err(MergeError::Tensor {
                    tensor: name.clone(),
                    message: "in the first model only".into(),
                })
            }
        }
    }
    match b.keys().find(|n| !a.contains_key(*n)) {
        Some(name) => Err(MergeError::Tensor {
            tensor: name.clone(),
            message: "in the second model only".into(),
        }),
        None => Ok(()),
    }
}

/// PLeaS's initial model: aligned weights averaged in block layout
/// ([`combine_weight`]); each model's separate units copied.
fn average_layers(
    shape: &DecoderShape,
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    layouts: &Layouts,
) -> BTreeMap<String, Tensor> {
    let residual = &layouts.residual;
    let per_group = shape.heads / shape.kv_heads;
    let mut out = BTreeMap::new();
    for (name, ta) in a {
        let tb = &b[name];
        let TensorName { layer, role } = classify(name);
        // The layouts of a block's heads and FFN (layer 0's outside blocks:
        // only block tensors use them).
        let l = layer.unwrap_or(0);
        let ffn = &layouts.ffn[l];
        let queries = layouts.kv_groups[l].expand(per_group * shape.head_dim);
        let keys = layouts.kv_groups[l].expand(shape.head_dim);
        let merged = match role {
            Role::AttnQ => combine_weight(&queries, residual, ta, tb),
            Role::AttnK | Role::AttnV => combine_weight(&keys, residual, ta, tb),
            Role::AttnO => combine_weight(residual, &queries, ta, tb),
            Role::MlpGate | Role::MlpUp => combine_weight(ffn, residual, ta, tb),
            Role::MlpDown => combine_weight(residual, ffn, ta, tb),
            Role::LmHead => combine_weight(
                &UnitLayout::merged_only(ta.size()[0] as usize),
                residual,
                ta,
                tb,
            ),
            // Embeddings write each model's own stream.
            Role::Embedding => residual.combine(ta, tb, 1, 1.0),
            // The norms: one scale per residual channel.
            Role::InputNorm | Role::PostAttentionNorm | Role::FinalNorm | Role::Other => {
                residual.combine(ta, tb, 0, 1.0)
            }
        };
        out.insert(name.clone(), merged);
    }
    out
}

/// x / rms(x) over the last dimension (RMSNorm without its scale).
fn normalised(x: &Tensor, eps: f64) -> Tensor {
    x * (x.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt()
}

/// The least-squares step: every linear layer fitted on both models' features.
///
/// Inputs are the two models' own (normalised) inputs in the input's layout
/// — merged units averaged, separate ones each model's own — and targets
/// each model's own outputs in the output's layout, as in PLeaS. (Normalising
/// the combined stream instead, as the merged model literally does, was
/// measured: worse at 1×, a little better at 2× — README.)
#[allow(clippy::too_many_arguments)]
fn fit_layers(
    shape: &DecoderShape,
    a: &Model<'_>,
    b: &Model<'_>,
    aligned: &BTreeMap<String, Tensor>,
    index: &FeatureIndex,
    layouts: &Layouts,
    batches: &[Tensor],
    options: &Options,
    timings: &mut Timings,
    progress: &dyn Fn(),
) -> Result<BTreeMap<String, Tensor>> {
    let eps = shape.rms_norm_eps;
    let residual = &layouts.residual;
    let d = residual.width();
    let per_group = shape.heads / shape.kv_heads;
    let device = tch::Device::Cpu;
    let models = [a.tensors, aligned];
    // Norm scales folded into the readers: W·diag(γ).
    let folded = |m: &BTreeMap<String, Tensor>, weight: &str, norm: &str| -> Result<Tensor> {
        Ok(get(m, weight)? * get(m, norm)?.unsqueeze(0))
    };
    let equations =
        |inputs: usize, outputs: usize| NormalEquations::new(inputs, outputs, options.kind, device);
    // q, k and v read the same inputs (one XᵀX), as do gate and up.
    struct Layer {
        qkv: NormalEquations,
        o: NormalEquations,
        gate_up: NormalEquations,
        down: NormalEquations,
    }
    // Per layer: query heads and key/value heads laid out by KV group.
    let heads: Vec<(UnitLayout, UnitLayout)> = layouts
        .kv_groups
        .iter()
        .map(|g| {
            (
                g.expand(per_group * shape.head_dim),
                g.expand(shape.head_dim),
            )
        })
        .collect();
    let mut layers: Vec<Layer> = layouts
        .ffn
        .iter()
        .zip(&heads)
        .map(|(ffn, (queries, keys))| Layer {
            qkv: equations(d, queries.width() + 2 * keys.width()),
            o: equations(queries.width(), d),
            gate_up: equations(d, 2 * ffn.width()),
            down: equations(ffn.width(), d),
        })
        .collect();
    let vocab = get(a.tensors, "model.embed_tokens.weight")?.size()[0] as usize;
    let mut head = shape.untied_head.then(|| equations(d, vocab));
    // Per model: readers with their norms folded in, and the writers.
    let mut weights = vec![];
    for m in models {
        let mut per_layer = vec![];
        for l in 0..shape.ffn.len() {
            let norm1 = layer(l, "input_layernorm");
            let norm2 = layer(l, "post_attention_layernorm");
            per_layer.push([
                folded(m, &layer(l, "self_attn.q_proj"), &norm1)?,
                folded(m, &layer(l, "self_attn.k_proj"), &norm1)?,
                folded(m, &layer(l, "self_attn.v_proj"), &norm1)?,
                get(m, &layer(l, "self_attn.o_proj"))?.shallow_clone(),
                folded(m, &layer(l, "mlp.gate_proj"), &norm2)?,
                folded(m, &layer(l, "mlp.up_proj"), &norm2)?,
                get(m, &layer(l, "mlp.down_proj"))?.shallow_clone(),
            ]);
        }
        let head = if shape.untied_head {
            Some(folded(m, "lm_head.weight", "model.norm.weight")?)
        } else {
            None
        };
        weights.push((per_layer, head));
    }
    for ids in batches {
        let started = Instant::now();
        let ta = a.activations.taps(ids)?;
        let tb = index.align(b.activations.taps(ids)?);
        timings.features += started.elapsed().as_secs_f64();
        let started = Instant::now();
        let taps = [&ta, &tb];
        let mean = |f: &dyn Fn(usize) -> Tensor| (f(0) + f(1)) * 0.5;
        // Both models' normalised streams in the residual layout.
        let merged_input = |x: &dyn Fn(usize) -> Tensor| {
            residual.combine(&normalised(&x(0), eps), &normalised(&x(1), eps), 1, 1.0)
        };
        for (l, eq) in layers.iter_mut().enumerate() {
            let ffn = &layouts.ffn[l];
            let (queries, keys) = &heads[l];
            let w = |m: usize, i: usize| &weights[m].0[l][i];
            let stream = |m: usize| taps[m].residual[l].shallow_clone();
            let x1 = merged_input(&stream);
            let n1 = [
                normalised(&taps[0].residual[l], eps),
                normalised(&taps[1].residual[l], eps),
            ];
            let project = |i: usize, layout: &UnitLayout| {
                let (ya, yb) = (n1[0].matmul(&w(0, i).tr()), n1[1].matmul(&w(1, i).tr()));
                layout.combine(&ya, &yb, 1, 1.0)
            };
            let qkv = [project(0, queries), project(1, keys), project(2, keys)];
            eq.qkv.add(&x1, &Tensor::cat(&qkv, 1));
            let attended = |m: usize| &taps[m].attention[l];
            let write = |m: usize| attended(m).matmul(&w(m, 3).tr());
            eq.o.add(
                &queries.combine(attended(0), attended(1), 1, 1.0),
                &residual.combine(&write(0), &write(1), 1, 1.0),
            );
            let mid = |m: usize| &taps[m].residual[l] + write(m);
            let x2 = merged_input(&mid);
            let n2 = [normalised(&mid(0), eps), normalised(&mid(1), eps)];
            let pre = |i: usize| {
                let (ya, yb) = (n2[0].matmul(&w(0, i).tr()), n2[1].matmul(&w(1, i).tr()));
                ffn.combine(&ya, &yb, 1, 1.0)
            };
            eq.gate_up.add(&x2, &Tensor::cat(&[pre(4), pre(5)], 1));
            let hidden = |m: usize| &taps[m].ffn[l];
            let down = |m: usize| hidden(m).matmul(&w(m, 6).tr());
            eq.down.add(
                &ffn.combine(hidden(0), hidden(1), 1, 1.0),
                &residual.combine(&down(0), &down(1), 1, 1.0),
            );
        }
        if let Some(head) = &mut head {
            let last = shape.ffn.len();
            let stream = |m: usize| taps[m].residual[last].shallow_clone();
            let logits = |m: usize| {
                normalised(&taps[m].residual[last], eps)
                    .matmul(&weights[m].1.as_ref().expect("untied").tr())
            };
            head.add(&merged_input(&stream), &mean(&logits));
        }
        timings.least_squares += started.elapsed().as_secs_f64();
        progress();
    }

    let started = Instant::now();
    let merged_only = |n: usize| [n, 0, 0];
    let residual_blocks = residual.blocks();
    let mut out = BTreeMap::new();
    let both = |name: &str| -> Result<(&Tensor, &Tensor)> {
        Ok((get(a.tensors, name)?, get(aligned, name)?))
    };
    let (ea, eb) = both("model.embed_tokens.weight")?;
    out.insert(
        "model.embed_tokens.weight".to_string(),
        residual.combine(ea, eb, 1, 1.0),
    );
    let ones = || Tensor::ones([d as i64], (Kind::Float, device));
    for (l, eq) in layers.iter().enumerate() {
        let (queries, keys) = (heads[l].0.blocks(), heads[l].1.blocks());
        let (q_width, k_width) = (heads[l].0.width(), heads[l].1.width());
        for (part, first, outputs) in [
            ("self_attn.q_proj", 0, queries),
            ("self_attn.k_proj", q_width, keys),
            ("self_attn.v_proj", q_width + k_width, keys),
        ] {
            out.insert(
                layer(l, part),
                eq.qkv
                    .solve_columns(residual_blocks, first, outputs, options.ridge)?,
            );
        }
        out.insert(
            layer(l, "self_attn.o_proj"),
            eq.o.solve(queries, residual_blocks, options.ridge)?,
        );
        let ffn = layouts.ffn[l].blocks();
        out.insert(
            layer(l, "mlp.gate_proj"),
            eq.gate_up
                .solve_columns(residual_blocks, 0, ffn, options.ridge)?,
        );
        out.insert(
            layer(l, "mlp.up_proj"),
            eq.gate_up.solve_columns(
                residual_blocks,
                layouts.ffn[l].width(),
                ffn,
                options.ridge,
            )?,
        );
        out.insert(
            layer(l, "mlp.down_proj"),
            eq.down.solve(ffn, residual_blocks, options.ridge)?,
        );
        out.insert(layer(l, "input_layernorm"), ones());
        out.insert(layer(l, "post_attention_layernorm"), ones());
    }
    match head {
        Some(head) => {
            out.insert(
                "lm_head.weight".into(),
                head.solve(residual_blocks, merged_only(vocab), options.ridge)?,
            );
            out.insert("model.norm.weight".into(), ones());
        }
        None => {
            // The tied head reads each model's separate channels at full
            // weight; halving their scale makes the logits the average.
            let (ga, gb) = both("model.norm.weight")?;
            out.insert("model.norm.weight".into(), residual.combine(ga, gb, 0, 0.5));
        }
    }
    timings.least_squares += started.elapsed().as_secs_f64();
    Ok(out.into_iter().map(|(n, t)| (n, t.contiguous())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_keep_the_least_alike_pairs_separate() {
        let layout = UnitLayout::new(2, &[0.9, 0.1, 0.5, 0.1]);
        assert_eq!(layout.merged, vec![0, 2]);
        assert_eq!(layout.separate, vec![1, 3]);
        assert_eq!(layout.width(), 6);
        let a = Tensor::from_slice(&[1.0f32, 2.0, 3.0, 4.0]);
        let b = Tensor::from_slice(&[5.0f32, 6.0, 7.0, 8.0]);
        let combined = layout.combine(&a, &b, 0, 0.5);
        let expected = Tensor::from_slice(&[3.0f32, 5.0, 1.0, 2.0, 3.0, 4.0]);
        assert!(combined.equal(&expected));
        // A weight: A-only rows never read B-only columns.
        let (wa, wb) = (
            Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)),
            Tensor::ones([4, 4], (Kind::Float, tch::Device::Cpu)) * 3.0,
        );
        let w = combine_weight(&layout, &layout, &wa, &wb);
        assert_eq!(w.size(), [6, 6]);
        assert_eq!(
            w.narrow(0, 2, 2)
                .narrow(1, 4, 2)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            w.narrow(0, 4, 2)
                .narrow(1, 2, 2)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(w.double_value(&[0, 0]), 2.0);
        assert_eq!(w.double_value(&[0, 2]), 0.5);
        assert_eq!(w.double_value(&[5, 5]), 3.0);
    }

    #[test]
    fn allocation_separates_heads_first_then_the_rest_evenly() {
        let shape = DecoderShape {
            hidden: 12,
            heads: 4,
            kv_heads: 2,
            head_dim: 4,
            ffn: vec![16, 16],
            untied_head: false,
            rms_norm_eps: 1e-5,
        };
        let stored = |a: &Allocation| {
            let ffn: Vec<usize> = shape.ffn.iter().zip(&a.ffn).map(|(f, s)| f + s).collect();
            stored_parameters(&shape, 10, 12 + a.residual, 2 + a.kv_groups, &ffn) as f64
        };
        let one = stored(&allocate(&shape, 10, Widen::All, 0.0));
        // Embeddings 120 + final norm 12 + 2 layers × (norms 24 + q 192 + k, v 192 + o 192 + FFN 576).
        assert_eq!(one, 2484.0);
        let none = allocate(&shape, 10, Widen::All, one);
        assert_eq!(
            (none.residual, none.kv_groups, none.ffn.clone()),
            (0, 0, vec![0, 0])
        );
        // One KV group in each layer costs 2 × (96 + 48 + 48 + 96) = 576 (1.23x).
        for (widen, budget) in [(Widen::All, 1.3), (Widen::All, 1.8), (Widen::Ffn, 1.3)] {
            let a = allocate(&shape, 10, widen, budget * one);
            assert!(stored(&a) <= budget * one, "{widen:?} {budget}: {a:?}");
            // A larger budget buys more.
            let more = allocate(&shape, 10, widen, 1.2 * budget * one);
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
        assert_eq!(
            allocate(&shape, 10, Widen::Ffn, 2.0 * one).ffn,
            vec![16, 16]
        );
    }
}
