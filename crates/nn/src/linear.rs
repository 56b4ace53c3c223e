//! A linear layer's tensors, shared by the forward pass, PLeaS and
//! stitching, with the views they take of them: output rows, input
//! columns, and the parts of a fused projection.

use amalgam_checkpoint::decoder::RowSplit;
use tch::Tensor;

/// A weight `[out, in]` (or a norm's scale) and its bias, if the layer has one.
#[derive(Debug)]
pub struct LinearWeights {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

impl LinearWeights {
    /// The same tensors, shared.
    pub fn shallow_clone(&self) -> LinearWeights {
        LinearWeights {
            weight: self.weight.shallow_clone(),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// `x Wᵀ + b`.
    pub fn apply(&self, x: &Tensor) -> Tensor {
        x.linear(&self.weight, self.bias.as_ref())
    }

    /// Output rows `start..start + len` (a view: gradients reach the whole weight).
    pub fn rows(&self, start: i64, len: i64) -> LinearWeights {
        LinearWeights {
            weight: self.weight.narrow(0, start, len),
            bias: self.bias.as_ref().map(|b| b.narrow(0, start, len)),
        }
    }

    /// Input columns `..len`.
    pub fn columns(&self, len: i64) -> LinearWeights {
        LinearWeights {
            weight: self.weight.narrow(1, 0, len),
            bias: self.bias.as_ref().map(Tensor::shallow_clone),
        }
    }

    /// The parts of a fused projection stored as `rows` says.
    pub fn split(&self, rows: &RowSplit) -> Vec<LinearWeights> {
        let biases = self.bias.as_ref().map(|b| rows.split(b, 0));
        rows.split(&self.weight, 0)
            .into_iter()
            .enumerate()
            .map(|(i, weight)| LinearWeights {
                weight,
                bias: biases.as_ref().map(|b| b[i].shallow_clone()),
            })
            .collect()
    }

    /// The fused projection from its parts (the inverse of [`Self::split`]);
    /// a bias only where every part has one.
    pub fn join(parts: &[&LinearWeights], rows: &RowSplit) -> LinearWeights {
        let weights: Vec<&Tensor> = parts.iter().map(|p| &p.weight).collect();
        let biases: Option<Vec<&Tensor>> = parts.iter().map(|p| p.bias.as_ref()).collect();
        LinearWeights {
            weight: rows.join(&weights, 0),
            bias: biases.map(|b| rows.join(&b, 0)),
        }
    }
}
