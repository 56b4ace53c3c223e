//! The training and evaluation text (the `amalgam-corpus` crate), by
//! domain and split, as documents and tokens. Each domain's held-out split is its last
//! 10% of bytes, moved forward to the next document boundary.

use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{Device, Tensor};

use crate::tokenizer::{encode, EOS};
use crate::{NnError, Result};

/// A domain of the corpus.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Domain {
    Prose,
    Code,
    Legal,
    German,
    Spanish,
    Italian,
    C,
    Perl,
    Cpp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Split {
    Train,
    /// For choosing settings (e.g. `amalgam tune`); study domains only.
    Validation,
    Eval,
}

impl Split {
    pub fn name(self) -> &'static str {
        match self {
            Split::Train => "train",
            Split::Validation => "validation",
            Split::Eval => "eval",
        }
    }
}

impl Domain {
    pub const ALL: [Domain; 9] = [
        Domain::Prose,
        Domain::Code,
        Domain::Legal,
        Domain::German,
        Domain::Spanish,
        Domain::Italian,
        Domain::C,
        Domain::Perl,
        Domain::Cpp,
    ];
    /// The zoo's pretraining mixture. All their text before the evaluation
    /// split trains the zoo, so they have no validation split.
    pub const GENERAL: &'static [Domain] = Domain::ALL.split_at(3).0;
    /// The merging study's domains, which the general base never saw: 80%
    /// training, 10% validation, 10% evaluation.
    pub const STUDY: &'static [Domain] = Domain::ALL.split_at(3).1;

    pub fn name(self) -> &'static str {
        match self {
            Domain::Prose => "prose",
            Domain::Code => "code",
            Domain::Legal => "legal",
            Domain::German => "german",
            Domain::Spanish => "spanish",
            Domain::Italian => "italian",
            Domain::C => "c",
            Domain::Perl => "perl",
            Domain::Cpp => "cpp",
        }
    }

    pub fn parse(name: &str) -> Option<Domain> {
        Domain::ALL.into_iter().find(|d| d.name() == name)
    }

    /// `name1, name2, ...` of every domain, for messages.
    pub fn names() -> String {
        Domain::ALL.map(Domain::name).join(", ")
    }

    /// The domain's whole text: documents separated by form feeds.
    pub fn text(self) -> &'static str {
        amalgam_corpus::text(self.name()).expect("every domain has a text in the corpus")
    }

    pub fn has_split(self, split: Split) -> bool {
        split != Split::Validation || !Domain::GENERAL.contains(&self)
    }

    /// An error for a split the domain lacks.
    pub fn check_split(self, split: Split) -> Result<()> {
        if self.has_split(split) {
            return Ok(());
        }
        Err(NnError::Invalid(format!(
            "domain {} has no {} split: all its text before the evaluation split trains \
             the zoo (the study domains {} have one)",
            self.name(),
            split.name(),
            Domain::STUDY
                .iter()
                .map(|d| d.name())
                .collect::<Vec<_>>()
                .join(", ")
        )))
    }

    /// The byte offset where the text's share `fraction` ends, moved
    /// forward to the next document boundary.
    fn boundary(self, fraction: usize) -> usize {
        let text = self.text();
        let cut = text.len() * fraction / 10;
        text[cut..].find('\u{c}').map_or(cut, |i| cut + i)
    }

    /// The documents of one split.
    ///
    /// # Panics
    /// For a split the domain lacks ([`Domain::check_split`] says so first).
    pub fn documents(self, split: Split) -> Vec<&'static str> {
        assert!(self.has_split(split), "{self:?} has no {split:?} split");
        let text = self.text();
        let eval = self.boundary(9);
        let train = if Domain::GENERAL.contains(&self) {
            eval
        } else {
            self.boundary(8)
        };
        let part = match split {
            Split::Train => &text[..train],
            Split::Validation => &text[train..eval],
            Split::Eval => &text[eval..],
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
            let splits: Vec<Split> = [Split::Train, Split::Validation, Split::Eval]
                .into_iter()
                .filter(|s| domain.has_split(*s))
                .collect();
            assert_eq!(splits.len(), 3 - Domain::GENERAL.contains(&domain) as usize);
            let total: usize = splits.iter().map(|s| domain.documents(*s).len()).sum();
            let all = domain
                .text()
                .split('\u{c}')
                .filter(|d| !d.trim().is_empty())
                .count();
            assert_eq!(total, all, "{domain:?}: no document lost or split");
            for split in splits.into_iter().filter(|s| *s != Split::Train) {
                let bytes: usize = domain.documents(split).iter().map(|d| d.len()).sum();
                let share = bytes as f64 / domain.text().len() as f64;
                assert!(
                    (0.03..0.2).contains(&share),
                    "{domain:?} {split:?}: share {share}"
                );
            }
        }
        assert!(Domain::Prose.check_split(Split::Validation).is_err());
        assert!(Domain::German.check_split(Split::Validation).is_ok());
    }
}
