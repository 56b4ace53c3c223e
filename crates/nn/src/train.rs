//! Training: AdamW with linear warm-up and cosine decay, gradient-norm
//! clipping, random windows from a seeded sampler. With the same seed, data
//! and thread count, two runs give the same weights.

use tch::nn::{self, OptimizerConfig};
use tch::{Kind, Tensor};

use crate::data::Sampler;
use crate::{Decoder, Result};

/// How long and how hard to train.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainOptions {
    pub steps: usize,
    pub batch: usize,
    /// Tokens per sequence (the model sees `seq_len − 1` inputs per row).
    pub seq_len: usize,
    pub lr: f64,
    pub warmup: usize,
    /// The learning rate at the end of the cosine, as a fraction of `lr`.
    pub final_lr_fraction: f64,
    pub weight_decay: f64,
    /// Global gradient-norm limit.
    pub clip: f64,
    /// MatFormer training: each step's loss is the sum of the nested
    /// submodels' losses at these fractions of every FFN width. Empty: the
    /// whole model only.
    pub nested: Vec<f64>,
}

impl TrainOptions {
    /// Linear warm-up to `lr`, then a cosine down to `lr · final_lr_fraction`.
    pub fn lr_at(&self, step: usize) -> f64 {
        if step < self.warmup {
            return self.lr * (step + 1) as f64 / self.warmup as f64;
        }
        let span = (self.steps - self.warmup).max(1) as f64;
        let progress = ((step - self.warmup) as f64 / span).min(1.0);
        let cosine = 0.5 * (1.0 + (std::f64::consts::PI * progress).cos());
        self.lr * (self.final_lr_fraction + (1.0 - self.final_lr_fraction) * cosine)
    }
}

/// Trains `model` in place; `on_step(step, loss)` after every step. Returns
/// the loss of every step.
pub fn train(
    model: &mut Decoder,
    sampler: &mut Sampler,
    options: &TrainOptions,
    on_step: &mut dyn FnMut(usize, f64),
) -> Result<Vec<f64>> {
    let mut optimizer = nn::AdamW {
        beta1: 0.9,
        beta2: 0.95,
        wd: options.weight_decay,
        eps: 1e-8,
        amsgrad: false,
    }
    .build(&model.vs, options.lr)?;
    let mut losses = Vec::with_capacity(options.steps);
    for step in 0..options.steps {
        optimizer.set_lr(options.lr_at(step));
        let ids = sampler.batch(options.batch, options.seq_len, model.device());
        let loss = if options.nested.is_empty() {
            model.loss(&ids)
        } else {
            options
                .nested
                .iter()
                .map(|&g| model.loss_nested(&ids, Some(&model.config.nested_widths(g))))
                .fold(Tensor::zeros([], (Kind::Float, model.device())), |a, b| {
                    a + b
                })
        };
        optimizer.backward_step_clip_norm(&loss, options.clip);
        // Reported per granularity (the mean), so nested and plain losses compare.
        let value = loss.double_value(&[]) / options.nested.len().max(1) as f64;
        if !value.is_finite() {
            return Err(crate::NnError::Invalid(format!(
                "training diverged at step {step} (loss {value})"
            )));
        }
        losses.push(value);
        on_step(step, value);
    }
    Ok(losses)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_warms_up_then_decays_to_the_floor() {
        let o = TrainOptions {
            steps: 100,
            batch: 1,
            seq_len: 8,
            lr: 1e-3,
            warmup: 10,
            final_lr_fraction: 0.1,
            weight_decay: 0.0,
            clip: 1.0,
            nested: vec![],
        };
        assert!((o.lr_at(0) - 1e-4).abs() < 1e-12);
        assert!((o.lr_at(9) - 1e-3).abs() < 1e-12);
        assert!((o.lr_at(10) - 1e-3).abs() < 1e-12);
        assert!((o.lr_at(100) - 1e-4).abs() < 1e-12);
        assert!(o.lr_at(40) > o.lr_at(60));
    }
}
