//! The stitching layers' least squares, streamed: neither anchor is ever
//! whole in memory. One anchor (the one whose streams cost fewer bytes) runs
//! block by block first, keeping its residual stream at the block boundaries
//! the routes read; the other then runs block by block, and at each of its
//! boundaries solves every route that reads it — from its own stream (a cut)
//! into a kept one (a resume), or from a kept stream into its own — with
//! [`NormalEquations`] in F64 (routes cut at the same boundary share one
//! XᵀX). What is held at any time: one block of one anchor, the calibration
//! streams at the current depth, the kept streams, one route's equations and
//! the stitches solved so far.

use std::collections::{BTreeMap, BTreeSet};

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_nn::least_squares::NormalEquations;
use amalgam_nn::{Decoder, DecoderConfig, Part};
use tch::{Kind, Tensor};

use super::{Route, Stitch};
use crate::{ElasticError, Result};

/// Where calibration reads an anchor from: a part of it (one block, the
/// embeddings), in the dtype the anchor computes in.
pub type AnchorParts<'a> = dyn Fn(&Part) -> Result<Decoder> + 'a;

/// A calibration, from shapes alone: which anchor's streams are kept, and
/// the memory the run needs.
#[derive(Debug, Clone)]
pub struct CalibrationPlan {
    pub routes: Vec<Route>,
    /// The anchor whose streams are kept; the other is walked.
    pub kept: usize,
    /// The kept anchor's block boundaries the routes read (0: the
    /// embeddings' output).
    pub kept_boundaries: BTreeSet<usize>,
    /// How deep each anchor runs (its deepest boundary a route reads).
    pub depths: [usize; 2],
    /// Weights and biases of all the routes' stitches.
    pub stitch_parameters: u64,
    /// The kept anchor's streams at those boundaries (held through both passes).
    pub kept_stream_bytes: u64,
    /// Running the kept anchor, its streams accumulating; then walking the
    /// other anchor and solving the routes.
    pub memory: MemoryEstimate,
}

impl CalibrationPlan {
    /// The plan for `routes` between anchors of `configs` computing in
    /// `kinds`, on `samples` sequences of `seq_len` tokens run `batch` at a time.
    pub fn new(
        configs: [&DecoderConfig; 2],
        kinds: [Kind; 2],
        routes: Vec<Route>,
        samples: usize,
        seq_len: usize,
        batch: usize,
    ) -> Self {
        let boundaries = |a: usize| -> BTreeSet<usize> {
            routes
                .iter()
                .flat_map(|r| {
                    [
                        (r.front == a).then_some(r.cut),
                        (r.end == a).then_some(r.resume),
                    ]
                })
                .flatten()
                .collect()
        };
        let bytes = |kind: Kind| kind.elt_size_in_bytes() as f64;
        // In f64: hostile sizes give a huge estimate, not an overflow.
        let tokens = samples as f64 * seq_len as f64;
        let batch_tokens = batch.min(samples) as f64 * seq_len as f64;
        let stream = |a: usize| tokens * configs[a].hidden_size as f64 * bytes(kinds[a]);
        let kept_cost = |a: usize| boundaries(a).len() as f64 * stream(a);
        let kept = if kept_cost(1) < kept_cost(0) { 1 } else { 0 };
        let walked = 1 - kept;
        let depth = |a: usize| boundaries(a).last().copied().unwrap_or(0);
        // One anchor running: two streams (a block's input and output), the
        // larger of its embeddings and one block, one batch's activations.
        let running = |a: usize| {
            let c = configs[a];
            let widest = (0..c.num_hidden_layers())
                .map(|l| c.block_matrix_parameters(l))
                .max()
                .unwrap_or(0) as f64;
            let weights = f64::max(widest, c.vocab_size as f64 * c.hidden_size as f64);
            2.0 * stream(a)
                + weights * bytes(kinds[a])
                + c.block_forward_bytes(batch.min(samples), seq_len) as f64
        };
        // One system: XᵀX and XᵀY in F64, the solver's copies of them, and
        // one batch's inputs and targets converted to F64.
        let (dk, dw) = (
            configs[kept].hidden_size as f64,
            configs[walked].hidden_size as f64,
        );
        let system = |inputs: f64, outputs: f64| {
            let held = (inputs + 1.0) * (inputs + 1.0 + outputs) * 8.0;
            held * 3.0 + batch_tokens * (inputs + 1.0 + outputs) * 8.0
        };
        let cuts_here = (0..=depth(walked))
            .map(|b| {
                routes
                    .iter()
                    .filter(|r| r.front == walked && r.cut == b)
                    .count()
            })
            .max()
            .unwrap_or(0) as f64;
        let equations = system(dw, cuts_here * dk).max(system(dk, dw));
        let stitch_parameters: u64 = routes
            .iter()
            .map(|r| (configs[r.front].hidden_size as u64 + 1) * configs[r.end].hidden_size as u64)
            .sum();
        let stitches = stitch_parameters as f64 * 4.0;
        let kept_streams = kept_cost(kept);
        // `as` saturates: an estimate past u64 is u64::MAX.
        let memory = MemoryEstimate::new()
            .held("the kept streams", kept_streams as u64)
            .phase("kept anchor's pass", running(kept) as u64)
            .phase(
                "walked anchor's pass with the least squares",
                (running(walked) + equations + stitches) as u64,
            );
        CalibrationPlan {
            kept_boundaries: boundaries(kept),
            depths: [depth(0), depth(1)],
            stitch_parameters,
            kept,
            routes,
            kept_stream_bytes: kept_streams as u64,
            memory,
        }
    }

