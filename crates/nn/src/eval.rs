//! Evaluation on token windows — the corpus's held-out splits cut into
//! non-overlapping windows, or documents of any text tokenized with the
//! model's own tokenizer and cut as lm-evaluation-harness's rolling
//! log-likelihood cuts them: mean next-token cross-entropy, perplexity,
//! next-token accuracy (and bits per byte for text).

use std::collections::BTreeMap;

use serde::Serialize;
use tch::{Kind, Tensor};

use crate::data::{Domain, Split};
use crate::text::{Chunking, DocumentEncoder, Piece, TextFile, TextTokenizer, Token, PIECE_BYTES};
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
///
/// # Panics
/// Where libtorch fails (out of memory): [`try_score_windows`] says so instead.
pub fn score_windows(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    label: &str,
    windows: &[Window],
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> DomainScore {
    try_score_windows(model, reference, label, windows, batch, on_batch)
        .unwrap_or_else(|e| panic!("scoring {label}: {e}"))
}

/// [`score_windows`], a libtorch failure (such as an allocation) an error.
pub fn try_score_windows(
    model: &dyn LanguageModel,
    reference: Option<&dyn LanguageModel>,
    label: &str,
    windows: &[Window],
    batch: usize,
    on_batch: &mut dyn FnMut(usize),
) -> Result<DomainScore> {
    let mut scorer = Scorer::new(model, reference, batch);
    for window in windows {
        scorer.push(window.clone(), on_batch)?;
    }
    scorer.finish(label, on_batch)
}

/// Windows scored as they come: same-length windows `batch` at a time, a
/// batch as soon as it is full, the same batches summed in the same order as
/// if every window had been sorted by length first (so the scores are those
/// of [`score_windows`] over all of them, bit for bit). Holds at most
/// `batch − 1` windows of each length.
pub struct Scorer<'m> {
    model: &'m dyn LanguageModel,
    reference: Option<&'m dyn LanguageModel>,
    batch: usize,
    waiting: BTreeMap<usize, Vec<Window>>,
    /// Per input length, each batch's summed loss and KL, in order.
    sums: BTreeMap<usize, Vec<(f64, f64)>>,
    correct: i64,
    agreeing: i64,
    count: i64,
    windows: usize,
}

impl<'m> Scorer<'m> {
    pub fn new(
        model: &'m dyn LanguageModel,
        reference: Option<&'m dyn LanguageModel>,
        batch: usize,
    ) -> Self {
        Self {
            model,
            reference,
            batch: batch.max(1),
            waiting: BTreeMap::new(),
            sums: BTreeMap::new(),
            correct: 0,
            agreeing: 0,
            count: 0,
            windows: 0,
        }
    }

    /// Windows taken so far.
    pub fn windows(&self) -> usize {
        self.windows
    }

    /// Takes a window, scoring its length's batch if that fills it;
    /// `on_batch(windows)` after each batch.
    pub fn push(&mut self, window: Window, on_batch: &mut dyn FnMut(usize)) -> Result<()> {
        let length = window.input.len();
        self.windows += 1;
        let group = self.waiting.entry(length).or_default();
        group.push(window);
        if group.len() == self.batch {
            let group = std::mem::take(group);
            self.score(length, &group)?;
            on_batch(group.len());
        }
        Ok(())
    }

    /// Scores what is left and sums it all up, as `label`.
    pub fn finish(mut self, label: &str, on_batch: &mut dyn FnMut(usize)) -> Result<DomainScore> {
        for (length, group) in std::mem::take(&mut self.waiting) {
            if !group.is_empty() {
                self.score(length, &group)?;
                on_batch(group.len());
            }
        }
        let (mut loss_sum, mut kl_sum) = (0.0, 0.0);
        for &(loss, kl) in self.sums.values().flatten() {
            loss_sum += loss;
            kl_sum += kl;
        }
        let count = self.count.max(1) as f64;
        let loss = loss_sum / count;
        Ok(DomainScore {
            domain: label.to_owned(),
            tokens: count as usize,
            loss,
            perplexity: loss.exp(),
            accuracy: self.correct as f64 / count,
            bits_per_byte: None,
            agreement: self.reference.map(|_| self.agreeing as f64 / count),
            kl: self.reference.map(|_| kl_sum / count),
        })
    }

