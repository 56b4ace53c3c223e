//! The merged weights of one layer (or of the model's ends), from both
//! models' weights and features in the aligned order: PLeaS's least squares,
//! or its initial model (the aligned weights averaged in block layout).
//! Families differ only through [`Block`] (how parts are stored) and
//! [`NormMath`] (what a norm computes).
//!
//! Least squares: inputs are the two models' own inputs in the input's
//! layout — merged units averaged, separate ones each model's own — and
//! targets each model's own outputs in the output's layout, as in PLeaS.
//! A layer reading a norm sees each model's normalised stream and is
//! fitted to the model's layer with the norm folded in (`W·diag(γ)`, and
//! `b + W·β` for LayerNorm's shift); the merged norm then only normalises.
//! (Normalising the combined stream instead, as the merged model literally
//! does, was measured: worse at 1×, a little better at 2× — the book's PLeaS results.)
//! Norms after a layer (Gemma 2/3's and OLMo 2's post-norms) and q/k norms
//! are not folded: the layer is fitted to each model's pre-norm output and
//! the merged norm is the aligned average of the two.

use std::collections::BTreeMap;

use amalgam_nn::DecoderConfig;
use tch::Tensor;

use super::block::{get, Block, LinearWeights, NormMath};
use super::layout::{combine_weight, LayerLayouts, UnitLayout};
use super::Options;
use crate::Result;
use amalgam_nn::least_squares::{Blocks, NormalEquations};

/// Both models' tensors (A's, then B's aligned), by Hugging Face name.
pub(super) type Pair<'a> = [&'a BTreeMap<String, Tensor>; 2];

/// One layer's features over the calibration batches, per model (A, then B
/// aligned), per batch `[tokens, width]`.
pub(super) struct LayerFeatures {
    /// The residual stream entering the block.
    pub residual: [Vec<Tensor>; 2],
    /// The attention heads' outputs before the output projection, heads side by side.
    pub attention: [Vec<Tensor>; 2],
    /// The stream the MLP reads.
    pub mlp_stream: [Vec<Tensor>; 2],
    /// act(gate)·up (or act(up)).
    pub ffn: [Vec<Tensor>; 2],
}

/// What the layer fits need to know about the two models and the merge.
pub(super) struct Context<'a> {
    /// The inputs' config and the merged model's.
    pub config: &'a DecoderConfig,
    pub merged: &'a DecoderConfig,
    pub residual: &'a UnitLayout,
    pub options: &'a Options,
}

/// `x` through a layer: `x Wᵀ + b`.
fn apply(l: &LinearWeights, x: &Tensor) -> Tensor {
    x.linear(&l.weight, l.bias.as_ref())
}

/// A least-squares system over every batch: inputs from `input(m, batch)`
/// (both models, combined in `inputs`' layout), targets for each of
/// `readers` (per model, combined in `outputs`' layout), solved one reader
/// at a time from one `XᵀX`.
#[allow(clippy::too_many_arguments)]
fn solve(
    cx: &Context<'_>,
    batches: usize,
    input: &dyn Fn(usize, usize) -> Tensor,
    inputs: &UnitLayout,
    readers: &[[&LinearWeights; 2]],
    outputs: &[&UnitLayout],
    bias: bool,
) -> Result<Vec<LinearWeights>> {
    let widths: Vec<usize> = outputs.iter().map(|o| o.width()).collect();
    let mut equations = NormalEquations::new(
        inputs.width(),
        widths.iter().sum(),
        bias,
        cx.options.kind,
        cx.options.device,
    );
    for batch in 0..batches {
        let x = [input(0, batch), input(1, batch)];
        let targets: Vec<Tensor> = readers
            .iter()
            .zip(outputs)
            .map(|(w, layout)| layout.combine(&apply(w[0], &x[0]), &apply(w[1], &x[1]), 1, 1.0))
            .collect();
        equations.add(
            &inputs.combine(&x[0], &x[1], 1, 1.0),
            &Tensor::cat(&targets, 1),
        );
    }
    let in_blocks: Blocks = inputs.blocks();
    let mut first = 0;
    let mut solved = vec![];
    for (layout, width) in outputs.iter().zip(&widths) {
        solved.push(equations.solve_columns(
            in_blocks,
            first,
            layout.blocks(),
            cx.options.ridge,
        )?);
        first += width;
    }
    Ok(solved)
}

/// The solutions of a fixed number of readers, as an array.
fn parts<const N: usize>(solved: Vec<LinearWeights>) -> [LinearWeights; N] {
    solved
        .try_into()
        .unwrap_or_else(|_| unreachable!("one solution per reader"))
}

