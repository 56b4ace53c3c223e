//! PLeaS (permutations and least squares): merging two Llama-family models
//! that do not share a base, into a model of a chosen size.
//!
//! 1. **Features** — both models run on calibration batches through a small
//!    interface ([`Activations`]); per site the cross statistics are kept.
//! 2. **Matching** — one permutation per group of [`permutation::llama`] lines
//!    B's units up with A's ([`matching`]: activations or weights).
//! 3. **Partial matching** — a parameter budget between 1× and 2× one model
//!    buys FFN units kept separately from each model instead of merged: the
//!    least-alike matched pairs anywhere in the network go first ([`allocate`]).
//!    A layer whose FFN keeps `s` of its `f` units separate is `f + s` wide.
//! 4. **Least squares** — every linear layer of the merged model is solved in
//!    closed form ([`least_squares`]) so that, fed the average of the two
//!    models' (aligned) inputs, it outputs the average of their outputs on
//!    merged units and each model's own output on its separate units.
//!
//! How the parts that are not plain linear layers are treated:
//! - The **residual stream** is one permutation for the whole network and is
//!   always merged (the hidden size stays; widening it would change every
//!   RMSNorm's statistics and the config's single `hidden_size`). Every
//!   layer writing to it (`o_proj`, `down_proj`) is fitted to the average of
//!   the two models' writes, so the merged stream tracks the average stream;
//!   the embeddings are the average of the aligned embeddings.
//! - **Norm scales** are folded into the weights that read the norm (exact:
//!   `W·diag(γ)`), the merged model's layer norms get scale 1, and the least
//!   squares see the two models' normalised streams `x / rms(x)`. The final
//!   norm is folded into an untied head the same way; a tied head cannot
//!   absorb it, so there the final norm is the aligned average.
//! - **Attention heads** are matched as whole heads (KV groups, then query
//!   heads within them) and merged; their count stays uniform across layers,
//!   as the config requires. q/k/v and o are fitted by least squares.
//! - The **least squares** read the original models' features (not the merged
//!   model's), so the layers' problems are independent, as in PLeaS.

pub mod least_squares;
pub mod matching;
pub mod permutation;
pub mod statistics;

use std::collections::BTreeMap;
use std::time::Instant;

use tch::{Kind, Tensor};

use crate::{MergeError, Result};
use least_squares::NormalEquations;
use matching::{activation_matching, group_index, matched_scores, weight_matching, SiteStats};
use permutation::{apply, llama, DecoderShape, PermutationGroup};
use statistics::{CrossStats, Metric};

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

#[derive(Debug, Clone)]
pub struct Options {
    pub matching: Matching,
    /// Target parameter count as a multiple of one input's, 1 to 2.
    pub budget: f64,
    /// Ridge, relative to the mean diagonal of each layer's XᵀX.
    pub ridge: f64,
    /// F32 or F64 normal equations.
    pub kind: Kind,
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
    /// FFN width per layer: merged + A-only + B-only units.
    pub ffn_widths: Vec<usize>,
    /// Units kept separately from each model, per layer.
    pub separate: Vec<usize>,
    pub parameters: usize,
    /// Parameters as a multiple of model A's.
    pub ratio: f64,
    /// The budget asked for more than separate FFN units can buy.
    pub budget_capped: bool,
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

    // 1. Feature statistics (also rank FFN pairs for the budget).
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

    // 3. Partial matching: which FFN units stay separate.
    let pair_scores: Vec<Vec<f64>> = (0..layers)
        .map(|l| {
            let g = group_index(&groups, &format!("layers.{l}.ffn"))?;
            Ok(matched_scores(
                &stats.ffn[l].scores(Metric::Correlation),
                &perms[g],
            ))
        })
        .collect::<Result<_>>()?;
    let model_parameters: usize = a.tensors.values().map(|t| t.numel()).sum();
    let allocation = allocate(
        &pair_scores,
        model_parameters,
        3 * shape.hidden,
        options.budget,
    );
    timings.matching += started.elapsed().as_secs_f64();
    let layout = FfnLayout::new(&allocation.separate, &pair_scores);
    let index = FeatureIndex::new(&groups, &perms, shape)?;

    // 4. The merged weights.
    let tensors = if options.least_squares {
        fit_layers(
            shape,
            &a,
            &b,
            &aligned,
            &index,
            &layout,
            batches,
            options,
            &mut timings,
            progress,
        )?
    } else {
        average_layers(shape, a.tensors, &aligned, &layout)
    };
    let parameters: usize = tensors.values().map(|t| t.numel()).sum();
    Ok(Merged {
        ffn_widths: layout.widths(shape),
        separate: allocation.separate,
        parameters,
        ratio: parameters as f64 / model_parameters as f64,
        budget_capped: allocation.capped,
        tensors,
        timings,
    })
}