    fn score(&mut self, length: usize, group: &[Window]) -> Result<()> {
        let (model, reference) = (self.model, self.reference);
        let scored = tch::no_grad(|| -> Result<_> {
            let len = length as i64;
            let stack = |rows: Vec<&[i64]>| -> Result<Tensor> {
                Ok(Tensor::f_from_slice(&rows.concat())?
                    .f_view([group.len() as i64, len])?
                    .f_to_device(model.device())?)
            };
            let ids = stack(group.iter().map(|w| w.input.as_slice()).collect())?;
            let targets =
                stack(group.iter().map(|w| w.targets.as_slice()).collect())?.f_reshape([-1])?;
            let scored = targets.f_ne(NOT_SCORED)?;
            let vocab = model.vocab_size() as i64;
            let logits = forward(model, &ids)?.f_reshape([-1, vocab])?;
            let loss = logits
                .f_cross_entropy_loss::<Tensor>(
                    &targets,
                    None,
                    tch::Reduction::Sum,
                    NOT_SCORED,
                    0.0,
                )?
                .f_double_value(&[])?;
            let predicted = logits.f_argmax(-1, false)?;
            let correct = predicted
                .f_eq_tensor(&targets)?
                .f_logical_and(&scored)?
                .f_sum(Kind::Int64)?
                .f_int64_value(&[])?;
            let (mut agreeing, mut kl) = (0, 0.0);
            if let Some(reference) = reference {
                let theirs = forward(reference, &ids)?.f_reshape([-1, vocab])?;
                agreeing = predicted
                    .f_eq_tensor(&theirs.f_argmax(-1, false)?)?
                    .f_logical_and(&scored)?
                    .f_sum(Kind::Int64)?
                    .f_int64_value(&[])?;
                let rows = scored.f_nonzero()?.f_squeeze_dim(1)?;
                let (p_log, q_log) = (
                    theirs
                        .f_index_select(0, &rows)?
                        .f_log_softmax(-1, Kind::Double)?,
                    logits
                        .f_index_select(0, &rows)?
                        .f_log_softmax(-1, Kind::Double)?,
                );
                kl = p_log
                    .f_exp()?
                    .f_mul(&p_log.f_sub(&q_log)?)?
                    .f_sum(Kind::Double)?
                    .f_double_value(&[])?;
            }
            let count = scored.f_sum(Kind::Int64)?.f_int64_value(&[])?;
            Ok((loss, kl, correct, agreeing, count))
        })
        .map_err(|e| e.brief("scoring a batch"))?;
        let (loss, kl, correct, agreeing, count) = scored;
        self.sums.entry(length).or_default().push((loss, kl));
        self.correct += correct;
        self.agreeing += agreeing;
        self.count += count;
        Ok(())
    }
}

thread_local! {
    /// Whether a panic on this thread is caught by [`forward`] (and so not printed).
    static CAUGHT: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `model`'s logits for `ids`, a failure inside libtorch (an allocation
/// beyond the memory, which the forward pass's tch calls turn into a panic)
/// an error.
fn forward(model: &dyn LanguageModel, ids: &Tensor) -> Result<Tensor> {
    static HOOK: std::sync::Once = std::sync::Once::new();
    HOOK.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if !CAUGHT.with(|c| c.get()) {
                previous(info);
            }
        }));
    });
    CAUGHT.with(|c| c.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| model.logits(ids)));
    CAUGHT.with(|c| c.set(false));
    result.map_err(|panic| {
        let message = panic
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| panic.downcast_ref::<&str>().copied())
            .unwrap_or("a panic");
        // tch's `unwrap` of libtorch's error: its message, without the C++
        // stack trace it carries (escaped, in the error's Debug form).
        let message = message.split_once("Torch(\"").map_or(message, |(_, m)| m);
        let message = message.split(['\n', '\\']).next().unwrap_or_default();
        NnError::Invalid(format!("the forward pass failed: {message}"))
    })
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
    let mut rolling = RollingWindows::new(prefix, max_len, context);
    for &id in doc {
        rolling.push(id, 0);
    }
    std::iter::from_fn(|| rolling.next_window(true)).collect()
}

