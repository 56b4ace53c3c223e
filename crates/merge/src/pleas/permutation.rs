//! Permutation symmetries as data: a group is a set of interchangeable units
//! (residual channels, FFN neurons, attention heads) and every tensor axis
//! they index; permuting all of a group's axes together leaves the network's
//! function unchanged.

use std::collections::{BTreeMap, BTreeSet};

use amalgam_checkpoint::decoder::RowSplit;
use amalgam_nn::DecoderConfig;

use tch::Tensor;

use crate::{MergeError, Result};

/// Where a group's units lie along one axis of one tensor: `units × block`
/// consecutive entries from `offset`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Axis {
    pub tensor: String,
    pub dim: usize,
    pub offset: usize,
    pub block: usize,
}

/// A set of interchangeable units and the axes they index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PermutationGroup {
    pub name: String,
    pub units: usize,
    pub axes: Vec<Axis>,
    /// `(group, unit)` when this group permutes units inside one unit of
    /// another group (the query heads of one KV head): it is applied after
    /// its parent, to whatever the parent moved to position `unit`.
    pub parent: Option<(usize, usize)>,
}

/// The sizes PLeaS's plan and alignment read off a decoder's config.
#[derive(Debug, Clone)]
pub struct DecoderShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// FFN width per layer.
    pub ffn: Vec<usize>,
    /// A separate output head (untied embeddings).
    pub untied_head: bool,
}

impl DecoderShape {
    pub fn of(config: &DecoderConfig) -> Self {
        DecoderShape {
            hidden: config.hidden_size,
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            head_dim: config.head_dim,
            ffn: config.intermediate_sizes.clone(),
            untied_head: !config.tie_word_embeddings,
        }
    }
}

/// The permutation groups of a decoder of any supported family, read from
/// its description (tensor names, fused layouts, biases, norms):
/// - one residual-stream permutation shared by the whole network (RMSNorm,
///   `(1 + w)` RMSNorm and LayerNorm are all equivariant to it): the
///   embeddings' columns, every reader's input columns, every writer's
///   output rows and biases, every norm on the stream (pre- and post-norms,
///   weights and biases), the untied head's columns;
/// - per layer, the FFN units: the rows (and biases) of gate and up, or of
///   each half of a fused `[gate; up]`, or of an ungated input; the output's
///   columns;
/// - per layer, the KV heads, each moving with its group of query heads:
///   q/k/v rows and biases (separate, `[q; k; v]`, or interleaved per head),
///   q/k norms that span all heads, the output's columns;
/// - within each KV group, its query heads.
///
/// Heads move whole (RoPE, partial or full, rotates pairs inside a head;
/// per-head q/k norms act on a head's dimensions, which never move).
pub fn decoder(config: &DecoderConfig) -> Vec<PermutationGroup> {
    let stored: BTreeSet<String> = config.parameters().into_iter().map(|p| p.name).collect();
    let layout = config.architecture.layout;
    let (heads, kv, hd) = config.attention_sizes();
    let (heads, kv, hd) = (heads as usize, kv as usize, hd as usize);
    let per_group = heads / kv;
    // `units × block` entries from `offset` of a tensor's weight, and of its
    // bias where the model has one.
    let axes = |stem: &str, dim: usize, offset: usize, block: usize| -> Vec<Axis> {
        ["weight", "bias"]
            .iter()
            .map(|suffix| format!("{stem}.{suffix}"))
            .filter(|name| stored.contains(name) && (dim == 0 || name.ends_with("weight")))
            .map(|tensor| Axis {
                tensor,
                dim,
                offset,
                block,
            })
            .collect()
    };
    let mut residual = axes(&layout.embedding, 1, 0, 1);
    residual.extend(axes(&layout.final_norm, 0, 0, 1));
    if !config.tie_word_embeddings {
        residual.extend(axes(&layout.head[0], 1, 0, 1));
    }
    // The residual group comes first; its axes are collected on the way.
    let mut groups = vec![PermutationGroup {
        name: "residual".into(),
        units: config.hidden_size,
        axes: vec![],
        parent: None,
    }];
    for (l, &ffn) in config.intermediate_sizes.iter().enumerate() {
        let names = config.block_names(l);
        for norm in names.norms.iter().flatten() {
            residual.extend(axes(norm, 0, 0, 1));
        }
        for reader in names.qkv.iter().chain(&names.mlp_input) {
            residual.extend(axes(reader, 1, 0, 1));
        }
        for writer in [&names.output, &names.mlp_output] {
            residual.extend(axes(writer, 0, 0, 1));
        }
        let mut ffn_axes = vec![];
        match layout.mlp.input.row_split(ffn as i64).ranges() {
            // Each half of a fused [gate; up].
            Some(parts) => {
                for part in parts {
                    ffn_axes.extend(axes(&names.mlp_input[0], 0, part.start, 1));
                }
            }
            None => {
                for input in &names.mlp_input {
                    ffn_axes.extend(axes(input, 0, 0, 1));
                }
            }
        }
        ffn_axes.extend(axes(&names.mlp_output, 1, 0, 1));
        groups.push(PermutationGroup {
            name: format!("layers.{l}.ffn"),
            units: ffn,
            axes: ffn_axes,
            parent: None,
        });
        // Each projection's rows of the KV groups: (stem, offset, rows per group).
        let rows = layout
            .attention
            .qkv
            .row_split(heads as i64, kv as i64, hd as i64);
        let interleaved = matches!(rows, RowSplit::PerHead { .. });
        let q_rows: Vec<(String, usize, usize)> = if interleaved {
            // [q_h; k_h; v_h] per head (no GQA): a head's three parts move together.
            vec![(names.qkv[0].clone(), 0, 3 * hd)]
        } else {
            // q's rows, alone or first in [q; k; v].
            vec![(names.qkv[0].clone(), 0, per_group * hd)]
        };
        let kv_rows: Vec<(String, usize, usize)> = match (&rows, rows.ranges()) {
            (RowSplit::Separate, _) => {
                vec![(names.qkv[1].clone(), 0, hd), (names.qkv[2].clone(), 0, hd)]
            }
            (_, Some(parts)) => parts[1..]
                .iter()
                .map(|part| (names.qkv[0].clone(), part.start, hd))
                .collect(),
            (_, None) => vec![],
        };
        let across = layout
            .attention
            .qk_norm
            .as_ref()
            .is_some_and(|n| n.across_heads);
        let mut kv_axes = vec![];
        for (stem, offset, block) in q_rows.iter().chain(&kv_rows) {
            kv_axes.extend(axes(stem, 0, *offset, *block));
        }
        if let (true, Some([q, k])) = (across, &names.qk_norm) {
            kv_axes.extend(axes(q, 0, 0, per_group * hd));
            kv_axes.extend(axes(k, 0, 0, hd));
        }
        kv_axes.extend(axes(&names.output, 1, 0, per_group * hd));
        let kv_group = groups.len();
        groups.push(PermutationGroup {
            name: format!("layers.{l}.kv_heads"),
            units: kv,
            axes: kv_axes,
            parent: None,
        });
        for g in 0..kv {
            let mut q_axes = vec![];
            let first = g * per_group * hd;
            // Interleaved: one query head per group, nothing moves inside it.
            if !interleaved {
                q_axes.extend(axes(&q_rows[0].0, 0, first, hd));
            }
            if let (true, Some([q, _])) = (across, &names.qk_norm) {
                q_axes.extend(axes(q, 0, first, hd));
            }
            q_axes.extend(axes(&names.output, 1, first, hd));
            groups.push(PermutationGroup {
                name: format!("layers.{l}.group{g}.q_heads"),
                units: per_group,
                axes: q_axes,
                parent: Some((kv_group, g)),
            });
        }
    }
    groups[0].axes = residual;
    groups
}

