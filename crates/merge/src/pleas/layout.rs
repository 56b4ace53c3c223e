//! Where each unit of a widened group sits in the merged model, and how the
//! two models' features and weights are put into that layout: B's features
//! into A's order (the matching's permutations), then both into blocks
//! `[merged | A-only | B-only]`.

use amalgam_nn::DecoderConfig;
use tch::Tensor;

use super::matching::group_index;
use super::permutation::{DecoderShape, PermutationGroup};
use crate::Result;
use amalgam_nn::least_squares;

/// One group's units in the merged model, in blocks `[merged | A-only |
/// B-only]`: the merged ones (A's unit indices, which after alignment are
/// also B's), then the separate ones taken once from A and once from B.
#[derive(Debug, Clone, PartialEq)]
pub struct UnitLayout {
    pub(super) merged: Vec<i64>,
    pub(super) separate: Vec<i64>,
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
    pub(super) fn merged_only(units: usize) -> Self {
        UnitLayout {
            merged: (0..units as i64).collect(),
            separate: vec![],
        }
    }

    pub fn width(&self) -> usize {
        self.merged.len() + 2 * self.separate.len()
    }

    /// The same layout over entries when each unit spans `block` consecutive ones.
    pub(super) fn expand(&self, block: usize) -> UnitLayout {
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

    pub(super) fn blocks(&self) -> least_squares::Blocks {
        let s = self.separate.len();
        [self.merged.len(), s, s]
    }

    /// `[merged average | A's separate | B's separate]` along `dim` of
    /// per-unit data of both models (features, or a weight's unit axis),
    /// the separate parts scaled by `separate_scale`.
    pub(super) fn combine(&self, a: &Tensor, b: &Tensor, dim: i64, separate_scale: f64) -> Tensor {
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
pub(super) fn combine_weight(
    out: &UnitLayout,
    input: &UnitLayout,
    a: &Tensor,
    b: &Tensor,
) -> Tensor {
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

/// One layer's layouts: its KV groups (each a KV head with its query heads)
/// and its FFN units.
pub(super) struct LayerLayouts {
    pub kv_groups: UnitLayout,
    pub ffn: UnitLayout,
}

impl LayerLayouts {
    /// Query-head and key/value-head entries (of the inputs' `config`),
    /// laid out by KV group.
    pub fn heads(&self, config: &DecoderConfig) -> (UnitLayout, UnitLayout) {
        let per_group = config.num_attention_heads / config.num_key_value_heads;
        (
            self.kv_groups.expand(per_group * config.head_dim),
            self.kv_groups.expand(config.head_dim),
        )
    }
}

/// Index vectors that put B's features of one layer into the aligned order.
pub(super) struct LayerIndex {
    residual: Tensor,
    ffn: Tensor,
    /// Every head's features (heads × head_dim entries).
    attention: Tensor,
    /// B's head at each aligned head position.
    pub heads: Vec<usize>,
}

impl LayerIndex {
    pub fn new(
        groups: &[PermutationGroup],
        perms: &[Vec<usize>],
        shape: &DecoderShape,
        layer: usize,
    ) -> Result<Self> {
        let index =
            |v: &[usize]| Tensor::from_slice(&v.iter().map(|&u| u as i64).collect::<Vec<_>>());
        let per_group = shape.heads / shape.kv_heads;
        let kv = &perms[group_index(groups, &format!("layers.{layer}.kv_heads"))?];
        let mut heads = vec![];
        for (position, &source) in kv.iter().enumerate() {
            let q =
                &perms[group_index(groups, &format!("layers.{layer}.group{position}.q_heads"))?];
            heads.extend(q.iter().map(|&head| source * per_group + head));
        }
        let entries: Vec<usize> = heads
            .iter()
            .flat_map(|&h| h * shape.head_dim..(h + 1) * shape.head_dim)
            .collect();
        Ok(LayerIndex {
            residual: index(&perms[group_index(groups, "residual")?]),
            ffn: index(&perms[group_index(groups, &format!("layers.{layer}.ffn"))?]),
            attention: index(&entries),
            heads,
        })
    }

    pub fn residual(&self, t: &Tensor) -> Tensor {
        by(t, &self.residual)
    }

    pub fn attention(&self, t: &Tensor) -> Tensor {
        by(t, &self.attention)
    }

    pub fn ffn(&self, t: &Tensor) -> Tensor {
        by(t, &self.ffn)
    }
}

/// `t`'s features `[tokens, width]` in the order `index`.
pub(super) fn by(t: &Tensor, index: &Tensor) -> Tensor {
    t.index_select(1, &index.to_device(t.device()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Kind;

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
}
