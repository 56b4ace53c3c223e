//! Linear layers fitted in closed form: the normal equations of `Y ≈ XWᵀ + b`,
//! accumulated batch by batch and solved with a ridge relative to the inputs'
//! scale. PLeaS fits every layer of a merged model this way, stitching its
//! stitching layers; one implementation, one meaning of `ridge`.
//!
//! Inputs and outputs may be laid out in blocks `[merged | A-only | B-only]`
//! (PLeaS's partial merges; a plain fit is one block `[n, 0, 0]`). An A-only
//! output must not read B-only inputs (and vice versa): those two blocks are
//! zero by construction, because each output block is solved only from the
//! inputs it may read — merged outputs from all inputs, A-only outputs from
//! `[merged | A-only]`, B-only from `[merged | B-only]`.
//!
//! A layer with a bias is solved with a constant input (unpenalised) that
//! every output block reads.

use tch::{Kind, Tensor};

use crate::linear::LinearWeights;
use crate::{NnError, Result};

/// Columns per block of the blocked `XᵀX` product.
const GRAM_BLOCK: i64 = 1024;

/// Sizes of a side's `[merged, A-only, B-only]` blocks.
pub type Blocks = [usize; 3];

/// The normal equations of one layer, accumulated batch by batch:
/// `XᵀX` `[in, in]` and `XᵀY` `[in, out]`.
pub struct NormalEquations {
    gram: Tensor,
    cross: Tensor,
    kind: Kind,
    /// The last input is the constant 1 (the layer has a bias).
    bias: bool,
}

impl NormalEquations {
    /// Empty equations in `kind` (F32 or F64) for `inputs` → `outputs`
    /// features, with a bias or without.
    pub fn new(inputs: usize, outputs: usize, bias: bool, kind: Kind, device: tch::Device) -> Self {
        let rows = (inputs + bias as usize) as i64;
        NormalEquations {
            gram: Tensor::zeros([rows, rows], (kind, device)),
            cross: Tensor::zeros([rows, outputs as i64], (kind, device)),
            kind,
            bias,
        }
    }

    /// Adds a batch: inputs `[n, in]`, targets `[n, out]` (moved to the
    /// equations' device).
    pub fn add(&mut self, x: &Tensor, y: &Tensor) {
        let device = self.gram.device();
        let mut x = x.to_device(device).to_kind(self.kind);
        if self.bias {
            let ones = Tensor::ones([x.size()[0], 1], (self.kind, x.device()));
            x = Tensor::cat(&[x, ones], 1);
        }
        let xt = x.transpose(0, 1).contiguous();
        self.cross += xt.matmul(&y.to_device(device).to_kind(self.kind));
        // XᵀX is symmetric: its upper block triangle is computed and
        // mirrored (about half the products for a wide layer, and an
        // exactly symmetric matrix for the Cholesky solve).
        let width = xt.size()[0];
        for i in (0..width).step_by(GRAM_BLOCK as usize) {
            let rows = xt.narrow(0, i, GRAM_BLOCK.min(width - i));
            for j in (i..width).step_by(GRAM_BLOCK as usize) {
                let columns = xt.narrow(0, j, GRAM_BLOCK.min(width - j));
                let mut product = rows.matmul(&columns.transpose(0, 1));
                if j == i {
                    // A GEMM's diagonal block need not be exactly symmetric
                    // (BLAS kernels sum (a, b) and (b, a) differently): mirror its upper triangle.
                    let upper = product.triu(0);
                    product = &upper + upper.triu(1).transpose(0, 1);
                }
                let (n, m) = (product.size()[0], product.size()[1]);
                let mut upper = self.gram.narrow(0, i, n).narrow(1, j, m);
                upper += &product;
                if j != i {
                    let mut lower = self.gram.narrow(0, j, m).narrow(1, i, n);
                    lower += product.transpose(0, 1);
                }
            }
        }
    }

    /// The weight `[out, in]` (F32, on the CPU) minimising ‖XWᵀ + b − Y‖² + λ‖W‖²
    /// blockwise, with λ = `ridge` × the mean diagonal of `XᵀX` (scale-free;
    /// the bias is not penalised), and the A-only × B-only blocks exactly
    /// zero; with its bias if the equations have one.
    pub fn solve(&self, inputs: Blocks, outputs: Blocks, ridge: f64) -> Result<LinearWeights> {
        self.solve_columns(inputs, 0, outputs, ridge)
    }

