//! SN-Net stitching: run the first blocks of one anchor, map its residual
//! stream with a linear layer (with bias) into another anchor's stream, and
//! run that anchor's remaining blocks — one network per (front anchor, cut,
//! end anchor, resume) route. The stitching layers start from least squares
//! on calibration activations.

mod family;

use std::ops::Range;

use amalgam_nn::Decoder;
use tch::{Kind, Tensor};

use crate::{ElasticError, Result};

pub use family::{Family, Member, Network, Scorer, FAMILY_FILE};

/// A linear map with bias from one residual stream to another.
#[derive(Debug)]
pub struct Stitch {
    /// `[end width, front width]`.
    pub weight: Tensor,
    /// `[end width]`.
    pub bias: Tensor,
}

impl Stitch {
    /// The identity on a stream `width` wide (a stitch from an anchor to itself).
    pub fn identity(width: usize) -> Self {
        Stitch {
            weight: Tensor::eye(width as i64, (Kind::Float, tch::Device::Cpu)),
            bias: Tensor::zeros([width as i64], (Kind::Float, tch::Device::Cpu)),
        }
    }

    /// The least-squares stitch from `x` `[n, front]` to `y` `[n, end]`:
    /// `[x 1]·A ≈ y`, solved in F64 from the normal equations with `ridge`
    /// added to the diagonal (0: plain least squares; the bias column is not
    /// penalised), as SN-Net's pseudo-inverse initialisation does.
    pub fn fit(x: &Tensor, y: &Tensor, ridge: f64) -> Result<Self> {
        let (n, front) = (x.size()[0], x.size()[1]);
        if y.size()[0] != n {
            return Err(ElasticError::Stitch(format!(
                "{n} front rows but {} end rows",
                y.size()[0]
            )));
        }
        let x = x.to_kind(Kind::Double);
        let y = y.to_kind(Kind::Double);
        let z = Tensor::cat(&[x, Tensor::ones([n, 1], (Kind::Double, y.device()))], 1);
        let mut gram = z.transpose(0, 1).matmul(&z);
        if ridge > 0.0 {
            let mut penalty = vec![ridge; front as usize];
            penalty.push(0.0);
            gram += Tensor::from_slice(&penalty).to_device(y.device()).diag(0);
        }
        let rhs = z.transpose(0, 1).matmul(&y);
        let solution = Tensor::f_linalg_solve(&gram, &rhs, true)
            .map_err(|e| ElasticError::Stitch(format!("least squares failed: {e}")))?;
        Ok(Stitch {
            weight: solution
                .narrow(0, 0, front)
                .transpose(0, 1)
                .to_kind(Kind::Float)
                .contiguous(),
            bias: solution.get(front).to_kind(Kind::Float),
        })
    }

    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, Some(&self.bias))
    }
}

/// One network of a stitched family: `front`'s blocks `0..cut`, the stitch,
/// then `end`'s blocks `resume..`. Anchors are indices into the family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub front: usize,
    pub cut: usize,
    pub end: usize,
    pub resume: usize,
}

/// The logits of `route` through `stitch`.
pub fn stitched_logits(anchors: &[Decoder], route: Route, stitch: &Stitch, ids: &Tensor) -> Tensor {
    let (front, end) = (&anchors[route.front], &anchors[route.end]);
    let x = front.blocks(front.embed(ids), 0..route.cut);
    let x = stitch.apply(&x);
    end.head(&end.blocks(x, route.resume..end.config.intermediate_sizes.len()))
}

/// Every stitched route between two anchors, both ways (front 0 → end 1 and
/// front 1 → end 0), at SN-Net's positions.
pub fn family_routes(anchors: &[Decoder]) -> Vec<Route> {
    let depth = |a: usize| anchors[a].config.intermediate_sizes.len();
    let mut routes = vec![];
    for (front, end) in [(0, 1), (1, 0)] {
        for (cut, resume) in positions(depth(front), depth(end)) {
            routes.push(Route {
                front,
                cut,
                end,
                resume,
            });
        }
    }
    routes
}

/// Least-squares stitching layers for `routes`, from the anchors' residual
/// streams on the calibration batch `ids` (each anchor runs once).
pub fn calibrate(
    anchors: &[Decoder],
    routes: &[Route],
    ids: &Tensor,
    ridge: f64,
) -> Result<Vec<Stitch>> {
    let streams: Vec<Vec<Tensor>> = tch::no_grad(|| {
        anchors
            .iter()
            .map(|a| {
                let (_, taps) = a.forward_taps(ids);
                taps.residual
                    .iter()
                    .map(|r| r.reshape([-1, r.size()[2]]))
                    .collect()
            })
            .collect()
    });
    routes
        .iter()
        .map(|r| Stitch::fit(&streams[r.front][r.cut], &streams[r.end][r.resume], ridge))
        .collect()
}

/// SN-Net's stitch positions between a front anchor `front_depth` blocks deep
/// and an end anchor `end_depth` deep: each cut after 1..front_depth−1 blocks
/// maps to the end anchor's block at the same relative depth (nearest
/// interpolation, `round(cut · end / front)`), and — as SN-Net's window of two
/// blocks does — also to the block before it; resumes keep at least one end
/// block and skip none of the front's (`resume ≥ 1`).
pub fn positions(front_depth: usize, end_depth: usize) -> Vec<(usize, usize)> {
    let mut out = vec![];
    for cut in 1..front_depth {
        let nearest = ((cut * end_depth) as f64 / front_depth as f64).round() as usize;
        let window: Range<usize> = nearest.saturating_sub(1).max(1)..(nearest + 1).min(end_depth);
        for resume in window {
            out.push((cut, resume));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn least_squares_recovers_an_affine_map() {
        let x = Tensor::randn([200, 6], (Kind::Double, tch::Device::Cpu));
        let w = Tensor::randn([4, 6], (Kind::Double, tch::Device::Cpu));
        let b = Tensor::randn([4], (Kind::Double, tch::Device::Cpu));
        let y = x.linear(&w, Some(&b));
        let stitch = Stitch::fit(&x, &y, 0.0).unwrap();
        let error = (&stitch.weight.to_kind(Kind::Double) - &w)
            .abs()
            .max()
            .double_value(&[]);
        assert!(error < 1e-5, "weight off by {error}");
        let error = (&stitch.bias.to_kind(Kind::Double) - &b)
            .abs()
            .max()
            .double_value(&[]);
        assert!(error < 1e-5, "bias off by {error}");
    }

    #[test]
    fn positions_follow_relative_depth() {
        // Equal depths: each cut resumes at the same block or the one before.
        assert_eq!(positions(4, 4), [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]);
        // 3 → 4 blocks: cut 1 → 4/3 ≈ 1, cut 2 → 8/3 ≈ 3.
        assert_eq!(positions(3, 4), [(1, 1), (2, 2), (2, 3)]);
        assert_eq!(positions(4, 3), [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]);
    }
}