/// The norm in `slot` of both models' blocks, if the family has it there.
fn norms(blocks: &[Block; 2], slot: usize) -> Option<[&LinearWeights; 2]> {
    match (&blocks[0].norms[slot], &blocks[1].norms[slot]) {
        (Some(a), Some(b)) => Some([a, b]),
        _ => None,
    }
}

/// Layer `l` fitted by least squares, in the merged model's stored tensors.
pub(super) fn least_squares_layer(
    l: usize,
    cx: &Context<'_>,
    weights: Pair<'_>,
    features: &LayerFeatures,
    layouts: &LayerLayouts,
) -> Result<Vec<(String, Tensor)>> {
    let math = NormMath::of(cx.config);
    let blocks = [
        Block::read(cx.config, l, weights[0])?,
        Block::read(cx.config, l, weights[1])?,
    ];
    let arch = &cx.merged.architecture;
    let (queries, keys) = layouts.heads(cx.config);
    let ffn = &layouts.ffn;
    let residual = cx.residual;
    let batches = features.residual[0].len();
    // A reader's input: the stream normalised if a norm precedes it (its
    // scale folded into the reader), else the stream itself.
    let reading = |slot: usize, stream: &[Vec<Tensor>; 2], m: usize, batch: usize| {
        let x = &stream[m][batch];
        if norms(&blocks, slot).is_some() {
            math.normalise(x)
        } else {
            x.shallow_clone()
        }
    };
    let folded = |slot: usize, part: &dyn Fn(&Block) -> &LinearWeights| -> [LinearWeights; 2] {
        [0, 1].map(|m| match norms(&blocks, slot) {
            Some(norm) => math.fold(part(&blocks[m]), norm[m]),
            None => part(&blocks[m]).shallow_clone(),
        })
    };
    // One system at a time (accumulated over every batch, solved, freed).
    // q, k and v read the same inputs, as do the MLP's input projections.
    let qkv: Vec<[LinearWeights; 2]> = (0..3).map(|i| folded(0, &|b| &b.qkv[i])).collect();
    let [q, k, v]: [LinearWeights; 3] = solve(
        cx,
        batches,
        &|m, batch| reading(0, &features.residual, m, batch),
        residual,
        &qkv.iter().map(|p| [&p[0], &p[1]]).collect::<Vec<_>>(),
        &[&queries, &keys, &keys],
        arch.qkv_bias,
    )
    .map(parts)?;
    drop(qkv);
    let output = [&blocks[0].output, &blocks[1].output];
    let [output]: [LinearWeights; 1] = solve(
        cx,
        batches,
        &|m, batch| features.attention[m][batch].shallow_clone(),
        &queries,
        &[output],
        &[residual],
        arch.output_bias,
    )
    .map(parts)?;
    let mlp: Vec<[LinearWeights; 2]> = (0..blocks[0].mlp_input.len())
        .map(|i| folded(2, &|b| &b.mlp_input[i]))
        .collect();
    let mlp_input = solve(
        cx,
        batches,
        &|m, batch| reading(2, &features.mlp_stream, m, batch),
        residual,
        &mlp.iter().map(|p| [&p[0], &p[1]]).collect::<Vec<_>>(),
        &vec![ffn; mlp.len()],
        arch.mlp_bias,
    )?;
    drop(mlp);
    let down = [&blocks[0].mlp_output, &blocks[1].mlp_output];
    let [mlp_output]: [LinearWeights; 1] = solve(
        cx,
        batches,
        &|m, batch| features.ffn[m][batch].shallow_clone(),
        ffn,
        &[down],
        &[residual],
        arch.mlp_bias,
    )
    .map(parts)?;
    // Norms before a layer were folded into it; those after are averaged.
    let d = residual.width();
    let norms = [0, 1, 2, 3].map(|slot| {
        norms(&blocks, slot).map(|[a, b]| match slot {
            0 | 2 => math.identity(d),
            _ => combine_norm(residual, a, b, 1.0),
        })
    });
    let merged = Block {
        qkv: [q, k, v],
        output,
        mlp_input,
        mlp_output,
        norms,
        qk_norm: qk_norms(cx.config, &blocks, &queries, &keys),
    };
    Ok(merged.write(cx.merged, l))
}