    /// [`NormalEquations::solve`] for the outputs from column `first` on
    /// (several weights reading the same inputs share one `XᵀX`).
    pub fn solve_columns(
        &self,
        inputs: Blocks,
        first: usize,
        outputs: Blocks,
        ridge: f64,
    ) -> Result<LinearWeights> {
        let n_in: usize = inputs.iter().sum::<usize>() + self.bias as usize;
        let n_out: usize = outputs.iter().sum();
        if self.gram.size() != [n_in as i64, n_in as i64]
            || self.cross.size()[0] != n_in as i64
            || self.cross.size()[1] < (first + n_out) as i64
        {
            return Err(NnError::Invalid(format!(
                "least squares: blocks {inputs:?} → {outputs:?} do not fit equations {:?} → {:?}",
                self.gram.size(),
                self.cross.size()
            )));
        }
        let starts = |b: Blocks| [0, b[0], b[0] + b[1]];
        let (in_at, out_at) = (starts(inputs), starts(outputs));
        let range = |at: usize, len: usize| (at as i64..(at + len) as i64).collect::<Vec<_>>();
        let device = self.gram.device();
        let weight = Tensor::zeros([n_out as i64, n_in as i64], (self.kind, device));
        let constant = (n_in - 1) as i64;
        for (o, readable) in [[0, 1, 2], [0, 1, usize::MAX], [0, usize::MAX, 2]]
            .into_iter()
            .enumerate()
        {
            if outputs[o] == 0 {
                continue;
            }
            let mut columns: Vec<i64> = readable
                .iter()
                .filter(|&&i| i != usize::MAX)
                .flat_map(|&i| range(in_at[i], inputs[i]))
                .collect();
            let penalised = columns.len() as i64;
            if self.bias {
                columns.push(constant);
            }
            if columns.is_empty() {
                continue;
            }
            let index = Tensor::from_slice(&columns).to_device(device);
            let gram = self.gram.index_select(0, &index).index_select(1, &index);
            let cross = self.cross.index_select(0, &index).narrow(
                1,
                (first + out_at[o]) as i64,
                outputs[o] as i64,
            );
            let size = columns.len() as i64;
            let diagonal = gram.diagonal(0, 0, 1).narrow(0, 0, penalised);
            let scale = f64::max(diagonal.mean(self.kind).double_value(&[]), 1e-12);
            let penalty = Tensor::zeros([size], (self.kind, device));
            let _ = penalty.narrow(0, 0, penalised).fill_(ridge * scale);
            let regularised = gram + penalty.diag(0);
            // Cholesky (half LU's work) while the system is positive
            // definite; LU when it is not (no ridge, dependent inputs).
            let (factor, info) = regularised.linalg_cholesky_ex(false, false);
            let solution = if info.int64_value(&[]) == 0 {
                cross.cholesky_solve(&factor, false)
            } else {
                Tensor::f_linalg_solve(&regularised, &cross, true)
                    .map_err(|e| NnError::Invalid(format!("least squares: solve failed ({e})")))?
            };
            // A view of the output block's rows; the solution lands in the
            // columns it was solved for, the rest stay zero.
            let mut rows = weight.narrow(0, out_at[o] as i64, outputs[o] as i64);
            let _ = rows.index_copy_(1, &index, &solution.transpose(0, 1));
        }
        let weight = weight.to_kind(Kind::Float).to_device(tch::Device::Cpu);
        Ok(if self.bias {
            LinearWeights {
                bias: Some(weight.select(1, constant).contiguous()),
                weight: weight.narrow(1, 0, constant).contiguous(),
            }
        } else {
            LinearWeights { weight, bias: None }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tch::Device;

    fn randn(shape: &[i64]) -> Tensor {
        Tensor::randn(shape, (Kind::Double, Device::Cpu))
    }

    #[test]
    fn block_solution_recovers_a_block_weight_and_keeps_cross_blocks_zero() {
        tch::manual_seed(3);
        let (inputs, outputs) = ([3, 2, 4], [2, 3, 1]);
        let truth = randn(&[6, 9]);
        // The A-only × B-only blocks of the true weight are zero.
        let _ = truth.narrow(0, 2, 3).narrow(1, 5, 4).zero_();
        let _ = truth.narrow(0, 5, 1).narrow(1, 3, 2).zero_();
        let mut equations = NormalEquations::new(9, 6, false, Kind::Double, Device::Cpu);
        for _ in 0..3 {
            let x = randn(&[40, 9]);
            equations.add(&x, &x.matmul(&truth.transpose(0, 1)));
        }
        let weight = equations.solve(inputs, outputs, 0.0).unwrap().weight;
        assert!(weight
            .to_kind(Kind::Double)
            .allclose(&truth, 1e-5, 1e-5, false));
        // With noisy targets the cross blocks are still exactly zero.
        let mut noisy = NormalEquations::new(9, 6, false, Kind::Float, Device::Cpu);
        noisy.add(&randn(&[50, 9]), &randn(&[50, 6]));
        let weight = noisy.solve(inputs, outputs, 1e-3).unwrap().weight;
        assert_eq!(
            weight
                .narrow(0, 2, 3)
                .narrow(1, 5, 4)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_eq!(
            weight
                .narrow(0, 5, 1)
                .narrow(1, 3, 2)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert_ne!(
            weight
                .narrow(0, 0, 2)
                .abs()
                .sum(Kind::Float)
                .double_value(&[]),
            0.0
        );
        assert!(noisy.solve([9, 0, 0], [7, 0, 0], 0.0).is_err());
    }

    #[test]
    fn the_blocked_gram_is_the_plain_product_and_cholesky_solves_as_lu() {
        tch::manual_seed(5);
        let width = 2 * GRAM_BLOCK as usize + 37;
        let mut equations = NormalEquations::new(width, 3, true, Kind::Double, Device::Cpu);
        let (x, y) = (randn(&[40, width as i64]), randn(&[40, 3]));
        equations.add(&x, &y);
        let z = Tensor::cat(
            &[
                x.shallow_clone(),
                Tensor::ones([40, 1], (Kind::Double, Device::Cpu)),
            ],
            1,
        );
        let plain = z.transpose(0, 1).matmul(&z);
        let error = (&equations.gram - &plain).abs().max().double_value(&[]);
        assert!(error < 1e-9, "gram off by {error}");
        assert!(equations.gram.equal(&equations.gram.transpose(0, 1)));
        // More inputs than samples: positive definite only with the ridge.
        let ridge = 1e-3;
        let solved = equations.solve([width, 0, 0], [3, 0, 0], ridge).unwrap();
        let scale = plain
            .diagonal(0, 0, 1)
            .narrow(0, 0, width as i64)
            .mean(Kind::Double);
        let mut penalty = vec![ridge * scale.double_value(&[]); width];
        penalty.push(0.0);
        let lu = Tensor::linalg_solve(
            &(plain + Tensor::from_slice(&penalty).diag(0)),
            &z.transpose(0, 1).matmul(&y),
            true,
        );
        let expected = lu.narrow(0, 0, width as i64).transpose(0, 1);
        let error = (solved.weight.to_kind(Kind::Double) - expected)
            .abs()
            .max()
            .double_value(&[]);
        assert!(error < 1e-5, "solution off by {error}");
    }

    #[test]
    fn a_bias_is_recovered_and_not_penalised() {
        tch::manual_seed(4);
        let (weight, bias) = (randn(&[3, 5]), randn(&[3]) * 10.0);
        let mut equations = NormalEquations::new(5, 3, true, Kind::Double, Device::Cpu);
        let x = randn(&[60, 5]);
        equations.add(&x, &(x.matmul(&weight.transpose(0, 1)) + &bias));
        let solved = equations.solve([5, 0, 0], [3, 0, 0], 0.0).unwrap();
        assert!(solved
            .weight
            .to_kind(Kind::Double)
            .allclose(&weight, 1e-5, 1e-5, false));
        let found = solved.bias.unwrap().to_kind(Kind::Double);
        assert!(found.allclose(&bias, 1e-4, 1e-4, false));
        // A ridge shrinks the weight, not the bias: the mean output survives.
        let shrunk = equations.solve([5, 0, 0], [3, 0, 0], 10.0).unwrap();
        let mean = |t: &Tensor| t.mean(Kind::Double).double_value(&[]);
        let x_mean = x.mean_dim(0, false, Kind::Double);
        let predicted = shrunk.weight.to_kind(Kind::Double).mv(&x_mean)
            + shrunk.bias.unwrap().to_kind(Kind::Double);
        let expected = weight.mv(&x_mean) + &bias;
        assert!((mean(&predicted) - mean(&expected)).abs() < 1e-3);
    }
}
