//! Evaluation on token windows — the corpus's held-out splits cut into
//! non-overlapping windows, or documents of any text tokenized with the
//! model's own tokenizer and cut as lm-evaluation-harness's rolling
//! log-likelihood cuts them: mean next-token cross-entropy, perplexity,
//! next-token accuracy (and bits per byte for text).

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::{Domain, Split};
use crate::{tokenizer, Decoder, NnError, Result};

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
    /// Total loss in bits over the text's UTF-8 bytes: comparable across
    /// tokenizers (text only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bits_per_byte: Option<f64>,
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
pub fn check_vocabulary(model: &Decoder) -> Result<()> {
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

impl LanguageModel for Decoder {
    /// In F32 whatever the model computes in, so losses sum without rounding.
    fn logits(&self, ids: &Tensor) -> Tensor {
        self.forward(ids).to_kind(Kind::Float)
    }
    fn vocab_size(&self) -> usize {
        self.config.vocab_size
    }
    fn device(&self) -> tch::Device {
        Decoder::device(self)
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

/// Scores `model` on `tokens` (called `label` in the result) cut into the
/// corpus's windows, and against `reference` when given; `on_batch(windows)`
/// after each batch.
pub fn evaluate_tokens(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    label: &str,
    tokens: &[i64],
    options: &EvalOptions,
    on_batch: &mut dyn FnMut(usize),
) -> DomainScore {
    let windows = corpus_windows(tokens, options);
    score_windows(model, reference, label, &windows, options.batch, on_batch)
}

/// Marks a position whose next token is context, not scored.
pub const NOT_SCORED: i64 = -100;

/// One forward pass's input and, per position, the next token it is scored
/// on ([`NOT_SCORED`] where it only gives context).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    pub input: Vec<i64>,
    pub targets: Vec<i64>,
}

/// Scores `model` on `windows`, same-length windows `batch` at a time.
pub fn score_windows(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    label: &str,
    windows: &[Window],
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> DomainScore {
    let (mut loss_sum, mut correct, mut count) = (0.0, 0i64, 0i64);
    let (mut agreeing, mut kl_sum) = (0i64, 0.0);
    let mut order: Vec<&Window> = windows.iter().collect();
    order.sort_by_key(|w| w.input.len()); // stable: windows keep their order within a length
    let groups = order
        .chunk_by(|a, b| a.input.len() == b.input.len())
        .flat_map(|same| same.chunks(batch.max(1)));
    tch::no_grad(|| {
        for group in groups {
            let len = group[0].input.len() as i64;
            let stack = |rows: Vec<&[i64]>| {
                Tensor::from_slice(&rows.concat())
                    .view([group.len() as i64, len])
                    .to_device(model.device())
            };
            let ids = stack(group.iter().map(|w| w.input.as_slice()).collect());
            let targets = stack(group.iter().map(|w| w.targets.as_slice()).collect()).reshape([-1]);
            let scored = targets.ne(NOT_SCORED);
            let vocab = model.vocab_size() as i64;
            let logits = model.logits(&ids).reshape([-1, vocab]);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, NOT_SCORED, 0.0)
                .double_value(&[]);
            let predicted = logits.argmax(-1, false);
            correct += predicted
                .eq_tensor(&targets)
                .logical_and(&scored)
                .sum(Kind::Int64)
                .int64_value(&[]);
            if let Some(reference) = reference {
                let theirs = reference.logits(&ids).reshape([-1, vocab]);
                agreeing += predicted
                    .eq_tensor(&theirs.argmax(-1, false))
                    .logical_and(&scored)
                    .sum(Kind::Int64)
                    .int64_value(&[]);
                let rows = scored.nonzero().squeeze_dim(1);
                let (p_log, q_log) = (
                    theirs.index_select(0, &rows).log_softmax(-1, Kind::Double),
                    logits.index_select(0, &rows).log_softmax(-1, Kind::Double),
                );
                kl_sum += (p_log.exp() * (&p_log - q_log))
                    .sum(Kind::Double)
                    .double_value(&[]);
            }
            count += scored.sum(Kind::Int64).int64_value(&[]);
            on_batch(group.len());
        }
    });
    let count = count.max(1) as f64;
    let loss = loss_sum / count;
    DomainScore {
        domain: label.to_owned(),
        tokens: count as usize,
        loss,
        perplexity: loss.exp(),
        accuracy: correct as f64 / count,
        bits_per_byte: None,
        agreement: reference.map(|_| agreeing as f64 / count),
        kl: reference.map(|_| kl_sum / count),
    }
}

/// The corpus's windows of `tokens`: non-overlapping runs of `seq_len`
/// tokens (each run's last token is the next one's first), every position
/// scored on its next token, at most `max_windows`.
pub fn corpus_windows(tokens: &[i64], options: &EvalOptions) -> Vec<Window> {
    tokens
        .windows(options.seq_len)
        .step_by(options.seq_len - 1)
        .take(options.max_windows)
        .map(|run| Window {
            input: run[..run.len() - 1].to_vec(),
            targets: run[1..].to_vec(),
        })
        .collect()
}

/// One document's windows as lm-evaluation-harness's rolling log-likelihood
/// makes them: every token scored exactly once, inputs of at most `max_len`
/// tokens. The first window predicts the document's first tokens from
/// `prefix` (the tokenizer's BOS, or EOS where it has none); each later one
/// predicts up to `max_len − context + 1` new tokens, its input reaching back
/// so that at least `context` tokens before its first prediction are seen
/// (`context` 1: disjoint windows, each seeing the previous one's last token).
pub fn rolling_windows(doc: &[i64], prefix: i64, max_len: usize, context: usize) -> Vec<Window> {
    let max_len = max_len.max(1);
    let step = max_len + 1 - context.clamp(1, max_len);
    let first = doc.len().min(max_len);
    if first == 0 {
        return Vec::new();
    }
    let mut input = vec![prefix];
    input.extend_from_slice(&doc[..first - 1]);
    let mut windows = vec![Window {
        input,
        targets: doc[..first].to_vec(),
    }];
    let mut predicted = first;
    while predicted < doc.len() {
        let count = (doc.len() - predicted).min(step);
        let end = predicted + count;
        let input = doc[end - 1 - max_len..end - 1].to_vec();
        let mut targets = vec![NOT_SCORED; max_len - count];
        targets.extend_from_slice(&doc[predicted..end]);
        windows.push(Window { input, targets });
        predicted = end;
    }
    windows
}

/// How many windows `evaluate` scores for `domain`.
pub fn window_count(domain: Domain, options: &EvalOptions) -> usize {
    corpus_windows(&domain.tokens(Split::Eval), options).len()
}

/// How many windows `evaluate_tokens` scores for `tokens`.
pub fn token_window_count(tokens: &[i64], options: &EvalOptions) -> usize {
    corpus_windows(tokens, options).len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::zoo::ZooSize;

    /// Every token scored once, inputs never longer than `max_len`, each
    /// scored token predicted from the position before it, and at least
    /// `context` tokens seen before a later window's first prediction.
    #[test]
    fn rolling_windows_score_every_token_once() {
        let doc: Vec<i64> = (10..47).collect();
        for (max_len, context) in [(8, 1), (8, 3), (8, 8), (1, 1), (40, 1), (5, 9)] {
            let windows = rolling_windows(&doc, 0, max_len, context);
            let mut scored = Vec::new();
            for (k, w) in windows.iter().enumerate() {
                assert_eq!(w.input.len(), w.targets.len());
                assert!(w.input.len() <= max_len);
                let first = w.targets.iter().position(|&t| t != NOT_SCORED).unwrap();
                for (i, &t) in w.targets.iter().enumerate().skip(first) {
                    // Position i predicts the token after input[i] in the document.
                    let before = if k == 0 && i == 0 { 0 } else { w.input[i] };
                    assert_eq!(t, if before == 0 { 10 } else { before + 1 });
                    scored.push(t);
                }
                if k > 0 {
                    assert!(first + 1 >= context.min(max_len), "{max_len} {context}");
                }
            }
            assert_eq!(scored, doc, "max_len {max_len}, context {context}");
        }
        assert!(rolling_windows(&[], 0, 8, 1).is_empty());
        assert_eq!(
            rolling_windows(&[5, 6], 1, 8, 1),
            [Window {
                input: vec![1, 5],
                targets: vec![5, 6]
            }]
        );
    }

    #[test]
    fn models_without_the_byte_vocabulary_are_refused() {
        let mut shape = ZooSize::named("micro").unwrap().shape;
        shape.vocab_size = 100;
        let model = Decoder::new(shape, tch::Device::Cpu, 0);
        let message = check_vocabulary(&model).unwrap_err().to_string();
        assert!(message.contains("vocabulary has 100 tokens"), "{message}");
        let full = Decoder::new(ZooSize::named("micro").unwrap().shape, tch::Device::Cpu, 0);
        assert!(check_vocabulary(&full).is_ok());
    }
}