/// One document's windows as [`rolling_windows`] cuts them, made as its
/// tokens arrive: each window as soon as the tokens it holds are known,
/// holding only the last `max_len` tokens and those not yet in a window.
pub struct RollingWindows {
    prefix: i64,
    max_len: usize,
    step: usize,
    /// The document's tokens from index `base` (ids, and the byte each ends at).
    tokens: Vec<(i64, usize)>,
    base: usize,
    seen: usize,
    predicted: usize,
}

impl RollingWindows {
    pub fn new(prefix: i64, max_len: usize, context: usize) -> Self {
        let max_len = max_len.max(1);
        Self {
            prefix,
            max_len,
            step: max_len + 1 - context.clamp(1, max_len),
            tokens: Vec::new(),
            base: 0,
            seen: 0,
            predicted: 0,
        }
    }

    /// The document's next token, and the byte of the document it ends at.
    pub fn push(&mut self, id: i64, end: usize) {
        self.tokens.push((id, end));
        self.seen += 1;
    }

    /// The next window, once its tokens are here (`ended`: the document
    /// has no more).
    pub fn next_window(&mut self, ended: bool) -> Option<Window> {
        let window = if self.predicted == 0 {
            let first = self.seen.min(self.max_len);
            if first == 0 || (!ended && self.seen < self.max_len) {
                return None;
            }
            let mut input = vec![self.prefix];
            input.extend(self.ids(0, first - 1));
            let targets = self.ids(0, first).collect();
            self.predicted = first;
            Window { input, targets }
        } else {
            let available = self.seen - self.predicted;
            if available == 0 || (!ended && available < self.step) {
                return None;
            }
            let count = available.min(self.step);
            let end = self.predicted + count;
            let input = self.ids(end - 1 - self.max_len, end - 1).collect();
            let mut targets = vec![NOT_SCORED; self.max_len - count];
            targets.extend(self.ids(self.predicted, end));
            self.predicted = end;
            Window { input, targets }
        };
        // No later window reaches further back than `max_len` tokens before
        // its first prediction.
        let keep = self.predicted.saturating_sub(self.max_len);
        if keep - self.base > self.tokens.len() / 2 {
            self.tokens.drain(..keep - self.base);
            self.base = keep;
        }
        Some(window)
    }

    /// Tokens here not yet scored.
    pub fn waiting(&self) -> usize {
        self.seen - self.predicted
    }

    /// The bytes of the document up to the end of the last token scored.
    pub fn scored_bytes(&self) -> usize {
        match self.predicted {
            0 => 0,
            n => self.tokens[n - 1 - self.base].1,
        }
    }

    fn ids(&self, from: usize, to: usize) -> impl Iterator<Item = i64> + '_ {
        self.tokens[from - self.base..to - self.base]
            .iter()
            .map(|&(id, _)| id)
    }
}

/// How `eval --text` scores a file.
#[derive(Debug, Clone, Copy)]
pub struct TextOptions {
    /// Tokens per window (the model reads all but the last).
    pub seq_len: usize,
    /// Tokens each window after a document's first sees before its first
    /// prediction (1: disjoint windows).
    pub stride: usize,
    pub batch: usize,
    /// At most this many windows (the rest of the file is not read).
    pub max_windows: Option<usize>,
    pub chunking: Chunking,
}

impl TextOptions {
    /// The most memory scoring `file` holds besides the models and their
    /// forward pass: what is read (a `.jsonl` line whole, with its JSON),
    /// the tokenizer at work (twice with a reference to compare with), the
    /// document's tokens not yet in a window, and the windows waiting for
    /// their batch — at most `batch − 1` of each length; of a `.jsonl`
    /// file's short documents, one window each.
    pub fn memory_bytes(&self, file: &TextFile, reference: bool) -> u64 {
        let reading = match file.jsonl() {
            true => file.longest_line.saturating_mul(3),
            false => 2 * PIECE_BYTES as u64,
        };
        let encoders = self
            .chunking
            .memory_bytes()
            .saturating_mul(1 + u64::from(reference));
        let max_len = self.seq_len.saturating_sub(1) as u64;
        let batch = self.batch.max(1) as u64;
        // A window's input and targets, 8 bytes a token.
        let window = 16 * max_len;
        let held = (self.chunking.max_held + self.chunking.chunk) as u64;
        let rolling = 16u64.saturating_mul(2 * max_len + held);
        let short = match file.jsonl() {
            true => (batch - 1)
                .saturating_mul(8)
                .saturating_mul(max_len.saturating_mul(max_len))
                .min(16u64.saturating_mul(file.document_bytes + file.documents)),
            false => window,
        };
        reading
            .saturating_add(encoders)
            .saturating_add(rolling)
            .saturating_add(batch.saturating_mul(window))
            .saturating_add(short)
    }
}

