//! PLeaS (permutations and least squares): merging two decoders of one
//! family that do not share a base, into a model of a chosen size — streamed
//! layer by layer, so that memory is bounded by one layer, not by the models.
//!
//! The phases, one file each:
//! 1. **Plan** ([`plan`]), from shapes alone: a parameter budget between 1×
//!    and 2× one model buys units kept separately from each model instead
//!    of merged (KV groups first, then the residual stream and every FFN by
//!    one common fraction). A group keeping `s` of its `n` units separate is
//!    `n + s` wide, in blocks `[merged | A-only | B-only]` ([`layout`]).
//!    The merged model's shapes, and so the output file, are known before
//!    any data is read; so is the peak memory.
//! 2. **First pass** (the residual stream): both models run block by block
//!    on the calibration batches; the residual stream's statistics are kept
//!    per block boundary and folded into one score matrix. The residual
//!    permutation is the only one shared by every layer: it is fixed here.
//! 3. **Second pass**, per layer: both models' blocks run again on the
//!    streams entering the layer; the layer's FFN and attention features
//!    are matched ([`matching`]), the least-alike matched pairs of a group
//!    kept separate, and every linear layer of the merged block solved in
//!    closed form (`amalgam_nn::least_squares`, [`fit`]) from the two models' own
//!    features in the block layouts (A-only outputs never reading B-only
//!    inputs). The merged layer is handed to the writer and freed.
//! 4. **Ends**: embeddings, final norm and head.
//!
//! Only one block of each model is ever loaded (weight matching, data-free,
//! is the exception: it needs both whole models). Accumulation order is the
//! same as a whole-model run's, so the schedule does not change the result.
//!
//! How the parts that are not plain linear layers are treated:
//! - **Norm scales** are folded into the weights that read the norm (exact:
//!   `W·diag(γ)`), the merged model's layer norms get scale 1, and the least
//!   squares see each model's normalised stream `x / rms(x)`. A wider
//!   residual stream is normalised over its whole width by the merged model;
//!   with separate channels that approximates each model's own statistics
//!   when the two streams' scales agree, and the least squares absorb the rest.
//! - The **residual stream** is one permutation for the whole network. The
//!   embeddings and every writer into it (attention's and the MLP's output
//!   projections) are fitted
//!   to the two models' writes in its layout (merged channels: the average),
//!   so the merged stream tracks both streams. An untied head is fitted the
//!   same way (final norm folded in); a tied head reads the embeddings, and
//!   the final norm is the aligned average with separate channels' scales
//!   halved, so the logits are the average of the two models'.
//! - **Attention heads** move as whole heads (KV groups with their query
//!   heads); a separate KV group keeps its query heads separate too. Counts
//!   stay uniform across layers, as the config requires.

pub mod block;
mod fit;
pub mod layout;
pub mod matching;
pub mod permutation;
pub mod plan;
mod run;
pub mod statistics;

pub use plan::{Memory, PleasPlan};
pub use run::Pleas;

use std::collections::BTreeMap;
use std::time::Instant;

use amalgam_nn::{Decoder, Part};
use tch::{Device, Tensor};

use crate::{MergeError, Progress, Result};
use fit::{LayerFeatures, Pair};
use layout::{by, LayerIndex, LayerLayouts, UnitLayout};
use matching::{assign, group_index, match_layer, matched_scores, weight_matching};
use permutation::{apply, decoder, restrict};
use statistics::{block_diagonal_sums, CrossStats, Metric};

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
    pub kind: tch::Kind,
    /// Where the normal equations are accumulated and solved (the forward
    /// passes run where the sources put the models).
    pub device: Device,
    /// Which groups a budget above 1 widens.
    pub widen: Widen,
    /// Fit the layers by least squares; otherwise average the aligned
    /// weights (PLeaS's initial model; with `budget: 1`, permute-then-average).
    pub least_squares: bool,
}

/// Seconds spent in each phase.
#[derive(Debug, Clone, Default)]
pub struct Timings {
    /// Forward passes, both passes.
    pub features: f64,
    /// Statistics and assignments.
    pub matching: f64,
    pub least_squares: f64,
    /// Wall time of the first pass (the residual stream) and of the rest.
    pub first_pass: f64,
    pub second_pass: f64,
}