/// Both models' norms over the residual stream in its layout (weights and
/// shifts; separate channels' scales times `separate_scale`).
fn combine_norm(
    residual: &UnitLayout,
    a: &LinearWeights,
    b: &LinearWeights,
    separate_scale: f64,
) -> LinearWeights {
    LinearWeights {
        weight: residual.combine(&a.weight, &b.weight, 0, separate_scale),
        bias: match (&a.bias, &b.bias) {
            (Some(x), Some(y)) => Some(residual.combine(x, y, 0, separate_scale)),
            _ => None,
        },
    }
}

/// The merged q/k norms: per head (`[head_dim]`, shared by all heads) the
/// two models' average; across heads, in the heads' layouts.
fn qk_norms(
    config: &DecoderConfig,
    blocks: &[Block; 2],
    queries: &UnitLayout,
    keys: &UnitLayout,
) -> Option<[Tensor; 2]> {
    let (Some([qa, ka]), Some([qb, kb])) = (&blocks[0].qk_norm, &blocks[1].qk_norm) else {
        return None;
    };
    let across = config
        .architecture
        .layout
        .attention
        .qk_norm
        .as_ref()
        .is_some_and(|n| n.across_heads);
    Some(if across {
        [
            queries.combine(qa, qb, 0, 1.0),
            keys.combine(ka, kb, 0, 1.0),
        ]
    } else {
        [(qa + qb) * 0.5, (ka + kb) * 0.5]
    })
}

/// PLeaS's initial model for layer `l`: aligned weights averaged in block
/// layout ([`combine_weight`]), each model's separate units copied; norms
/// and biases combined the same way.
pub(super) fn average_layer(
    l: usize,
    cx: &Context<'_>,
    weights: Pair<'_>,
    layouts: &LayerLayouts,
) -> Result<Vec<(String, Tensor)>> {
    let blocks = [
        Block::read(cx.config, l, weights[0])?,
        Block::read(cx.config, l, weights[1])?,
    ];
    let (queries, keys) = layouts.heads(cx.config);
    let (ffn, residual) = (&layouts.ffn, cx.residual);
    let average = |a: &LinearWeights, b: &LinearWeights, out: &UnitLayout, input: &UnitLayout| {
        LinearWeights {
            weight: combine_weight(out, input, &a.weight, &b.weight),
            bias: match (&a.bias, &b.bias) {
                (Some(x), Some(y)) => Some(out.combine(x, y, 0, 1.0)),
                _ => None,
            },
        }
    };
    let [a, b] = &blocks;
    let qkv = [0, 1, 2].map(|i| {
        let out = if i == 0 { &queries } else { &keys };
        average(&a.qkv[i], &b.qkv[i], out, residual)
    });
    let merged = Block {
        qkv,
        output: average(&a.output, &b.output, residual, &queries),
        mlp_input: a
            .mlp_input
            .iter()
            .zip(&b.mlp_input)
            .map(|(x, y)| average(x, y, ffn, residual))
            .collect(),
        mlp_output: average(&a.mlp_output, &b.mlp_output, residual, ffn),
        norms: [0, 1, 2, 3]
            .map(|slot| norms(&blocks, slot).map(|[x, y]| combine_norm(residual, x, y, 1.0))),
        qk_norm: qk_norms(cx.config, &blocks, &queries, &keys),
    };
    Ok(merged.write(cx.merged, l))
}

/// The merged embeddings: each model's own rows written into its own
/// stream (merged channels averaged). Where the family scales embeddings by
/// √hidden, the merged model's wider stream is compensated, so each model's
/// stream is what it was.
pub(super) fn embeddings(cx: &Context<'_>, weights: Pair<'_>) -> Result<Vec<(String, Tensor)>> {
    let name = format!("{}.weight", cx.config.architecture.layout.embedding);
    let (ea, eb) = (get(weights[0], &name)?, get(weights[1], &name)?);
    let mut merged = cx.residual.combine(ea, eb, 1, 1.0);
    if cx.config.architecture.layout.embedding_scaled {
        merged *= (cx.config.hidden_size as f64 / cx.merged.hidden_size as f64).sqrt();
    }
    Ok(vec![(name, merged)])
}

/// The final norm (and an untied head) without least squares: averaged in
/// the residual layout like every other tensor.
pub(super) fn average_ends(cx: &Context<'_>, weights: Pair<'_>) -> Result<Vec<(String, Tensor)>> {
    let layout = cx.config.architecture.layout;
    let [a, b] = weights.map(|w| final_norm(cx.config, w));
    let mut out = norm_tensors(&layout.final_norm, combine_norm(cx.residual, &a?, &b?, 1.0));
    if !cx.config.tie_word_embeddings {
        let name = format!("{}.weight", layout.head[0]);
        let (ha, hb) = (get(weights[0], &name)?, get(weights[1], &name)?);
        let vocab = UnitLayout::merged_only(ha.size()[0] as usize);
        out.push((name, combine_weight(&vocab, cx.residual, ha, hb)));
    }
    Ok(out)
}

