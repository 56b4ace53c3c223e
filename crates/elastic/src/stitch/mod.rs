//! SN-Net stitching: run the first blocks of one anchor, map its residual
//! stream with a linear layer (with bias) into another anchor's stream, and
//! run that anchor's remaining blocks — one network per (front anchor, cut,
//! end anchor, resume) route. The stitching layers start from least squares
//! on calibration activations ([`calibrate`]: streamed, one block in memory).

mod calibrate;
mod family;
mod job;

use std::ops::Range;

use amalgam_nn::linear::LinearWeights;
use amalgam_nn::Decoder;
use tch::{Kind, Tensor};

pub use calibrate::{calibrate, AnchorParts, CalibrationPlan};
pub use family::{
    members, save_family, training_memory, AnchorOut, MemberScorer, Network, StitchedFamily,
    StitchedMember, FAMILY_FILE,
};
pub use job::{StitchJob, StitchProgress};

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

    /// The stitch of a fitted linear layer with its bias.
    pub fn from_linear(linear: LinearWeights) -> Self {
        let bias = linear.bias.unwrap_or_else(|| {
            Tensor::zeros(
                [linear.weight.size()[0]],
                (Kind::Float, linear.weight.device()),
            )
        });
        Stitch {
            weight: linear.weight,
            bias,
        }
    }

    /// The end anchor's stream (in `kind`) from the front's `x`, computed in
    /// the front stream's dtype (a BF16 route stays in BF16).
    pub fn apply(&self, x: &Tensor, kind: Kind) -> Tensor {
        let at = |t: &Tensor| t.to_kind(x.kind());
        x.linear(&at(&self.weight), Some(&at(&self.bias)))
            .to_kind(kind)
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
    let x = stitch.apply(&x, end.kind());
    end.head(&end.blocks(x, route.resume..end.config.intermediate_sizes.len()))
}

/// Every stitched route between two anchors `depths` blocks deep, both
/// ways (front 0 → end 1 and front 1 → end 0), at SN-Net's positions.
pub fn family_routes(depths: [usize; 2]) -> Vec<Route> {
    let mut routes = vec![];
    for (front, end) in [(0, 1), (1, 0)] {
        for (cut, resume) in positions(depths[front], depths[end]) {
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
    fn positions_follow_relative_depth() {
        // Equal depths: each cut resumes at the same block or the one before.
        assert_eq!(positions(4, 4), [(1, 1), (2, 1), (2, 2), (3, 2), (3, 3)]);
        // 3 → 4 blocks: cut 1 → 4/3 ≈ 1, cut 2 → 8/3 ≈ 3.
        assert_eq!(positions(3, 4), [(1, 1), (2, 2), (2, 3)]);
        assert_eq!(positions(4, 3), [(1, 1), (2, 1), (2, 2), (3, 1), (3, 2)]);
    }
}