/// What a merge produced besides its tensors.
#[derive(Debug, Clone)]
pub struct Report {
    /// Residual channels kept separately from each model.
    pub separate_residual: usize,
    /// FFN units kept separately from each model, per layer.
    pub separate_ffn: Vec<usize>,
    pub timings: Timings,
}

/// Where PLeaS reads one model from: a part of it (one block, the
/// embeddings, the head), with F32 weights.
pub type ModelParts<'a> = dyn Fn(&Part) -> Result<Decoder> + 'a;

/// Merges the two models `sources` (of the plan's shape) with PLeaS on
/// `batches` of calibration ids `[batch, seq]`, handing every merged tensor
/// (F32, Hugging Face names, the plan's shapes) to `sink` as soon as it is
/// computed. `progress` counts layers, per pass.
pub fn merge(
    plan: &PleasPlan,
    sources: [&ModelParts<'_>; 2],
    batches: &[Tensor],
    options: &Options,
    sink: &mut dyn FnMut(String, Tensor) -> Result<()>,
    progress: &dyn Progress,
) -> Result<Report> {
    if batches.is_empty() {
        return Err(MergeError::Permutation("no calibration batches".into()));
    }
    let shape = &plan.shape;
    let layers = shape.ffn.len();
    let groups = decoder(&plan.config);
    let mut timings = Timings::default();
    let mut perms: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units).collect()).collect();
    let residual_group = group_index(&groups, "residual")?;
    let first_pass = plan.needs_residual_pass(options.matching);
    progress.start(((1 + first_pass as usize) * layers + 1) as u64, "pleas");

    // Weight matching is data-free but whole-model: both models in memory.
    if let Matching::Weight { seed } = options.matching {
        let started = Instant::now();
        let whole = Part::whole(layers);
        let (a, b) = (sources[0](&whole)?, sources[1](&whole)?);
        perms = weight_matching(&groups, &on_cpu(&a), &on_cpu(&b), seed, 100)?;
        timings.matching += started.elapsed().as_secs_f64();
    }

    // First pass: the residual stream at every block boundary.
    let residual_scores = if first_pass {
        let started = Instant::now();
        let metric = match options.matching {
            Matching::Activation(metric) => metric,
            _ => Metric::Correlation,
        };
        let (matching, correlation) =
            residual_pass(sources, layers, batches, metric, &mut timings, progress)?;
        if let Matching::Activation(_) = options.matching {
            perms[residual_group] = assign(&matching)?;
        }
        timings.first_pass = started.elapsed().as_secs_f64();
        matched_scores(&correlation, &perms[residual_group])
    } else {
        vec![0.0; shape.hidden]
    };
    let residual = UnitLayout::new(plan.allocation.residual, &residual_scores);
    let residual_index = Tensor::from_slice(
        &perms[residual_group]
            .iter()
            .map(|&u| u as i64)
            .collect::<Vec<_>>(),
    );

    let merged_config = plan.merged_config();
    let cx = fit::Context {
        config: &plan.config,
        merged: &merged_config,
        residual: &residual,
        options,
    };

    // Second pass, layer by layer.
    let started_second = Instant::now();
    let mut streams = embed(sources, batches, &mut timings)?;
    let per_group = shape.heads / shape.kv_heads;
    for l in 0..layers {
        let started = Instant::now();
        let blocks = [sources[0](&Part::block(l))?, sources[1](&Part::block(l))?];
        let mut features = LayerFeatures {
            residual: [vec![], vec![]],
            attention: [vec![], vec![]],
            mlp_stream: [vec![], vec![]],
            ffn: [vec![], vec![]],
        };
        for (m, block) in blocks.iter().enumerate() {
            for x in std::mem::take(&mut streams[m]) {
                let (out, taps) = tch::no_grad(|| block.blocks_taps(x, l..l + 1));
                let [residual, attention, mlp_stream, ffn] = taps.flattened().map(|t| {
                    let [t] = <[Tensor; 1]>::try_from(t).expect("one block's taps");
                    t.to_device(Device::Cpu)
                });
                features.residual[m].push(residual);
                features.attention[m].push(attention);
                features.mlp_stream[m].push(mlp_stream);
                features.ffn[m].push(ffn);
                streams[m].push(out);
            }
        }
        timings.features += started.elapsed().as_secs_f64();

        // Match the layer's heads and FFN units; rank the matched pairs.
        let started = Instant::now();
        let wanted = matches!(options.matching, Matching::Activation(_))
            || plan.allocation.kv_groups > 0
            || plan.allocation.ffn[l] > 0;
        let stats = wanted.then(|| (statistics(&features.ffn), statistics(&features.attention)));
        if let (Some((ffn, attention)), Matching::Activation(metric)) = (&stats, options.matching) {
            match_layer(
                &groups,
                l,
                ffn,
                attention,
                metric,
                shape.head_dim,
                &mut perms,
            )?;
        }
        // The permutations of this layer are final: B's order against A's.
        let index = LayerIndex::new(&groups, &perms, shape, l)?;
        let (mut kv_scores, mut ffn_scores) = (vec![0.0; shape.kv_heads], vec![0.0; shape.ffn[l]]);
        if let Some((ffn, attention)) = stats {
            ffn_scores = matched_scores(
                &ffn.scores(Metric::Correlation),
                &perms[group_index(&groups, &format!("layers.{l}.ffn"))?],
            );
            // A KV group's score: the mean over its matched query heads' features.
            let heads = block_diagonal_sums(
                &attention.scores(Metric::Correlation),
                shape.head_dim as i64,
            );
            kv_scores = matched_scores(&heads, &index.heads)
                .chunks(per_group)
                .map(|c| c.iter().sum::<f64>() / (per_group * shape.head_dim) as f64)
                .collect();
        }
        let layouts = LayerLayouts {
            kv_groups: UnitLayout::new(plan.allocation.kv_groups, &kv_scores),
            ffn: UnitLayout::new(plan.allocation.ffn[l], &ffn_scores),
        };
        // B's features and weights in A's order.
        let align = |x: &mut Vec<Tensor>, f: &dyn Fn(&Tensor) -> Tensor| {
            *x = x.iter().map(f).collect();
        };
        align(&mut features.residual[1], &|t| index.residual(t));
        align(&mut features.mlp_stream[1], &|t| index.residual(t));
        align(&mut features.attention[1], &|t| index.attention(t));
        align(&mut features.ffn[1], &|t| index.ffn(t));
        let a = on_cpu(&blocks[0]);
        let b = aligned(on_cpu(&blocks[1]), &groups, &perms)?;
        drop(blocks);
        timings.matching += started.elapsed().as_secs_f64();

        let started = Instant::now();
        let merged = if options.least_squares {
            fit::least_squares_layer(l, &cx, [&a, &b], &features, &layouts)?
        } else {
            fit::average_layer(l, &cx, [&a, &b], &layouts)?
        };
        for (name, tensor) in merged {
            sink(name, tensor)?;
        }
        timings.least_squares += started.elapsed().as_secs_f64();
        progress.advance(1);
    }

    // The ends, one part at a time: the embeddings, then the final norm and
    // head (a tied head's embeddings are not read twice).
    let started = Instant::now();
    let embedding = format!("{}.weight", plan.config.architecture.layout.embedding);
    let mut final_streams = Some(streams);
    for part in [Part::embedding(), Part::head()] {
        let read = |m: usize| -> Result<BTreeMap<String, Tensor>> {
            let mut tensors = on_cpu(&sources[m](&part)?);
            if !part.embedding {
                tensors.remove(&embedding);
            }
            Ok(tensors)
        };
        let a = read(0)?;
        let b = aligned(read(1)?, &groups, &perms)?;
        let weights: Pair<'_> = [&a, &b];
        let merged = if part.embedding {
            fit::embeddings(&cx, weights)?
        } else if !options.least_squares {
            fit::average_ends(&cx, weights)?
        } else if shape.untied_head {
            let [sa, sb] = final_streams.take().expect("the head is fitted once");
            let flat = |x: Vec<Tensor>, aligned: bool| -> Vec<Tensor> {
                x.into_iter()
                    .map(|x| {
                        let x = x.reshape([-1, shape.hidden as i64]).to_device(Device::Cpu);
                        if aligned {
                            by(&x, &residual_index)
                        } else {
                            x
                        }
                    })
                    .collect()
            };
            let streams = [flat(sa, false), flat(sb, true)];
            fit::least_squares_head(&cx, weights, &streams)?
        } else {
            fit::tied_final_norm(&cx, weights)?
        };
        for (name, tensor) in merged {
            sink(name, tensor)?;
        }
    }
    timings.least_squares += started.elapsed().as_secs_f64();
    timings.second_pass = started_second.elapsed().as_secs_f64();
    progress.advance(1);
    progress.finish();
    Ok(Report {
        separate_residual: plan.allocation.residual,
        separate_ffn: plan.allocation.ffn.clone(),
        timings,
    })
}