/// The permutation groups of a plain MLP whose layers are
/// `layers.{i}.weight` `[out, in]` and `layers.{i}.bias`, with `hidden[i]`
/// units between layer `i` and `i + 1` (elementwise activations commute
/// with permutations; the input and output features are fixed).
pub fn mlp(hidden: &[usize]) -> Vec<PermutationGroup> {
    let axis = |tensor: String, dim| Axis {
        tensor,
        dim,
        offset: 0,
        block: 1,
    };
    hidden
        .iter()
        .enumerate()
        .map(|(i, &units)| PermutationGroup {
            name: format!("hidden{i}"),
            units,
            axes: vec![
                axis(format!("layers.{i}.weight"), 0),
                axis(format!("layers.{i}.bias"), 0),
                axis(format!("layers.{}.weight", i + 1), 1),
            ],
            parent: None,
        })
        .collect()
}

/// The groups as far as they touch `tensors` (axes on other tensors
/// dropped): to permute a model one layer at a time.
pub fn restrict(
    groups: &[PermutationGroup],
    tensors: &BTreeMap<String, Tensor>,
) -> Vec<PermutationGroup> {
    groups
        .iter()
        .map(|g| PermutationGroup {
            axes: g
                .axes
                .iter()
                .filter(|a| tensors.contains_key(&a.tensor))
                .cloned()
                .collect(),
            ..g.clone()
        })
        .collect()
}

/// Applies one permutation per group (`perms[i]` maps new unit j to old unit
/// `perms[i][j]`) to the named tensors, in group order.
pub fn apply(
    tensors: &mut BTreeMap<String, Tensor>,
    groups: &[PermutationGroup],
    perms: &[Vec<usize>],
) -> Result<()> {
    if groups.len() != perms.len() {
        return Err(MergeError::Permutation(format!(
            "{} permutations for {} groups",
            perms.len(),
            groups.len()
        )));
    }
    for (group, perm) in groups.iter().zip(perms) {
        let mut seen = vec![false; group.units];
        if perm.len() != group.units
            || !perm
                .iter()
                .all(|&u| u < group.units && !std::mem::replace(&mut seen[u], true))
        {
            return Err(MergeError::Permutation(format!(
                "group {}: not a permutation of {} units",
                group.name, group.units
            )));
        }
        for axis in &group.axes {
            let tensor = tensors.get(&axis.tensor).ok_or_else(|| {
                MergeError::Permutation(format!("group {}: no tensor {}", group.name, axis.tensor))
            })?;
            let len = tensor.size()[axis.dim] as usize;
            let end = axis.offset + group.units * axis.block;
            if end > len {
                return Err(MergeError::Permutation(format!(
                    "group {}: {} has {len} entries along dimension {}, the group needs {end}",
                    group.name, axis.tensor, axis.dim
                )));
            }
            let mut index: Vec<i64> = (0..axis.offset as i64).collect();
            for &u in perm {
                let start = axis.offset + u * axis.block;
                index.extend(start as i64..(start + axis.block) as i64);
            }
            index.extend(end as i64..len as i64);
            let permuted = tensor.index_select(
                axis.dim as i64,
                &Tensor::from_slice(&index).to_device(tensor.device()),
            );
            tensors.insert(axis.tensor.clone(), permuted);
        }
    }
    Ok(())
}
