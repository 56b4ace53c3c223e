//! The `calibration:` block, written the same way in every recipe kind that
//! runs models on text (PLeaS merges, stitching): where the text comes from
//! and how much of it.
//!
//! ```yaml
//! calibration: {source: mixture, field: text, samples: 64, seq_len: 128, batch: 16, seed: 0}
//! ```
//!
//! Every key is optional; each recipe kind has its own defaults.

use crate::yaml::{location, Node, Reader};
use crate::{Location, RecipeError};

const KEYS: &[&str] = &["source", "field", "samples", "seq_len", "batch", "seed"];

/// The calibration a recipe asks for, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Calibration {
    /// `mixture`, a corpus domain, `random` token sequences, or a text or
    /// `.jsonl` file; the caller resolves the name (and reports errors at
    /// `source_at`).
    pub source: String,
    pub source_at: Location,
    /// The field of each line of a `.jsonl` source that holds its text.
    pub field: String,
    /// Calibration sequences.
    pub samples: usize,
    /// Tokens per sequence.
    pub seq_len: usize,
    /// Sequences per forward pass.
    pub batch: usize,
    pub seed: u64,
}

impl Calibration {
    /// Defaults for a recipe kind; the source is `mixture` (the corpus).
    pub(crate) fn defaults(samples: usize, seq_len: usize, batch: usize, at: Location) -> Self {
        Calibration {
            source: "mixture".into(),
            source_at: at,
            field: "text".into(),
            samples,
            seq_len,
            batch,
            seed: 0,
        }
    }

    /// Sets `samples`, `seq_len`, `batch` or `seed` (already checked).
    pub(crate) fn set_count(&mut self, key: &str, n: usize) {
        match key {
            "samples" => self.samples = n,
            "seq_len" => self.seq_len = n,
            "batch" => self.batch = n,
            "seed" => self.seed = n as u64,
            _ => unreachable!("only counts are set by name"),
        }
    }
}

/// A `calibration:` block as written: the keys it sets, checked.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CalibrationBlock {
    source: Option<(String, Location)>,
    field: Option<String>,
    /// `samples`, `seq_len`, `batch`, `seed`.
    counts: Vec<(String, usize)>,
}

impl CalibrationBlock {
    pub(crate) fn read(reader: &Reader<'_>, node: &Node<'_>) -> Result<Self, RecipeError> {
        let mut block = CalibrationBlock::default();
        for (key, value, _) in reader.mapping(node, "calibration", KEYS)? {
            match key.as_str() {
                "source" => block.source = Some((reader.string(value, "source")?, location(value))),
                "field" => block.field = Some(reader.string(value, "field")?),
                _ => {
                    let n = reader.usize(value, &key)?;
                    check_count(&key, n)
                        .map_err(|message| reader.error(location(value), message))?;
                    block.counts.push((key, n));
                }
            }
        }
        Ok(block)
    }

    /// Whether the block sets `key`.
    pub(crate) fn sets(&self, key: &str) -> bool {
        match key {
            "source" => self.source.is_some(),
            "field" => self.field.is_some(),
            _ => self.counts.iter().any(|(k, _)| k == key),
        }
    }

    /// The block's keys over `defaults` (a recipe kind's).
    pub(crate) fn over(&self, mut defaults: Calibration) -> Calibration {
        if let Some((source, at)) = &self.source {
            defaults.source = source.clone();
            defaults.source_at = *at;
        }
        if let Some(field) = &self.field {
            defaults.field = field.clone();
        }
        for (key, n) in &self.counts {
            defaults.set_count(key, *n);
        }
        defaults
    }
}

/// Refuses counts the calibration cannot use.
pub(crate) fn check_count(key: &str, n: usize) -> Result<(), String> {
    match key {
        "samples" | "seq_len" if n < 2 => Err(format!("`{key}` must be at least 2")),
        "batch" if n < 1 => Err("`batch` must be at least 1".into()),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::yaml::load;

    fn read(text: &str) -> Result<Calibration, RecipeError> {
        let reader = Reader {
            source_name: "c.yml",
        };
        let root = load(text, "c.yml")?;
        let at = location(&root);
        Ok(CalibrationBlock::read(&reader, &root)?.over(Calibration::defaults(64, 128, 16, at)))
    }

    #[test]
    fn every_key_is_read_and_unset_keys_keep_the_defaults() {
        let c =
            read("{source: notes.jsonl, field: body, samples: 8, seq_len: 33, batch: 2, seed: 5}")
                .unwrap();
        assert_eq!(
            (c.source.as_str(), c.field.as_str()),
            ("notes.jsonl", "body")
        );
        assert_eq!((c.samples, c.seq_len, c.batch, c.seed), (8, 33, 2, 5));
        assert_eq!((c.source_at.line, c.source_at.column), (1, 10));
        let d = read("{samples: 4}").unwrap();
        assert_eq!(
            (d.source.as_str(), d.samples, d.seq_len, d.batch, d.seed),
            ("mixture", 4, 128, 16, 0)
        );
    }

    #[test]
    fn mistakes_name_their_place() {
        let error = |text: &str| read(text).unwrap_err().to_string();
        assert!(error("{sample: 3}").contains("did you mean `samples`"));
        assert!(error("{seq_len: 1}").contains("c.yml:1:11: `seq_len` must be at least 2"));
        assert!(error("{batch: 0}").contains("`batch` must be at least 1"));
        assert!(error("{samples: -3}").contains("samples must be a non-negative integer"));
        assert!(error("random").contains("calibration must be a mapping"));
    }
}