/// Scores `model` on the documents of `file` (called `label` in the result)
/// as lm-evaluation-harness's rolling log-likelihood scores them, each
/// tokenized whole with `tokenizer`, and against a reference model when
/// given (whose tokenizer must give the same tokens). The file is read,
/// tokenized ([`DocumentEncoder`]) and scored ([`Scorer`]) a stretch at a
/// time, in the memory [`TextOptions::memory_bytes`] bounds, with the scores
/// scoring all its windows at once would give; `on_read(bytes)` as the file
/// is read.
pub fn score_text(
    model: &dyn LanguageModel,
    tokenizer: &TextTokenizer,
    reference: Option<(&dyn LanguageModel, &TextTokenizer)>,
    file: &TextFile,
    label: &str,
    options: &TextOptions,
    on_read: &mut dyn FnMut(u64),
) -> Result<DomainScore> {
    let prefix = tokenizer.prefix_token().ok_or_else(|| {
        NnError::Invalid("its tokenizer names no BOS or EOS token to start a document from".into())
    })?;
    if let Some((_, theirs)) = reference {
        if theirs.prefix_token() != Some(prefix) {
            return Err(NnError::TokenizersDiffer);
        }
    }
    let vocab = model.vocab_size();
    let max_len = options.seq_len.saturating_sub(1).max(1);
    let mut scorer = Scorer::new(model, reference.map(|(m, _)| m), options.batch);
    let mut ours = DocumentEncoder::new(tokenizer, options.chunking);
    let mut compared = reference.map(|(_, t)| Compared::new(t, options.chunking));
    let mut tokens = Vec::new();
    let mut rolling = RollingWindows::new(prefix, max_len, options.stride);
    let (mut bytes, mut document) = (0u64, 0u64);
    file.read(&mut |piece| {
        if piece.first {
            rolling = RollingWindows::new(prefix, max_len, options.stride);
            document = 0;
        }
        document += piece.text.len() as u64;
        ours.push(piece.text, &mut tokens)?;
        if piece.last {
            ours.finish(&mut tokens)?;
        }
        if let Some(compared) = &mut compared {
            compared.check(piece, &tokens)?;
        }
        for token in tokens.drain(..) {
            if token.id < 0 || token.id as usize >= vocab {
                return Err(NnError::OutsideVocabulary {
                    id: token.id,
                    vocab,
                });
            }
            rolling.push(token.id, token.end);
        }
        while let Some(window) = rolling.next_window(piece.last) {
            scorer.push(window, &mut |_| {})?;
            if options.max_windows == Some(scorer.windows()) {
                bytes += match piece.last && rolling.waiting() == 0 {
                    true => document,
                    false => rolling.scored_bytes() as u64,
                };
                on_read(piece.read);
                return Ok(false);
            }
        }
        if piece.last {
            bytes += document;
        }
        on_read(piece.read);
        Ok(true)
    })?;
    if scorer.windows() == 0 {
        return Err(NnError::Invalid("no text to score".into()));
    }
    let mut score = scorer.finish(label, &mut |_| {})?;
    score.bits_per_byte =
        Some(score.loss * score.tokens as f64 / (bytes as f64 * std::f64::consts::LN_2));
    Ok(score)
}