/// A part's tensors on the CPU, by Hugging Face name.
fn on_cpu(model: &Decoder) -> BTreeMap<String, Tensor> {
    model
        .tensors()
        .into_iter()
        .map(|(n, t)| (n, t.detach().to_device(Device::Cpu)))
        .collect()
}

/// Part of B's tensors permuted into A's order.
fn aligned(
    mut tensors: BTreeMap<String, Tensor>,
    groups: &[permutation::PermutationGroup],
    perms: &[Vec<usize>],
) -> Result<BTreeMap<String, Tensor>> {
    let groups = restrict(groups, &tensors);
    apply(&mut tensors, &groups, perms)?;
    Ok(tensors)
}

/// Both models' residual streams entering block 0, per batch.
fn embed(
    sources: [&ModelParts<'_>; 2],
    batches: &[Tensor],
    timings: &mut Timings,
) -> Result<[Vec<Tensor>; 2]> {
    let started = Instant::now();
    let mut streams = [vec![], vec![]];
    for (m, source) in sources.iter().enumerate() {
        let model = source(&Part::embedding())?;
        streams[m] = batches
            .iter()
            .map(|ids| tch::no_grad(|| model.embed(&ids.to_device(model.device()))))
            .collect();
    }
    timings.features += started.elapsed().as_secs_f64();
    Ok(streams)
}

/// The cross statistics of a site over every batch (`[tokens, width]` per
/// batch, per model), accumulated in batch order.
fn statistics(features: &[Vec<Tensor>; 2]) -> CrossStats {
    let mut pairs = features[0].iter().zip(&features[1]);
    let (a, b) = pairs.next().expect("at least one batch");
    let mut stats = CrossStats::new(a, b);
    for (a, b) in pairs {
        stats.add(a, b);
    }
    stats
}

/// The first pass: both models block by block, the residual stream's
/// scores (`metric`, and correlation for ranking matched pairs) summed over
/// every block boundary (the last before the final norm); the correlation
/// is the mean over boundaries.
fn residual_pass(
    sources: [&ModelParts<'_>; 2],
    layers: usize,
    batches: &[Tensor],
    metric: Metric,
    timings: &mut Timings,
    progress: &dyn Progress,
) -> Result<(Tensor, Tensor)> {
    let mut streams = embed(sources, batches, timings)?;
    let flat = |x: &[Tensor]| -> Vec<Tensor> {
        x.iter()
            .map(|x| {
                let width = *x.size().last().expect("a stream");
                x.reshape([-1, width]).to_device(Device::Cpu)
            })
            .collect()
    };
    let mut boundaries = 0usize;
    let mut matching: Option<Tensor> = None;
    let mut correlation: Option<Tensor> = None;
    let mut add_boundary = |streams: &[Vec<Tensor>; 2], timings: &mut Timings| {
        let started = Instant::now();
        let stats = statistics(&[flat(&streams[0]), flat(&streams[1])]);
        let add = |sum: &mut Option<Tensor>, scores: Tensor| {
            *sum = Some(match sum.take() {
                Some(sum) => sum + scores,
                None => scores,
            });
        };
        add(&mut matching, stats.scores(metric));
        add(&mut correlation, stats.scores(Metric::Correlation));
        boundaries += 1;
        timings.matching += started.elapsed().as_secs_f64();
    };
    add_boundary(&streams, timings);
    for l in 0..layers {
        let started = Instant::now();
        for (m, source) in sources.iter().enumerate() {
            let block = source(&Part::block(l))?;
            streams[m] = std::mem::take(&mut streams[m])
                .into_iter()
                .map(|x| tch::no_grad(|| block.blocks(x, l..l + 1)))
                .collect();
        }
        timings.features += started.elapsed().as_secs_f64();
        add_boundary(&streams, timings);
        progress.advance(1);
    }
    let (matching, correlation) = (
        matching.expect("one boundary at least"),
        correlation.expect("one boundary at least"),
    );
    Ok((matching, correlation / boundaries as f64))
}
