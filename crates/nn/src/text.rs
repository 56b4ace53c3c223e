//! Text to token ids with a model's own tokenizer: its `tokenizer.json`, read
//! by Hugging Face's `tokenizers` crate (the reference implementation; no
//! hand-written BPE), so byte-level BPE, SentencePiece-style (Metaspace, byte
//! fallback), Unigram and WordPiece tokenizers all load, and amalgam's byte
//! tokenizer is just another one. Where transformers 5 builds a tokenizer
//! class's pipeline itself instead of taking the file's, the same is done
//! here, so the ids are the ones `AutoTokenizer` gives: `LlamaTokenizer` and
//! `CodeLlamaTokenizer` drop the file's normalizer and split nothing, with a
//! `▁` Metaspace pre-tokenizer prepending to the first piece (`legacy: false`),
//! every piece (`legacy: true`)
//! or none (`add_prefix_space: false`).

use std::path::Path;

use amalgam_checkpoint::{ModelDir, TOKENIZER_CONFIG};
use serde_json::Value;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::{NormalizerWrapper, PreTokenizerWrapper};

use crate::{NnError, Result};

/// Tokenizer classes whose pipeline transformers 5 rebuilds as Llama's.
const LLAMA_CLASSES: &[&str] = &[
    "LlamaTokenizer",
    "LlamaTokenizerFast",
    "CodeLlamaTokenizer",
    "CodeLlamaTokenizerFast",
];

/// A model's tokenizer.
pub struct TextTokenizer {
    tokenizer: tokenizers::Tokenizer,
    /// The id `tokenizer_config.json`'s `bos_token` names, else its `eos_token`'s.
    prefix: Option<i64>,
}

impl TextTokenizer {
    /// The tokenizer of the model directory `dir` (its `tokenizer.json`, and
    /// `tokenizer_config.json` for the class).
    pub fn load(dir: &Path) -> Result<Self> {
        let files = ModelDir::new(dir)?;
        let mut tokenizer = files.tokenizer()?.ok_or_else(|| {
            NnError::Invalid(format!(
                "{}: no tokenizer.json (amalgam reads tokenizers in the `tokenizers` JSON format; \
                 transformers' `save_pretrained` writes it)",
                dir.display()
            ))
        })?;
        let config = match files.has(TOKENIZER_CONFIG) {
            true => files.json_object(TOKENIZER_CONFIG)?,
            false => Default::default(),
        };
        // A special token is named as a string or as an added-token object.
        let special = |key: &str| {
            let token = config.get(key)?;
            let text = token
                .as_str()
                .or_else(|| token.get("content").and_then(Value::as_str))?;
            tokenizer.token_to_id(text).map(i64::from)
        };
        let prefix = special("bos_token").or_else(|| special("eos_token"));
        let class = config.get("tokenizer_class").and_then(Value::as_str);
        if class.is_some_and(|c| LLAMA_CLASSES.contains(&c)) {
            let flag = |key: &str, default: bool| {
                config.get(key).and_then(Value::as_bool).unwrap_or(default)
            };
            let scheme = match (flag("add_prefix_space", true), flag("legacy", false)) {
                (false, _) => PrependScheme::Never,
                (true, true) => PrependScheme::Always,
                (true, false) => PrependScheme::First,
            };
            tokenizer.with_normalizer(None::<NormalizerWrapper>);
            tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
                '▁', scheme, false,
            ))));
        }
        Ok(Self { tokenizer, prefix })
    }

    /// The token a document's first window predicts from, as
    /// lm-evaluation-harness picks it: BOS, or EOS where there is no BOS.
    pub fn prefix_token(&self) -> Option<i64> {
        self.prefix
    }

    /// The ids of `text`; with `special`, the tokenizer's own special tokens
    /// (BOS and the like, as its post-processor adds them) included.
    pub fn encode(&self, text: &str, special: bool) -> Result<Vec<i64>> {
        let encoding = self
            .tokenizer
            .encode(text, special)
            .map_err(|e| NnError::Invalid(format!("cannot tokenize the text: {e}")))?;
        Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
    }

    /// Whether `other` maps every token to the same id (added tokens included).
    pub fn same_vocabulary(&self, other: &TextTokenizer) -> bool {
        self.tokenizer.get_vocab(true) == other.tokenizer.get_vocab(true)
    }

    /// Token ids in use, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }
}

/// The most bytes of a text file read.
const MAX_TEXT_BYTES: u64 = 1 << 30;

/// The documents of a text file: the whole file, or for `.jsonl` the string
/// at `field` of each non-blank line (an error names the file and line).
pub fn read_documents(path: &Path, field: &str) -> Result<Vec<String>> {
    let bytes = amalgam_checkpoint::read_regular(path, MAX_TEXT_BYTES, "a text file")?;
    let text = String::from_utf8(bytes)
        .map_err(|e| NnError::Invalid(format!("{}: not UTF-8 text: {e}", path.display())))?;
    if path.extension().is_none_or(|e| e != "jsonl") {
        return Ok(vec![text]);
    }
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            let at = format!("{}:{}", path.display(), i + 1);
            let record: Value = serde_json::from_str(line)
                .map_err(|e| NnError::Invalid(format!("{at}: not a JSON line: {e}")))?;
            record
                .get(field)
                .and_then(Value::as_str)
                .map(str::to_owned)
                .ok_or_else(|| NnError::Invalid(format!("{at}: no string field {field:?}")))
        })
        .collect()
}
