//! Permutation symmetries as data: a group is a set of interchangeable units
//! (residual channels, FFN neurons, attention heads) and every tensor axis
//! they index; permuting all of a group's axes together leaves the network's
//! function unchanged.

use std::collections::BTreeMap;

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

/// The shape facts a Llama-family decoder's symmetries depend on.
#[derive(Debug, Clone)]
pub struct DecoderShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    /// FFN width per layer.
    pub ffn: Vec<usize>,
    /// A separate `lm_head.weight` (untied embeddings).
    pub untied_head: bool,
    pub rms_norm_eps: f64,
}

/// The permutation groups of a Llama-family decoder: one residual-stream
/// permutation shared by the whole network (RMSNorm is equivariant to it);
/// per layer, one FFN permutation shared by gate and up rows and down
/// columns; per layer, the KV heads (each moving with its group of query
/// heads), and within each GQA group the query heads — whole heads only, as
/// RoPE rotates pairs inside a head.
pub fn llama(shape: &DecoderShape) -> Vec<PermutationGroup> {
    let axis = |tensor: String, dim, offset, block| Axis {
        tensor,
        dim,
        offset,
        block,
    };
    let mut residual = vec![
        axis("model.embed_tokens.weight".into(), 1, 0, 1),
        axis("model.norm.weight".into(), 0, 0, 1),
    ];
    if shape.untied_head {
        residual.push(axis("lm_head.weight".into(), 1, 0, 1));
    }
    // The residual group comes first; its axes are collected on the way.
    let mut groups = vec![PermutationGroup {
        name: "residual".into(),
        units: shape.hidden,
        axes: vec![],
        parent: None,
    }];
    let (hd, per_group) = (shape.head_dim, shape.heads / shape.kv_heads);
    for (l, &ffn) in shape.ffn.iter().enumerate() {
        let name = |part: &str| format!("model.layers.{l}.{part}.weight");
        for reader in [
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ] {
            residual.push(axis(name(reader), 1, 0, 1));
        }
        for writer in [
            "self_attn.o_proj",
            "mlp.down_proj",
            "input_layernorm",
            "post_attention_layernorm",
        ] {
            residual.push(axis(name(writer), 0, 0, 1));
        }
        groups.push(PermutationGroup {
            name: format!("layers.{l}.ffn"),
            units: ffn,
            axes: vec![
                axis(name("mlp.gate_proj"), 0, 0, 1),
                axis(name("mlp.up_proj"), 0, 0, 1),
                axis(name("mlp.down_proj"), 1, 0, 1),
            ],
            parent: None,
        });
        let kv_group = groups.len();
        groups.push(PermutationGroup {
            name: format!("layers.{l}.kv_heads"),
            units: shape.kv_heads,
            axes: vec![
                axis(name("self_attn.q_proj"), 0, 0, per_group * hd),
                axis(name("self_attn.k_proj"), 0, 0, hd),
                axis(name("self_attn.v_proj"), 0, 0, hd),
                axis(name("self_attn.o_proj"), 1, 0, per_group * hd),
            ],
            parent: None,
        });
        for g in 0..shape.kv_heads {
            groups.push(PermutationGroup {
                name: format!("layers.{l}.group{g}.q_heads"),
                units: per_group,
                axes: vec![
                    axis(name("self_attn.q_proj"), 0, g * per_group * hd, hd),
                    axis(name("self_attn.o_proj"), 1, g * per_group * hd, hd),
                ],
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