/// Whether `ours` and `theirs` give the same tokens (ids) for every
/// document of `file` and start documents from the same token; stops at
/// the first difference.
pub fn same_tokens(
    ours: &TextTokenizer,
    theirs: &TextTokenizer,
    file: &TextFile,
    chunking: Chunking,
) -> Result<bool> {
    if ours.prefix_token() != theirs.prefix_token() {
        return Ok(false);
    }
    let mut encoder = DocumentEncoder::new(ours, chunking);
    let mut compared = Compared::new(theirs, chunking);
    let mut tokens = Vec::new();
    let mut same = true;
    file.read(&mut |piece| {
        encoder.push(piece.text, &mut tokens)?;
        if piece.last {
            encoder.finish(&mut tokens)?;
        }
        match compared.check(piece, &tokens) {
            Err(NnError::TokenizersDiffer) => same = false,
            other => other?,
        }
        tokens.clear();
        Ok(same)
    })?;
    Ok(same)
}

/// A second tokenizer run beside the first over the same pieces, its ids
/// compared with the first's as both come.
struct Compared<'t> {
    encoder: DocumentEncoder<'t>,
    /// Tokens one side has given and the other not yet.
    ours: std::collections::VecDeque<i64>,
    theirs: std::collections::VecDeque<i64>,
    tokens: Vec<Token>,
}

impl<'t> Compared<'t> {
    fn new(tokenizer: &'t TextTokenizer, chunking: Chunking) -> Self {
        Self {
            encoder: DocumentEncoder::new(tokenizer, chunking),
            ours: Default::default(),
            theirs: Default::default(),
            tokens: Vec::new(),
        }
    }

    /// Encodes `piece` and compares the result with `ours`, the first
    /// tokenizer's tokens for it.
    fn check(&mut self, piece: Piece, ours: &[Token]) -> Result<()> {
        self.encoder.push(piece.text, &mut self.tokens)?;
        if piece.last {
            self.encoder.finish(&mut self.tokens)?;
        }
        self.theirs.extend(self.tokens.drain(..).map(|t| t.id));
        self.ours.extend(ours.iter().map(|t| t.id));
        while let (Some(a), Some(b)) = (self.ours.front(), self.theirs.front()) {
            if a != b {
                return Err(NnError::TokenizersDiffer);
            }
            self.ours.pop_front();
            self.theirs.pop_front();
        }
        if piece.last && !(self.ours.is_empty() && self.theirs.is_empty()) {
            return Err(NnError::TokenizersDiffer);
        }
        Ok(())
    }
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

    /// Windows made as tokens arrive, a few at a time, are the windows of
    /// the whole document, each as soon as its tokens are here; the tokens
    /// held do not grow with the document.
    #[test]
    fn rolling_windows_come_as_their_tokens_do() {
        let doc: Vec<i64> = (10..251).collect();
        for (max_len, context) in [(8, 1), (8, 3), (8, 8), (1, 1), (300, 1), (5, 9), (16, 4)] {
            let expected = reference_rolling_windows(&doc, 0, max_len, context);
            for push in [1, 2, 7, 50, 1000] {
                let mut rolling = RollingWindows::new(0, max_len, context);
                let mut windows = Vec::new();
                for (k, tokens) in doc.chunks(push).enumerate() {
                    for &id in tokens {
                        // Each token ends at byte 3·(id − 9): three bytes a token.
                        rolling.push(id, 3 * (id as usize - 9));
                    }
                    let ended = (k + 1) * push >= doc.len();
                    while let Some(window) = rolling.next_window(ended) {
                        let last = *window.targets.last().unwrap();
                        assert_eq!(rolling.scored_bytes(), 3 * (last as usize - 9));
                        windows.push(window);
                    }
                    assert!(rolling.tokens.len() <= 4 * max_len + 2 * push);
                    if !ended {
                        // Only windows that wait for more tokens are missing.
                        assert!(rolling.waiting() < max_len.max(1) + push);
                    }
                }
                assert_eq!(windows, expected, "max_len {max_len}, context {context}");
                assert_eq!(rolling.waiting(), 0);
            }
            assert_eq!(rolling_windows(&doc, 0, max_len, context), expected);
        }
    }

    /// lm-evaluation-harness's windows as eval cut them from whole documents.
    fn reference_rolling_windows(
        doc: &[i64],
        prefix: i64,
        max_len: usize,
        context: usize,
    ) -> Vec<Window> {
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
}