/// The per-layer count of FFN units kept separate, from a global budget.
#[derive(Debug, Clone, PartialEq)]
pub struct Allocation {
    pub separate: Vec<usize>,
    pub capped: bool,
}

/// The allocation rule: `(budget − 1) × parameters` buys separate FFN units
/// at `unit_cost` parameters each (a gate row, an up row and a down column:
/// the extra copy of the unit); they go to the matched pairs with the lowest
/// scores anywhere in the network (ties: earlier layer, lower unit first).
/// A budget above what separating every FFN unit costs is capped there.
pub fn allocate(
    pair_scores: &[Vec<f64>],
    parameters: usize,
    unit_cost: usize,
    budget: f64,
) -> Allocation {
    let extra = (budget - 1.0).max(0.0) * parameters as f64;
    let affordable = (extra / unit_cost as f64 + 1e-9).floor() as usize;
    let mut pairs: Vec<(f64, usize, usize)> = pair_scores
        .iter()
        .enumerate()
        .flat_map(|(l, s)| s.iter().enumerate().map(move |(u, &score)| (score, l, u)))
        .collect();
    pairs.sort_by(|x, y| x.0.total_cmp(&y.0).then((x.1, x.2).cmp(&(y.1, y.2))));
    let mut separate = vec![0; pair_scores.len()];
    for &(_, l, _) in pairs.iter().take(affordable) {
        separate[l] += 1;
    }
    Allocation {
        separate,
        capped: affordable > pairs.len(),
    }
}

/// Each layer's FFN units in the merged model: the merged ones (A's unit
/// indices, which after alignment are also B's), then the separate ones
/// (the same indices, taken once from A and once from B).
struct FfnLayout {
    merged: Vec<Vec<i64>>,
    separate: Vec<Vec<i64>>,
}

impl FfnLayout {
    fn new(separate: &[usize], pair_scores: &[Vec<f64>]) -> Self {
        let (mut merged_units, mut separate_units) = (vec![], vec![]);
        for (&count, scores) in separate.iter().zip(pair_scores) {
            let mut order: Vec<usize> = (0..scores.len()).collect();
            order.sort_by(|&x, &y| scores[x].total_cmp(&scores[y]).then(x.cmp(&y)));
            let mut kept: Vec<i64> = order[..count].iter().map(|&u| u as i64).collect();
            let mut merged: Vec<i64> = order[count..].iter().map(|&u| u as i64).collect();
            kept.sort_unstable();
            merged.sort_unstable();
            merged_units.push(merged);
            separate_units.push(kept);
        }
        FfnLayout {
            merged: merged_units,
            separate: separate_units,
        }
    }

    fn widths(&self, shape: &DecoderShape) -> Vec<usize> {
        (0..shape.ffn.len())
            .map(|l| self.merged[l].len() + 2 * self.separate[l].len())
            .collect()
    }

    fn blocks(&self, l: usize) -> least_squares::Blocks {
        let s = self.separate[l].len();
        [self.merged[l].len(), s, s]
    }

    /// `[merged average | A's separate | B's separate]` along `dim` of
    /// per-unit data of both models (features, or weights' unit axis).
    fn combine(&self, l: usize, a: &Tensor, b: &Tensor, dim: i64, separate_scale: f64) -> Tensor {
        let pick = |t: &Tensor, units: &[i64]| {
            t.index_select(dim, &Tensor::from_slice(units).to_device(t.device()))
        };
        let (m, s) = (&self.merged[l], &self.separate[l]);
        Tensor::cat(
            &[
                (pick(a, m) + pick(b, m)) * 0.5,
                pick(a, s) * separate_scale,
                pick(b, s) * separate_scale,
            ],
            dim,
        )
    }
}

