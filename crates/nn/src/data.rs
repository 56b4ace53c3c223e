//! The training and evaluation text (data/corpus, provenance in its
//! PROVENANCE.md), compiled into the library so that training does not
//! depend on the working directory. Each domain's held-out split is its last
//! 10% of bytes, moved forward to the next document boundary.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Tensor};

use crate::tokenizer::{encode, EOS};

/// A domain of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Domain {
    Prose,
    Code,
    Legal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    Eval,
}

impl Domain {
    pub const ALL: [Domain; 3] = [Domain::Prose, Domain::Code, Domain::Legal];

    pub fn name(self) -> &'static str {
        match self {
            Domain::Prose => "prose",
            Domain::Code => "code",
            Domain::Legal => "legal",
        }
    }

    pub fn parse(name: &str) -> Option<Domain> {
        Domain::ALL.into_iter().find(|d| d.name() == name)
    }

    /// The domain's whole text: documents separated by form feeds.
    pub fn text(self) -> &'static str {
        match self {
            Domain::Prose => include_str!("../../../data/corpus/prose.txt"),
            Domain::Code => include_str!("../../../data/corpus/code.txt"),
            Domain::Legal => include_str!("../../../data/corpus/legal.txt"),
        }
    }

    /// The documents of one split.
    pub fn documents(self, split: Split) -> Vec<&'static str> {
        let text = self.text();
        let cut = text.len() * 9 / 10;
        let boundary = text[cut..].find('\u{c}').map_or(cut, |i| cut + i);
        let part = match split {
            Split::Train => &text[..boundary],
            Split::Eval => &text[boundary..],
        };
        part.split('\u{c}')
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect()
    }

    /// The split as one token stream, `<eos>` after each document.
    pub fn tokens(self, split: Split) -> Vec<i64> {
        let mut tokens = vec![];
        for doc in self.documents(split) {
            tokens.extend(encode(doc));
            tokens.push(EOS);
        }
        tokens
    }
}

/// Random training windows from one or more domains, a domain chosen
/// uniformly for each sequence, from a seeded stream.
pub struct Sampler {
    streams: Vec<Vec<i64>>,
    rng: Xoshiro256PlusPlus,
}

impl Sampler {
    pub fn new(domains: &[Domain], split: Split, seed: u64) -> Self {
        Sampler {
            streams: domains.iter().map(|d| d.tokens(split)).collect(),
            rng: Xoshiro256PlusPlus::seed_from_u64(seed),
        }
    }

    /// `[batch, len]` token ids.
    pub fn batch(&mut self, batch: usize, len: usize, device: Device) -> Tensor {
        let mut ids = Vec::with_capacity(batch * len);
        for _ in 0..batch {
            let stream = &self.streams[self.rng.random_range(0..self.streams.len())];
            let start = self.rng.random_range(0..=stream.len() - len);
            ids.extend_from_slice(&stream[start..start + len]);
        }
        Tensor::from_slice(&ids)
            .view([batch as i64, len as i64])
            .to_device(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_are_disjoint_whole_documents() {
        for domain in Domain::ALL {
            let train = domain.documents(Split::Train);
            let eval = domain.documents(Split::Eval);
            assert!(!train.is_empty() && !eval.is_empty(), "{domain:?}");
            let total: usize = domain.documents(Split::Train).len() + eval.len();
            let all = domain
                .text()
                .split('\u{c}')
                .filter(|d| !d.trim().is_empty())
                .count();
            assert_eq!(total, all, "{domain:?}: no document lost or split");
            let eval_bytes: usize = eval.iter().map(|d| d.len()).sum();
            let share = eval_bytes as f64 / domain.text().len() as f64;
            assert!(
                (0.03..0.2).contains(&share),
                "{domain:?}: eval share {share}"
            );
        }
    }
}
