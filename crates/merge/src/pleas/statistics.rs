//! Streaming statistics of two models' features at one site (a layer's FFN
//! units, its attention heads, a residual-stream boundary), from which both
//! activation-matching scores are read: the correlation of every pair of
//! units and their negative mean squared distance.

use tch::{Kind, Tensor};

/// How alike two units' activations are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Pearson correlation over the calibration tokens.
    Correlation,
    /// Negative mean squared difference (PLeaS's default `cdist` score).
    Distance,
}

/// Sums over tokens of `a`, `b`, `a²`, `b²` and `a bᵀ` (F64), for features
/// `a` `[n, units_a]` of model A and `b` `[n, units_b]` of model B.
pub struct CrossStats {
    tokens: f64,
    sum_a: Tensor,
    sum_b: Tensor,
    squares_a: Tensor,
    squares_b: Tensor,
    cross: Tensor,
}

impl CrossStats {
    pub fn new(a: &Tensor, b: &Tensor) -> Self {
        let a = a.to_kind(Kind::Double);
        let b = b.to_kind(Kind::Double);
        CrossStats {
            tokens: a.size()[0] as f64,
            sum_a: a.sum_dim_intlist(0, false, Kind::Double),
            sum_b: b.sum_dim_intlist(0, false, Kind::Double),
            squares_a: a.square().sum_dim_intlist(0, false, Kind::Double),
            squares_b: b.square().sum_dim_intlist(0, false, Kind::Double),
            cross: a.transpose(0, 1).matmul(&b),
        }
    }

    /// Adds another batch of features.
    pub fn add(&mut self, a: &Tensor, b: &Tensor) {
        let batch = CrossStats::new(a, b);
        self.tokens += batch.tokens;
        self.sum_a += batch.sum_a;
        self.sum_b += batch.sum_b;
        self.squares_a += batch.squares_a;
        self.squares_b += batch.squares_b;
        self.cross += batch.cross;
    }

    /// `[units_a, units_b]`: how alike A's unit i and B's unit j are.
    pub fn scores(&self, metric: Metric) -> Tensor {
        let n = self.tokens.max(1.0);
        let mean_a = &self.sum_a / n;
        let mean_b = &self.sum_b / n;
        match metric {
            Metric::Correlation => {
                let covariance = &self.cross / n - mean_a.unsqueeze(1) * mean_b.unsqueeze(0);
                // A unit that never varies correlates with nothing.
                let std = |squares: &Tensor, mean: &Tensor| {
                    (squares / n - mean.square()).clamp_min(0.0).sqrt() + 1e-12
                };
                covariance
                    / (std(&self.squares_a, &mean_a).unsqueeze(1)
                        * std(&self.squares_b, &mean_b).unsqueeze(0))
            }
            Metric::Distance => {
                -((&self.squares_a / n).unsqueeze(1) + (&self.squares_b / n).unsqueeze(0)
                    - &self.cross * (2.0 / n))
            }
        }
    }
}

/// Sums a `[units·block, units·block]` score matrix over the diagonal of
/// each `block × block` tile: the score of whole units (attention heads)
/// whose features are matched position by position.
pub fn block_diagonal_sums(scores: &Tensor, block: i64) -> Tensor {
    if block == 1 {
        return scores.shallow_clone();
    }
    let units = scores.size()[0] / block;
    scores
        .view([units, block, units, block])
        .diagonal(0, 1, 3)
        .sum_dim_intlist(-1, false, Kind::Double)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_agree_with_direct_formulas() {
        let a = Tensor::randn([50, 3], (Kind::Double, tch::Device::Cpu));
        let b = Tensor::randn([50, 4], (Kind::Double, tch::Device::Cpu));
        let mut stats = CrossStats::new(&a.narrow(0, 0, 20), &b.narrow(0, 0, 20));
        stats.add(&a.narrow(0, 20, 30), &b.narrow(0, 20, 30));
        let corr = Tensor::cat(&[a.transpose(0, 1), b.transpose(0, 1)], 0).corrcoef();
        let expected = corr.narrow(0, 0, 3).narrow(1, 3, 4);
        assert!(stats
            .scores(Metric::Correlation)
            .allclose(&expected, 1e-9, 1e-9, false));
        let distance = (a.unsqueeze(2) - b.unsqueeze(1))
            .square()
            .mean_dim(0, false, Kind::Double);
        assert!(stats
            .scores(Metric::Distance)
            .allclose(&-distance, 1e-9, 1e-9, false));
        let tiles = Tensor::arange(16, (Kind::Double, tch::Device::Cpu)).view([4, 4]);
        let heads = block_diagonal_sums(&tiles, 2);
        let expected = Tensor::from_slice(&[0.0 + 5.0, 2.0 + 7.0, 8.0 + 13.0, 10.0 + 15.0]);
        assert!(heads.view([-1]).equal(&expected));
    }
}
