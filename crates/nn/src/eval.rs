//! Evaluation on token streams — the corpus's held-out splits, or any text
//! tokenized with the model's own tokenizer: mean next-token cross-entropy,
//! perplexity and next-token accuracy over non-overlapping windows.

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::{Domain, Split};
use crate::{tokenizer, Llama, NnError, Result};

/// One model's scores on one domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainScore {
    /// The domain, or the text file, scored.
    pub domain: String,
    /// Predicted tokens the scores average over.
    pub tokens: usize,
    pub loss: f64,
    pub perplexity: f64,
    pub accuracy: f64,
    /// Against a reference model (e.g. the full model a submodel was cut
    /// from): how often the two predict the same next token, and the mean
    /// KL(reference ‖ model) per token in nats — what speculative decoding
    /// with the model as a draft depends on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kl: Option<f64>,
}

/// What to evaluate on.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Tokens per window (one more than the predictions per window).
    pub seq_len: usize,
    /// At most this many windows per domain (from the start of the split).
    pub max_windows: usize,
    pub batch: usize,
}

/// Whether `model` can be scored on the corpus: its vocabulary must hold the
/// byte tokenizer's ids (models trained here, such as the zoo, do).
pub fn check_vocabulary(model: &Llama) -> Result<()> {
    if model.config.vocab_size < tokenizer::VOCAB_SIZE {
        return Err(NnError::Invalid(format!(
            "the model's vocabulary has {} tokens, fewer than the byte tokenizer's {}: \
             eval scores models trained on amalgam's byte tokenizer (the zoo)",
            model.config.vocab_size,
            tokenizer::VOCAB_SIZE
        )));
    }
    Ok(())
}

/// A network `evaluate` can score: next-token logits for token ids.
pub trait LanguageModel {
    /// Logits `[batch, seq, vocab]` for ids `[batch, seq]`.
    fn logits(&self, ids: &Tensor) -> Tensor;
    fn vocab_size(&self) -> usize;
    fn device(&self) -> tch::Device;
}

impl LanguageModel for Llama {
    fn logits(&self, ids: &Tensor) -> Tensor {
        self.forward(ids)
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn device(&self) -> tch::Device {
        Llama::device(self)
    }
}

/// Scores `model` on the held-out split of `domain`, and against
/// `reference` when given; `on_batch(windows)` after each batch.
pub fn evaluate(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    domain: Domain,
    options: &EvalOptions,
    on_batch: &mut dyn FnMut(usize),
) -> DomainScore {
    let tokens = domain.tokens(Split::Eval);
    evaluate_tokens(model, reference, domain.name(), &tokens, options, on_batch)
}

/// Scores `model` on `tokens` (called `label` in the result), and against
/// `reference` when given; `on_batch(windows)` after each batch.
pub fn evaluate_tokens(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    label: &str,
    tokens: &[i64],
    options: &EvalOptions,
    on_batch: &mut dyn FnMut(usize),
) -> DomainScore {
    let len = options.seq_len;
    let windows = windows(tokens, options);
    let (mut loss_sum, mut correct, mut count) = (0.0, 0i64, 0usize);
    let (mut agreeing, mut kl_sum) = (0i64, 0.0);
    tch::no_grad(|| {
        for group in windows.chunks(options.batch) {
            let flat: Vec<i64> = group.concat();
            let ids = Tensor::from_slice(&flat)
                .view([group.len() as i64, len as i64])
                .to_device(model.device());
            let logits = model.logits(&ids.narrow(1, 0, len as i64 - 1));
            let targets = ids.narrow(1, 1, len as i64 - 1).reshape([-1]);
            let logits = logits.reshape([-1, model.vocab_size() as i64]);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, -100, 0.0)
                .double_value(&[]);
            let predicted = logits.argmax(-1, false);
            correct += predicted
                .eq_tensor(&targets)
                .sum(Kind::Int64)
                .int64_value(&[]);
            if let Some(reference) = reference {
                let theirs = reference
                    .logits(&ids.narrow(1, 0, len as i64 - 1))
                    .reshape([-1, model.vocab_size() as i64]);
                agreeing += predicted
                    .eq_tensor(&theirs.argmax(-1, false))
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                let (p_log, q_log) = (
                    theirs.log_softmax(-1, Kind::Double),
                    logits.log_softmax(-1, Kind::Double),
                );
                kl_sum += (p_log.exp() * (&p_log - q_log))
                    .sum(Kind::Double)
                    .double_value(&[]);
            }
            count += targets.numel();
            on_batch(group.len());
        }
    });
    let loss = loss_sum / count.max(1) as f64;
    DomainScore {
        domain: label.to_owned(),
        tokens: count,
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count.max(1) as f64,
        agreement: reference.map(|_| agreeing as f64 / count.max(1) as f64),
        kl: reference.map(|_| kl_sum / count.max(1) as f64),
    }
}

/// The non-overlapping windows `evaluate` scores (each window's last token
/// is the next one's first), at most `max_windows`.
fn windows<'a>(tokens: &'a [i64], options: &EvalOptions) -> Vec<&'a [i64]> {
    tokens
        .windows(options.seq_len)
        .step_by(options.seq_len - 1)
        .take(options.max_windows)
        .collect()
}

/// How many windows `evaluate` scores for `domain`.
pub fn window_count(domain: Domain, options: &EvalOptions) -> usize {
    windows(&domain.tokens(Split::Eval), options).len()
}

/// How many windows `evaluate_tokens` scores for `tokens`.
pub fn token_window_count(tokens: &[i64], options: &EvalOptions) -> usize {
    windows(tokens, options).len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::ZooSize;

    #[test]
    fn models_without_the_byte_vocabulary_are_refused() {
        let mut shape = ZooSize::named("micro").unwrap().shape;
        shape.vocab_size = 100;
        let model = Llama::new(shape, tch::Device::Cpu, 0);
        let message = check_vocabulary(&model).unwrap_err().to_string();
        assert!(message.contains("vocabulary has 100 tokens"), "{message}");
        let full = Llama::new(ZooSize::named("micro").unwrap().shape, tch::Device::Cpu, 0);
        assert!(check_vocabulary(&full).is_ok());
    }
}