fn final_norm(config: &DecoderConfig, tensors: &BTreeMap<String, Tensor>) -> Result<LinearWeights> {
    let stem = &config.architecture.layout.final_norm;
    Ok(LinearWeights {
        weight: get(tensors, &format!("{stem}.weight"))?.shallow_clone(),
        bias: tensors
            .get(&format!("{stem}.bias"))
            .map(Tensor::shallow_clone),
    })
}

fn norm_tensors(stem: &str, norm: LinearWeights) -> Vec<(String, Tensor)> {
    let mut out = vec![(format!("{stem}.weight"), norm.weight)];
    if let Some(bias) = norm.bias {
        out.push((format!("{stem}.bias"), bias));
    }
    out
}

/// A tied head reads the merged embeddings, which hold each model's
/// separate channels at full weight: the final norm is the aligned average
/// (of the scales the norms multiply by) with the separate channels' halved,
/// making the logits the average of the two models'.
pub(super) fn tied_final_norm(
    cx: &Context<'_>,
    weights: Pair<'_>,
) -> Result<Vec<(String, Tensor)>> {
    let math = NormMath::of(cx.config);
    let [a, b] = weights.map(|w| final_norm(cx.config, w));
    let (a, b) = (a?, b?);
    let scales = |n: &LinearWeights| LinearWeights {
        weight: math.scale(&n.weight),
        bias: n.bias.as_ref().map(Tensor::shallow_clone),
    };
    let mut merged = combine_norm(cx.residual, &scales(&a), &scales(&b), 0.5);
    merged.weight = math.stored(merged.weight);
    Ok(norm_tensors(
        &cx.config.architecture.layout.final_norm,
        merged,
    ))
}

/// Tokens per step of the head's least squares.
pub(super) const HEAD_CHUNK: i64 = 512;

/// The untied head fitted by least squares to the mean of the two models'
/// logits (before any soft cap), read from the final residual streams
/// (`[tokens, hidden]` per batch, B's aligned). The final norm's scale is
/// folded into each model's head; a LayerNorm's shift β becomes part of the
/// normalised stream (`n + β/γ`), which the merged final norm adds back.
pub(super) fn least_squares_head(
    cx: &Context<'_>,
    weights: Pair<'_>,
    streams: &[Vec<Tensor>; 2],
) -> Result<Vec<(String, Tensor)>> {
    let math = NormMath::of(cx.config);
    let layout = cx.config.architecture.layout;
    let name = format!("{}.weight", layout.head[0]);
    let norms = [
        final_norm(cx.config, weights[0])?,
        final_norm(cx.config, weights[1])?,
    ];
    let mut heads = vec![];
    for (w, norm) in weights.iter().zip(&norms) {
        heads.push(get(w, &name)? * math.scale(&norm.weight).unsqueeze(0));
    }
    let shifts: [Option<Tensor>; 2] = [0, 1].map(|m| {
        norms[m]
            .bias
            .as_ref()
            .map(|beta| beta / math.scale(&norms[m].weight))
    });
    let vocab = heads[0].size()[0] as usize;
    let residual = cx.residual;
    let mut head = NormalEquations::new(
        residual.width(),
        vocab,
        false,
        cx.options.kind,
        cx.options.device,
    );
    // In chunks of tokens: a vocabulary's worth of logits per token.
    for (a, b) in streams[0].iter().zip(&streams[1]) {
        for (a, b) in a.split(HEAD_CHUNK, 0).iter().zip(b.split(HEAD_CHUNK, 0)) {
            let n = [a, &b].map(|x| math.normalise(x));
            let n = [0, 1].map(|m| match &shifts[m] {
                Some(shift) => &n[m] + shift,
                None => n[m].shallow_clone(),
            });
            let input = residual.combine(&n[0], &n[1], 1, 1.0);
            let logits = (n[0].matmul(&heads[0].tr()) + n[1].matmul(&heads[1].tr())) * 0.5;
            head.add(&input, &logits);
        }
    }
    let solved = head.solve(residual.blocks(), [vocab, 0, 0], cx.options.ridge)?;
    let mut norm = math.identity(residual.width());
    if let [Some(sa), Some(sb)] = &shifts {
        norm.bias = Some(residual.combine(sa, sb, 0, 1.0));
    }
    let mut out = norm_tensors(&layout.final_norm, norm);
    out.push((name, solved.weight));
    Ok(out)
}
