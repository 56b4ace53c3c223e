//! Token windows for calibration (PLeaS, stitching) and route training, from
//! a named source: the corpus (one domain or the mixture, training split,
//! byte tokenizer), a text file tokenized with the models' shared tokenizer,
//! or uniformly random ids. A source is a seeded stream: the same name, seed
//! and sequence of requests give the same windows.

use std::path::Path;

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::Tensor;

use crate::data::{Domain, Sampler, Split};
use crate::text::{read_documents, TextTokenizer};
use crate::{tokenizer, NnError, Result};

/// Where windows are drawn from.
pub enum CalibrationText {
    Corpus(Sampler),
    /// Documents joined (each after its BOS or EOS); windows at seeded offsets.
    Text {
        tokens: Vec<i64>,
        rng: Xoshiro256PlusPlus,
    },
    Random {
        vocab: usize,
        rng: Xoshiro256PlusPlus,
    },
}

impl CalibrationText {
    /// The source `name` — `mixture`, a corpus domain, `random`, or a text
    /// file (plain text, or `.jsonl` whose lines' `field` holds the text) —
    /// for models of `vocab` tokens in `models` (a text file is tokenized
    /// with their tokenizer, which all of them must share), with windows of
    /// up to `seq_len` tokens.
    pub fn open(
        name: &str,
        field: &str,
        vocab: usize,
        models: &[&Path],
        seq_len: usize,
        seed: u64,
    ) -> Result<Self> {
        let rng = Xoshiro256PlusPlus::seed_from_u64(seed);
        if name == "random" {
            return Ok(CalibrationText::Random { vocab, rng });
        }
        let domains = match name {
            "mixture" => Domain::GENERAL.to_vec(),
            name => match Domain::parse(name) {
                Some(domain) => vec![domain],
                None => {
                    let tokens = text_tokens(name, field, vocab, models, seq_len)?;
                    return Ok(CalibrationText::Text { tokens, rng });
                }
            },
        };
        if vocab != tokenizer::VOCAB_SIZE {
            return Err(NnError::Invalid(format!(
                "corpus text is tokenized with amalgam's byte tokenizer ({} tokens), these \
                 models have {vocab}: use random tokens (`random`) or a text file",
                tokenizer::VOCAB_SIZE
            )));
        }
        if let Some(short) = domains
            .iter()
            .find(|d| d.tokens(Split::Train).len() < seq_len)
        {
            return Err(NnError::Invalid(format!(
                "the corpus's {} text is shorter than `seq_len` {seq_len}",
                short.name()
            )));
        }
        Ok(CalibrationText::Corpus(Sampler::new(
            &domains,
            Split::Train,
            seed,
        )))
    }

    /// `[n, seq_len]` ids on the CPU (`seq_len` at most the one the source
    /// was opened for).
    pub fn batch(&mut self, n: usize, seq_len: usize) -> Tensor {
        match self {
            CalibrationText::Corpus(sampler) => sampler.batch(n, seq_len, tch::Device::Cpu),
            CalibrationText::Text { tokens, rng } => {
                let ids: Vec<i64> = (0..n)
                    .flat_map(|_| {
                        let start = rng.random_range(0..=tokens.len() - seq_len);
                        tokens[start..start + seq_len].to_vec()
                    })
                    .collect();
                Tensor::from_slice(&ids).view([n as i64, seq_len as i64])
            }
            CalibrationText::Random { vocab, rng } => {
                let ids: Vec<i64> = (0..n * seq_len)
                    .map(|_| rng.random_range(0..*vocab as i64))
                    .collect();
                Tensor::from_slice(&ids).view([n as i64, seq_len as i64])
            }
        }
    }

    /// `samples` windows in batches of up to `batch`.
    pub fn batches(&mut self, samples: usize, batch: usize, seq_len: usize) -> Vec<Tensor> {
        let batch = batch.max(1);
        (0..samples)
            .step_by(batch)
            .map(|start| self.batch(batch.min(samples - start), seq_len))
            .collect()
    }
}

/// A text file's documents, each after its BOS (or EOS), tokenized with the
/// tokenizer every model in `models` shares, joined.
fn text_tokens(
    name: &str,
    field: &str,
    vocab: usize,
    models: &[&Path],
    seq_len: usize,
) -> Result<Vec<i64>> {
    let path = Path::new(name);
    if !path.is_file() {
        return Err(NnError::Invalid(format!(
            "unknown calibration `{name}` (known: mixture, random, {}, or a text file: plain \
             text, or .jsonl with the field holding each line's text)",
            Domain::names()
        )));
    }
    let documents = read_documents(path, field)?;
    let tokenizers = models
        .iter()
        .map(|dir| TextTokenizer::load(dir))
        .collect::<Result<Vec<_>>>()
        .map_err(|e| NnError::Invalid(format!("text needs the models' tokenizers: {e}")))?;
    let Some((first, others)) = tokenizers.split_first() else {
        return Err(NnError::Invalid("text needs a model's tokenizer".into()));
    };
    if let Some(i) = others.iter().position(|t| !first.same_vocabulary(t)) {
        return Err(NnError::Invalid(format!(
            "{} and {} have different tokenizers (tokens or ids differ): text needs one \
             tokenizer the models share; use `random`",
            models[0].display(),
            models[i + 1].display()
        )));
    }
    let mut tokens = vec![];
    for document in &documents {
        tokens.extend(first.prefix_token());
        tokens.extend(first.encode(document, false)?);
    }
    if let Some(id) = tokens.iter().find(|&&id| id < 0 || id as usize >= vocab) {
        return Err(NnError::Invalid(format!(
            "the tokenizer gives id {id}, outside the models' {vocab}-token vocabulary"
        )));
    }
    if tokens.len() < seq_len {
        return Err(NnError::Invalid(format!(
            "{} holds {} tokens, fewer than the {seq_len} a window needs",
            path.display(),
            tokens.len(),
        )));
    }
    Ok(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_longer_than_the_source_are_refused_not_a_panic() {
        let long = 100_000_000;
        let error = CalibrationText::open("prose", "text", tokenizer::VOCAB_SIZE, &[], long, 0)
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("shorter than `seq_len`"), "{error}");
        let mut random = CalibrationText::open("random", "text", 7, &[], long, 0).unwrap();
        let batches = random.batches(5, 0, 3);
        assert_eq!(batches.len(), 5, "a batch of 0 is a batch of 1");
        assert!(batches.iter().all(|b| b.size() == [1, 3]));
    }
}