/// Index vectors that put B's features into the aligned order.
struct FeatureIndex {
    residual: Tensor,
    ffn: Vec<Tensor>,
    /// Per layer, every head's features (heads × head_dim entries).
    attention: Vec<Tensor>,
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
        for l in 0..shape.ffn.len() {
            ffn.push(index(
                &perms[group_index(groups, &format!("layers.{l}.ffn"))?],
            ));
            let kv = &perms[group_index(groups, &format!("layers.{l}.kv_heads"))?];
            let mut entries = vec![];
            for (position, &source) in kv.iter().enumerate() {
                let q =
                    &perms[group_index(groups, &format!("layers.{l}.group{position}.q_heads"))?];
                for &head in q {
                    let from = (source * per_group + head) * shape.head_dim;
                    entries.extend(from..from + shape.head_dim);
                }
            }
            attention.push(index(&entries));
        }
        Ok(FeatureIndex {
            residual: index(&perms[group_index(groups, "residual")?]),
            ffn,
            attention,
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

/// PLeaS's initial model: aligned weights averaged, separate FFN units
/// copied (their share of `down_proj` halved, as both copies add up).
fn average_layers(
    shape: &DecoderShape,
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    layout: &FfnLayout,
) -> BTreeMap<String, Tensor> {
    let mut out: BTreeMap<String, Tensor> = a
        .iter()
        .map(|(n, t)| (n.clone(), (t + &b[n]) * 0.5))
        .collect();
    for l in 0..shape.ffn.len() {
        for part in ["mlp.gate_proj", "mlp.up_proj"] {
            let name = layer(l, part);
            out.insert(
                name.clone(),
                layout.combine(l, &a[&name], &b[&name], 0, 1.0),
            );
        }
        let name = layer(l, "mlp.down_proj");
        out.insert(
            name.clone(),
            layout.combine(l, &a[&name], &b[&name], 1, 0.5),
        );
    }
    out
}

/// x / rms(x) over the last dimension (RMSNorm without its scale).
fn normalised(x: &Tensor, eps: f64) -> Tensor {
    x * (x.square().mean_dim(-1, true, Kind::Float) + eps).rsqrt()
}

/// The least-squares step: every linear layer fitted on both models' features.
#[allow(clippy::too_many_arguments)]
fn fit_layers(
    shape: &DecoderShape,
    a: &Model<'_>,
    b: &Model<'_>,
    aligned: &BTreeMap<String, Tensor>,
    index: &FeatureIndex,
    layout: &FfnLayout,
    batches: &[Tensor],
    options: &Options,
    timings: &mut Timings,
    progress: &dyn Fn(),
) -> Result<BTreeMap<String, Tensor>> {
    let (d, eps) = (shape.hidden, shape.rms_norm_eps);
    let attention_width = (shape.heads + 2 * shape.kv_heads) * shape.head_dim;
    let device = tch::Device::Cpu;
    let models = [a.tensors, aligned];
    // Norm scales folded into the readers: W·diag(γ).
    let folded = |m: &BTreeMap<String, Tensor>, weight: &str, norm: &str| -> Result<Tensor> {
        Ok(get(m, weight)? * get(m, norm)?.unsqueeze(0))
    };
    struct Layer {
        qkv: NormalEquations,
        o: NormalEquations,
        gate_up: NormalEquations,
        down: NormalEquations,
    }
    let mut equations: Vec<Layer> = (0..shape.ffn.len())
        .map(|l| {
            let width: usize = layout.blocks(l).iter().sum();
            Layer {
                qkv: NormalEquations::new(d, attention_width, options.kind, device),
                o: NormalEquations::new(shape.heads * shape.head_dim, d, options.kind, device),
                gate_up: NormalEquations::new(d, 2 * width, options.kind, device),
                down: NormalEquations::new(width, d, options.kind, device),
            }
        })
        .collect();
    let vocab = get(a.tensors, "model.embed_tokens.weight")?.size()[0] as usize;
    let mut head = shape
        .untied_head
        .then(|| NormalEquations::new(d, vocab, options.kind, device));
    // Per model: readers with their norms folded in, and the writers.
    let mut weights = vec![];
    for m in models {
        let mut per_layer = vec![];
        for l in 0..shape.ffn.len() {
            let norm1 = layer(l, "input_layernorm");
            let norm2 = layer(l, "post_attention_layernorm");
            let qkv = Tensor::cat(
                &[
                    folded(m, &layer(l, "self_attn.q_proj"), &norm1)?,
                    folded(m, &layer(l, "self_attn.k_proj"), &norm1)?,
                    folded(m, &layer(l, "self_attn.v_proj"), &norm1)?,
                ],
                0,
            );
            per_layer.push([
                qkv,
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
        for (l, eq) in equations.iter_mut().enumerate() {
            let w = |m: usize, i: usize| &weights[m].0[l][i];
            let n1 = |m: usize| normalised(&taps[m].residual[l], eps);
            eq.qkv
                .add(&mean(&n1), &mean(&|m| n1(m).matmul(&w(m, 0).tr())));
            let heads = |m: usize| &taps[m].attention[l];
            let write = |m: usize| heads(m).matmul(&w(m, 1).tr());
            eq.o.add(&mean(&|m| heads(m).shallow_clone()), &mean(&write));
            let n2 = |m: usize| normalised(&(&taps[m].residual[l] + write(m)), eps);
            let pre = |i: usize| {
                let (ya, yb) = (n2(0).matmul(&w(0, i).tr()), n2(1).matmul(&w(1, i).tr()));
                layout.combine(l, &ya, &yb, 1, 1.0)
            };
            eq.gate_up
                .add(&mean(&n2), &Tensor::cat(&[pre(2), pre(3)], 1));
            let hidden = |m: usize| &taps[m].ffn[l];
            eq.down.add(
                &layout.combine(l, hidden(0), hidden(1), 1, 1.0),
                &mean(&|m| hidden(m).matmul(&w(m, 4).tr())),
            );
        }
        if let Some(head) = &mut head {
            let last = shape.ffn.len();
            let n = |m: usize| normalised(&taps[m].residual[last], eps);
            let logits = |m: usize| n(m).matmul(&weights[m].1.as_ref().expect("untied").tr());
            head.add(&mean(&n), &mean(&logits));
        }
        timings.least_squares += started.elapsed().as_secs_f64();
        progress();
    }

    let started = Instant::now();
    let merged_only = |n: usize| [n, 0, 0];
    let mut out = BTreeMap::new();
    let average =
        |name: &str| -> Result<Tensor> { Ok((get(a.tensors, name)? + get(aligned, name)?) * 0.5) };
    out.insert(
        "model.embed_tokens.weight".to_string(),
        average("model.embed_tokens.weight")?,
    );
    let ones = || Tensor::ones([d as i64], (Kind::Float, device));
    for (l, eq) in equations.iter().enumerate() {
        let qkv = eq
            .qkv
            .solve(merged_only(d), merged_only(attention_width), options.ridge)?;
        let (q, kv) = (
            (shape.heads * shape.head_dim) as i64,
            (shape.kv_heads * shape.head_dim) as i64,
        );
        out.insert(layer(l, "self_attn.q_proj"), qkv.narrow(0, 0, q));
        out.insert(layer(l, "self_attn.k_proj"), qkv.narrow(0, q, kv));
        out.insert(layer(l, "self_attn.v_proj"), qkv.narrow(0, q + kv, kv));
        out.insert(
            layer(l, "self_attn.o_proj"),
            eq.o.solve(merged_only((q) as usize), merged_only(d), options.ridge)?,
        );
        let blocks = layout.blocks(l);
        let width: usize = blocks.iter().sum();
        let gate_up = eq
            .gate_up
            .solve(merged_only(d), merged_only(2 * width), options.ridge)?;
        out.insert(
            layer(l, "mlp.gate_proj"),
            gate_up.narrow(0, 0, width as i64),
        );
        out.insert(
            layer(l, "mlp.up_proj"),
            gate_up.narrow(0, width as i64, width as i64),
        );
        out.insert(
            layer(l, "mlp.down_proj"),
            eq.down.solve(blocks, merged_only(d), options.ridge)?,
        );
        out.insert(layer(l, "input_layernorm"), ones());
        out.insert(layer(l, "post_attention_layernorm"), ones());
    }
    match head {
        Some(head) => {
            out.insert(
                "lm_head.weight".into(),
                head.solve(merged_only(d), merged_only(vocab), options.ridge)?,
            );
            out.insert("model.norm.weight".into(), ones());
        }
        None => {
            out.insert("model.norm.weight".into(), average("model.norm.weight")?);
        }
    }
    timings.least_squares += started.elapsed().as_secs_f64();
    Ok(out.into_iter().map(|(n, t)| (n, t.contiguous())).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allocation_buys_the_least_alike_pairs_first() {
        let scores = vec![vec![0.9, 0.1, 0.5], vec![0.2, 0.95]];
        // 100 parameters, 10 per unit: budget 1.3 buys three units.
        let allocation = allocate(&scores, 100, 10, 1.3);
        assert_eq!(allocation.separate, vec![2, 1]);
        assert!(!allocation.capped);
        assert_eq!(allocate(&scores, 100, 10, 1.0).separate, vec![0, 0]);
        let all = allocate(&scores, 100, 10, 2.0);
        assert_eq!(all.separate, vec![3, 2]);
        assert!(all.capped);
        let layout = FfnLayout::new(&allocation.separate, &scores);
        assert_eq!(layout.merged, vec![vec![0], vec![1]]);
        assert_eq!(layout.separate, vec![vec![1, 2], vec![0]]);
    }
}
