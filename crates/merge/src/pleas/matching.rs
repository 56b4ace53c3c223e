//! Finding the permutation of model B's units that lines them up with model
//! A's: activation matching (features on calibration data) and weight
//! matching (Git Re-Basin's coordinate descent). Both end in linear
//! assignment problems, solved by the `lsap` crate (SciPy's algorithm).

use std::collections::BTreeMap;

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Kind, Tensor};

use super::permutation::{apply, PermutationGroup};
use super::statistics::{block_diagonal_sums, CrossStats, Metric};
use crate::{MergeError, Result};

/// The assignment maximising the total score of a square `[n, n]` matrix:
/// row i is matched to column `result[i]`.
pub fn assign(scores: &Tensor) -> Result<Vec<usize>> {
    let n = scores.size()[0] as usize;
    let flat: Vec<f64> = Vec::try_from(scores.to_kind(Kind::Double).contiguous().view([-1]))
        .map_err(|e| MergeError::Permutation(format!("reading scores: {e}")))?;
    if flat.iter().any(|s| !s.is_finite()) {
        return Err(MergeError::Permutation(
            "matching scores are not finite (NaN or infinite activations)".into(),
        ));
    }
    let (rows, cols) = lsap::solve(n, n, &flat, true)
        .map_err(|e| MergeError::Permutation(format!("linear assignment failed: {e:?}")))?;
    let mut matched = vec![0; n];
    for (r, c) in rows.into_iter().zip(cols) {
        matched[r] = c;
    }
    Ok(matched)
}

/// Index of the group called `name`.
pub(crate) fn group_index(groups: &[PermutationGroup], name: &str) -> Result<usize> {
    groups
        .iter()
        .position(|g| g.name == name)
        .ok_or_else(|| MergeError::Permutation(format!("no permutation group {name}")))
}

/// Activation matching of one layer's groups (of
/// [`super::permutation::llama`]), written into `perms`: the FFN units on
/// act(gate)·up; the attention heads two-level — query heads within each
/// pair of KV groups (position by position within a head), then KV groups on
/// those totals. (The residual stream, shared by every layer, is matched on
/// the sum of its scores over every block boundary, before the layers.)
pub fn match_layer(
    groups: &[PermutationGroup],
    layer: usize,
    ffn: &CrossStats,
    attention: &CrossStats,
    metric: Metric,
    head_dim: usize,
    perms: &mut [Vec<usize>],
) -> Result<()> {
    let l = layer;
    perms[group_index(groups, &format!("layers.{l}.ffn"))?] = assign(&ffn.scores(metric))?;
    let kv_index = group_index(groups, &format!("layers.{l}.kv_heads"))?;
    let kv = groups[kv_index].units as i64;
    let heads = block_diagonal_sums(&attention.scores(metric), head_dim as i64);
    let per_group = heads.size()[0] / kv;
    // inner[ga][gb]: the best query-head matching between two KV groups.
    let mut inner = vec![vec![(0.0, vec![]); kv as usize]; kv as usize];
    for (ga, row) in inner.iter_mut().enumerate() {
        for (gb, cell) in row.iter_mut().enumerate() {
            let block = heads.narrow(0, ga as i64 * per_group, per_group).narrow(
                1,
                gb as i64 * per_group,
                per_group,
            );
            let matched = assign(&block)?;
            let total: f64 = matched
                .iter()
                .enumerate()
                .map(|(i, &j)| block.double_value(&[i as i64, j as i64]))
                .sum();
            *cell = (total, matched);
        }
    }
    let outer: Vec<f64> = inner.iter().flatten().map(|(s, _)| *s).collect();
    let kv_perm = assign(&Tensor::from_slice(&outer).view([kv, kv]))?;
    for (position, &gb) in kv_perm.iter().enumerate() {
        let q = group_index(groups, &format!("layers.{l}.group{position}.q_heads"))?;
        perms[q] = inner[position][gb].1.clone();
    }
    perms[kv_index] = kv_perm;
    Ok(())
}

/// `tensor`'s entries along one group axis as rows: `[units, rest]`.
fn unfold(tensor: &Tensor, dim: usize, offset: usize, units: usize, block: usize) -> Tensor {
    tensor
        .narrow(dim as i64, offset as i64, (units * block) as i64)
        .movedim([dim as i64], [0])
        .reshape([units as i64, -1])
        .to_kind(Kind::Double)
}