    /// Blocks the calibration runs (both anchors).
    pub fn blocks(&self) -> usize {
        self.depths[0] + self.depths[1]
    }
}

/// The least-squares stitch of every route of `plan` (in its order), fitted
/// on the anchors' residual streams over the calibration `batches` of ids
/// `[batch, seq]`; `ridge` is relative to the mean diagonal of each XᵀX.
/// `on_block` is called after every block run.
pub fn calibrate(
    plan: &CalibrationPlan,
    sources: [&AnchorParts<'_>; 2],
    batches: &[Tensor],
    ridge: f64,
    on_block: &mut dyn FnMut(),
) -> Result<Vec<Stitch>> {
    if batches.is_empty() {
        return Err(ElasticError::Stitch("no calibration batches".into()));
    }
    let (kept, walked) = (plan.kept, 1 - plan.kept);
    let routes = &plan.routes;
    let mut stored: BTreeMap<usize, Vec<Tensor>> = BTreeMap::new();
    walk(
        sources[kept],
        batches,
        plan.depths[kept],
        on_block,
        &mut |b, streams| {
            if plan.kept_boundaries.contains(&b) {
                stored.insert(b, streams.iter().map(flat).collect());
            }
            Ok(())
        },
    )?;
    let mut stitches: Vec<Option<Stitch>> = routes.iter().map(|_| None).collect();
    walk(
        sources[walked],
        batches,
        plan.depths[walked],
        on_block,
        &mut |b, streams| {
            let kept_stream = |at: usize| {
                stored.get(&at).ok_or_else(|| {
                    ElasticError::Stitch(format!("no kept stream at boundary {at} (a plan bug)"))
                })
            };
            let width = |s: &[Tensor]| {
                s.first()
                    .map_or(0, |t| *t.size().last().unwrap_or(&0) as usize)
            };
            // Routes cut from the walked anchor here: one XᵀX, every target.
            let cuts: Vec<usize> = (0..routes.len())
                .filter(|&r| routes[r].front == walked && routes[r].cut == b)
                .collect();
            if !cuts.is_empty() {
                let targets = cuts
                    .iter()
                    .map(|&r| kept_stream(routes[r].resume))
                    .collect::<Result<Vec<_>>>()?;
                let (inputs, outputs) = (width(streams), width(targets[0]));
                let mut equations = NormalEquations::new(
                    inputs,
                    outputs * cuts.len(),
                    true,
                    Kind::Double,
                    streams[0].device(),
                );
                for (i, x) in streams.iter().enumerate() {
                    let y: Vec<Tensor> = targets.iter().map(|t| t[i].shallow_clone()).collect();
                    equations.add(&flat(x), &Tensor::cat(&y, 1));
                }
                for (j, &r) in cuts.iter().enumerate() {
                    let linear = equations.solve_columns(
                        [inputs, 0, 0],
                        j * outputs,
                        [outputs, 0, 0],
                        ridge,
                    )?;
                    stitches[r] = Some(Stitch::from_linear(linear));
                }
            }
            // Routes from a kept stream resuming in the walked anchor here.
            for r in (0..routes.len()).filter(|&r| routes[r].end == walked && routes[r].resume == b)
            {
                let x = kept_stream(routes[r].cut)?;
                let (inputs, outputs) = (width(x), width(streams));
                let mut equations =
                    NormalEquations::new(inputs, outputs, true, Kind::Double, streams[0].device());
                for (x, y) in x.iter().zip(streams) {
                    equations.add(x, &flat(y));
                }
                let linear = equations.solve([inputs, 0, 0], [outputs, 0, 0], ridge)?;
                stitches[r] = Some(Stitch::from_linear(linear));
            }
            Ok(())
        },
    )?;
    stitches
        .into_iter()
        .zip(routes)
        .map(|(s, r)| {
            s.ok_or_else(|| {
                ElasticError::Stitch(format!("route {r:?} was not solved (a plan bug)"))
            })
        })
        .collect()
}

/// `[batch, seq, width]` → `[batch × seq, width]`.
fn flat(x: &Tensor) -> Tensor {
    x.reshape([-1, *x.size().last().expect("a stream has dimensions")])
}

/// Runs one anchor block by block over `batches` up to boundary `depth`,
/// handing each boundary's streams (one per batch) to `at_boundary`.
fn walk(
    source: &AnchorParts<'_>,
    batches: &[Tensor],
    depth: usize,
    on_block: &mut dyn FnMut(),
    at_boundary: &mut dyn FnMut(usize, &[Tensor]) -> Result<()>,
) -> Result<()> {
    let embedding = source(&Part::embedding())?;
    let device = embedding.device();
    let mut streams: Vec<Tensor> = tch::no_grad(|| {
        batches
            .iter()
            .map(|ids| embedding.embed(&ids.to_device(device)))
            .collect()
    });
    drop(embedding);
    at_boundary(0, &streams)?;
    for l in 0..depth {
        let block = source(&Part::block(l))?;
        streams = tch::no_grad(|| {
            streams
                .into_iter()
                .map(|x| block.blocks(x, l..l + 1))
                .collect()
        });
        drop(block);
        at_boundary(l + 1, &streams)?;
        on_block();
    }
    Ok(())
}