/// Git Re-Basin's weight matching: coordinate descent over the groups (in
/// a seeded random order each sweep), each step solving the assignment
/// that maximises Σ ⟨A, permuted B⟩ over the group's axes with every other
/// group held fixed; stops when a sweep improves nothing (or after
/// `max_sweeps`). Data-free.
pub fn weight_matching(
    groups: &[PermutationGroup],
    a: &BTreeMap<String, Tensor>,
    b: &BTreeMap<String, Tensor>,
    seed: u64,
    max_sweeps: usize,
) -> Result<Vec<Vec<usize>>> {
    let mut perms: Vec<Vec<usize>> = groups.iter().map(|g| (0..g.units).collect()).collect();
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut order: Vec<usize> = (0..groups.len()).collect();
    // B under the current permutations, kept up to date one group at a time.
    let mut current: BTreeMap<String, Tensor> = b
        .iter()
        .map(|(name, t)| (name.clone(), t.shallow_clone()))
        .collect();
    for _ in 0..max_sweeps {
        order.shuffle(&mut rng);
        let mut improved = false;
        for &g in &order {
            let group = &groups[g];
            let mut similarity = Tensor::zeros(
                [group.units as i64, group.units as i64],
                (Kind::Double, tch::Device::Cpu),
            );
            for axis in &group.axes {
                let fold = |t: &BTreeMap<String, Tensor>| -> Result<Tensor> {
                    let tensor = t.get(&axis.tensor).ok_or_else(|| {
                        MergeError::Permutation(format!("no tensor {}", axis.tensor))
                    })?;
                    Ok(unfold(
                        tensor,
                        axis.dim,
                        axis.offset,
                        group.units,
                        axis.block,
                    ))
                };
                similarity += fold(a)?.matmul(&fold(&current)?.transpose(0, 1));
            }
            // similarity[i][k]: A's unit i against what now sits at position k.
            let moves = assign(&similarity)?;
            let score = |m: &[usize]| -> f64 {
                m.iter()
                    .enumerate()
                    .map(|(i, &k)| similarity.double_value(&[i as i64, k as i64]))
                    .sum()
            };
            let identity: Vec<usize> = (0..group.units).collect();
            if score(&moves) <= score(&identity) + 1e-12 {
                continue;
            }
            improved = true;
            // Moving this group's units moves everything nested in them too
            // (a KV head's query heads lie inside its rows).
            apply(
                &mut current,
                std::slice::from_ref(group),
                std::slice::from_ref(&moves),
            )?;
            perms[g] = moves.iter().map(|&k| perms[g][k]).collect();
            // Groups nested in a moved unit travel with it.
            let children: Vec<(usize, usize)> = groups
                .iter()
                .enumerate()
                .filter_map(|(c, child)| match child.parent {
                    Some((p, unit)) if p == g => Some((c, unit)),
                    _ => None,
                })
                .collect();
            let previous: BTreeMap<usize, Vec<usize>> = children
                .iter()
                .map(|&(c, unit)| (unit, perms[c].clone()))
                .collect();
            for &(c, unit) in &children {
                perms[c] = previous[&moves[unit]].clone();
            }
        }
        if !improved {
            break;
        }
    }
    Ok(perms)
}

/// The scores `[units]` of the pairs a permutation matched: A's unit i
/// against B's unit `perm[i]`.
pub fn matched_scores(scores: &Tensor, perm: &[usize]) -> Vec<f64> {
    perm.iter()
        .enumerate()
        .map(|(i, &j)| scores.double_value(&[i as i64, j as i64]))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn assignment_maximises_the_total() {
        let scores =
            Tensor::from_slice(&[1.0, 5.0, 0.0, 4.0, 1.0, 0.0, 0.0, 0.0, 2.0]).view([3, 3]);
        assert_eq!(assign(&scores).unwrap(), vec![1, 0, 2]);
        let nan = Tensor::from_slice(&[f64::NAN, 1.0, 1.0, 0.0]).view([2, 2]);
        assert!(assign(&nan).is_err());
    }
}
