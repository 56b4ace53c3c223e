//! Text to token ids with a model's own tokenizer: its `tokenizer.json`, read
//! by Hugging Face's `tokenizers` crate (the reference implementation; no
//! hand-written BPE), so byte-level BPE, SentencePiece-style (Metaspace, byte
//! fallback), Unigram and WordPiece tokenizers all load, and amalgam's byte
//! tokenizer is just another one. Where transformers 5 builds a tokenizer
//! class's pipeline itself from the file's vocabulary and merges instead of
//! taking the file's, the same is done here, so the ids are the ones
//! `AutoTokenizer` gives; which class that is follows transformers' rule,
//! from `tokenizer_config.json`'s `tokenizer_class` and the model type's
//! mapping in the family descriptions ([`Pipeline::choose`]).

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

use amalgam_checkpoint::{family, ModelDir, TOKENIZER_CONFIG};
use serde_json::Value;
use tokenizers::normalizers::replace::Replace;
use tokenizers::normalizers::unicode::NFC;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{
    ModelWrapper, NormalizerWrapper, PostProcessorWrapper, PreTokenizerWrapper,
    SplitDelimiterBehavior,
};

use crate::{NnError, Result};

/// Class names that stand for a file's own pipeline (transformers'
/// `TokenizersBackend` and its aliases), without a `Fast` suffix.
const GENERIC_CLASSES: &[&str] = &[
    "TokenizersBackend",
    "PythonBackend",
    "PreTrainedTokenizer",
    "MistralCommonBackend",
    "BloomTokenizer",
];

/// Qwen2's pre-tokenizer split, as transformers' `Qwen2Tokenizer` builds it.
const QWEN2_SPLIT: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The tokenization pipeline a model directory gets: the file's own, or
/// the one transformers builds for a tokenizer class from the file's
/// vocabulary and merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pipeline {
    /// `tokenizer.json` as it is (transformers' `TokenizersBackend`).
    File,
    /// No normalizer; a `▁` Metaspace prepending to the first piece
    /// (`legacy: false`), every piece (`legacy: true`) or none
    /// (`add_prefix_space: false`).
    Llama,
    /// As Llama, but `legacy` is not read; BOS always added.
    CodeLlama,
    /// NFC; Qwen's split, then bytes.
    Qwen2,
    /// Spaces as `▁`, split after each.
    Gemma,
    /// No normalizer; GPT-2's byte-level split.
    Gpt2,
    /// NFC; GPT-2's byte-level split; no special tokens added.
    GptNeoX,
}

/// A class name without its `Fast` suffix (`LlamaTokenizerFast` is
/// `LlamaTokenizer`'s twin).
fn base_class(class: &str) -> &str {
    class.strip_suffix("Fast").unwrap_or(class)
}

fn is_generic(class: &str) -> bool {
    GENERIC_CLASSES.contains(&base_class(class))
}

impl Pipeline {
    /// The pipeline transformers builds for `class`; `None` for the
    /// generic classes and those it builds no pipeline of its own for here.
    pub fn of_class(class: &str) -> Option<Pipeline> {
        match base_class(class) {
            "LlamaTokenizer" => Some(Pipeline::Llama),
            "CodeLlamaTokenizer" => Some(Pipeline::CodeLlama),
            "Qwen2Tokenizer" => Some(Pipeline::Qwen2),
            "GemmaTokenizer" => Some(Pipeline::Gemma),
            "GPT2Tokenizer" => Some(Pipeline::Gpt2),
            "GPTNeoXTokenizer" => Some(Pipeline::GptNeoX),
            _ => None,
        }
    }

    /// The pipeline of a model directory whose `config.json` gives
    /// `model_type` and whose `tokenizer_config.json` (else `config.json`)
    /// names `class`, as transformers 5's `AutoTokenizer` chooses it. The
    /// model type's mapping (its family description's `tokenizer`) decides
    /// where it is generic (the file's own pipeline, whatever the class) or
    /// overrides the published class; a `LlamaTokenizer` over a byte-level
    /// file (`byte_level`) keeps the file's; otherwise the class named wins,
    /// and the model type's class serves where none is named. The second
    /// value is a class named that transformers may build a pipeline of its
    /// own for and amalgam does not (the file's is used).
    pub fn choose<'c>(
        model_type: Option<&str>,
        class: Option<&'c str>,
        byte_level: bool,
    ) -> (Pipeline, Option<&'c str>) {
        let mapped = model_type
            .and_then(family::by_model_type)
            .and_then(|f| f.tokenizer.as_ref());
        let overrides = mapped.is_some_and(|m| m.overrides_config);
        let resolve = |name: &'c str| match Pipeline::of_class(name) {
            Some(pipeline) => (pipeline, None),
            None if is_generic(name) => (Pipeline::File, None),
            None => (Pipeline::File, Some(name)),
        };
        if class.is_some_and(|c| base_class(c) == "LlamaTokenizer") && !overrides && byte_level {
            return (Pipeline::File, None);
        }
        match (class, mapped) {
            (Some(named), Some(mapped)) if base_class(named) != base_class(&mapped.class) => {
                if is_generic(&mapped.class) {
                    return (Pipeline::File, None);
                }
                match overrides {
                    true => (
                        Pipeline::of_class(&mapped.class).unwrap_or(Pipeline::File),
                        None,
                    ),
                    false => resolve(named),
                }
            }
            (Some(named), _) => resolve(named),
            (None, Some(mapped)) => (
                Pipeline::of_class(&mapped.class).unwrap_or(Pipeline::File),
                None,
            ),
            (None, None) => (Pipeline::File, None),
        }
    }
}

/// Whether the file's pipeline works on bytes (a byte-level pre-tokenizer,
/// post-processor or decoder), as transformers tells a byte-level file
/// named a Llama tokenizer.
fn is_byte_level(tokenizer: &tokenizers::Tokenizer) -> bool {
    let byte_level = |part: Option<String>| part.is_some_and(|p| p.contains("\"ByteLevel\""));
    byte_level(
        tokenizer
            .get_pre_tokenizer()
            .and_then(|p| serde_json::to_string(p).ok()),
    ) || byte_level(
        tokenizer
            .get_post_processor()
            .and_then(|p| serde_json::to_string(p).ok()),
    ) || byte_level(
        tokenizer
            .get_decoder()
            .and_then(|p| serde_json::to_string(p).ok()),
    )
}

/// Builds `pipeline` over the file's vocabulary and merges, as the
/// class's constructor does: `setting(key)` reads `tokenizer_config.json`
/// (`None`: the key is absent; `Some(None)`: it is `null`), `flag(key,
/// default)` its booleans.
fn rebuild(
    tokenizer: &mut tokenizers::Tokenizer,
    pipeline: Pipeline,
    setting: &dyn Fn(&str) -> Option<Option<String>>,
    flag: &dyn Fn(&str, bool) -> bool,
    dir: &Path,
) -> Result<()> {
    add_special_tokens(tokenizer, pipeline, setting);
    let invalid = |e: tokenizers::Error| NnError::Invalid(format!("{}: {e}", dir.display()));
    let metaspace = |scheme| PreTokenizerWrapper::Metaspace(Metaspace::new('▁', scheme, false));
    let byte_level = |use_regex| {
        PreTokenizerWrapper::ByteLevel(ByteLevel::new(
            flag("add_prefix_space", false),
            flag("trim_offsets", true),
            use_regex,
        ))
    };
    let (normalizer, pre_tokenizer, byte_fallback): (Option<NormalizerWrapper>, _, _) =
        match pipeline {
            Pipeline::File => return Ok(()),
            Pipeline::Llama => {
                let scheme = match (flag("add_prefix_space", true), flag("legacy", false)) {
                    (false, _) => PrependScheme::Never,
                    (true, true) => PrependScheme::Always,
                    (true, false) => PrependScheme::First,
                };
                (None, metaspace(scheme), true)
            }
            Pipeline::CodeLlama => {
                let scheme = match flag("add_prefix_space", true) {
                    true => PrependScheme::First,
                    false => PrependScheme::Never,
                };
                (None, metaspace(scheme), true)
            }
            Pipeline::Qwen2 => {
                let split = Split::new(
                    SplitPattern::Regex(QWEN2_SPLIT.into()),
                    SplitDelimiterBehavior::Isolated,
                    false,
                )
                .map_err(invalid)?;
                let pre = Sequence::new(vec![PreTokenizerWrapper::Split(split), byte_level(false)]);
                (Some(NFC.into()), PreTokenizerWrapper::Sequence(pre), false)
            }
            Pipeline::Gemma => {
                let spaces = Replace::new(" ", "▁").map_err(invalid)?;
                let split = Split::new(
                    SplitPattern::String(" ".into()),
                    SplitDelimiterBehavior::MergedWithPrevious,
                    false,
                )
                .map_err(invalid)?;
                (Some(spaces.into()), PreTokenizerWrapper::Split(split), true)
            }
            Pipeline::Gpt2 => (None, byte_level(true), false),
            Pipeline::GptNeoX => (Some(NFC.into()), byte_level(true), false),
        };
    tokenizer.with_normalizer(normalizer);
    tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
    // The model is built anew from the vocabulary and merges, with the
    // class's options (merges never skipped; an unknown token where the
    // class names one, as `str()` of the configured one, `None` included).
    if let ModelWrapper::BPE(bpe) = tokenizer.get_model() {
        let mut bpe = bpe.clone();
        bpe.ignore_merges = false;
        bpe.byte_fallback = byte_fallback;
        bpe.fuse_unk = byte_fallback;
        bpe.dropout = None;
        bpe.unk_token = match pipeline {
            Pipeline::Gemma | Pipeline::CodeLlama => Some(match setting("unk_token") {
                None => "<unk>".to_owned(),
                Some(token) => token.unwrap_or_else(|| "None".to_owned()),
            }),
            _ => None,
        };
        tokenizer.with_model(bpe);
    }
    match pipeline {
        Pipeline::CodeLlama => {
            // BOS before every text, whatever the file's post-processor says.
            let bos = special_token(pipeline, setting, "bos_token");
            let token = bos.and_then(|t| Some((tokenizer.token_to_id(&t)?, t)));
            let processor = token
                .map(|(id, token)| bos_template(&token, id))
                .transpose()
                .map_err(|e| NnError::Invalid(format!("{}: {e}", dir.display())))?;
            tokenizer.with_post_processor(processor);
        }
        Pipeline::GptNeoX => {
            tokenizer.with_post_processor(None::<PostProcessorWrapper>);
        }
        _ => {}
    }
    Ok(())
}

/// The special tokens a tokenizer class has, in transformers' order.
const SPECIAL_TOKENS: [&str; 7] = [
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
];

/// The class's default for the special token `key` (none for the file's own
/// pipeline: only what the configuration names).
fn class_default(pipeline: Pipeline, key: &str) -> Option<&'static str> {
    match (pipeline, key) {
        (Pipeline::Llama | Pipeline::CodeLlama, "bos_token") => Some("<s>"),
        (Pipeline::Llama | Pipeline::CodeLlama, "eos_token") => Some("</s>"),
        (Pipeline::Llama | Pipeline::CodeLlama | Pipeline::Gemma, "unk_token") => Some("<unk>"),
        (Pipeline::Gemma, "bos_token") => Some("<bos>"),
        (Pipeline::Gemma, "eos_token") => Some("<eos>"),
        (Pipeline::Gemma, "pad_token") => Some("<pad>"),
        (Pipeline::Gemma, "mask_token") => Some("<mask>"),
        (Pipeline::Qwen2, "unk_token" | "eos_token" | "pad_token") => Some("<|endoftext|>"),
        (Pipeline::Gpt2 | Pipeline::GptNeoX, "unk_token" | "bos_token" | "eos_token") => {
            Some("<|endoftext|>")
        }
        (Pipeline::GptNeoX, "pad_token") => Some("<|padding|>"),
        _ => None,
    }
}

/// The special token `key` of the tokenizer: the configuration's (`null`:
/// none), else the class's default.
fn special_token(
    pipeline: Pipeline,
    setting: &dyn Fn(&str) -> Option<Option<String>>,
    key: &str,
) -> Option<String> {
    match setting(key) {
        Some(token) => token,
        None => class_default(pipeline, key).map(str::to_owned),
    }
}

/// Adds the special tokens the vocabulary lacks, as transformers registers
/// them (each a special added token, new ids in order): the class's, and
/// CodeLlama's infilling tokens after them.
fn add_special_tokens(
    tokenizer: &mut tokenizers::Tokenizer,
    pipeline: Pipeline,
    setting: &dyn Fn(&str) -> Option<Option<String>>,
) {
    let mut tokens: Vec<String> = SPECIAL_TOKENS
        .iter()
        .filter_map(|key| special_token(pipeline, setting, key))
        .collect();
    if pipeline == Pipeline::CodeLlama {
        for (key, default) in [
            ("prefix_token", "▁<PRE>"),
            ("middle_token", "▁<MID>"),
            ("suffix_token", "▁<SUF>"),
            ("eot_token", "▁<EOT>"),
            ("fill_token", "<FILL_ME>"),
        ] {
            tokens.extend(setting(key).unwrap_or_else(|| Some(default.to_owned())));
        }
    }
    for token in tokens {
        if tokenizer.token_to_id(&token).is_none() {
            tokenizer.add_special_tokens(&[tokenizers::AddedToken::from(token, true)]);
        }
    }
}

/// A post-processor putting the BOS `token` (`id`) before every text.
fn bos_template(token: &str, id: u32) -> std::result::Result<TemplateProcessing, String> {
    TemplateProcessing::builder()
        .try_single(format!("{token} $A"))?
        .try_pair(format!("{token} $A {token} $B:1"))?
        .special_tokens(vec![(token.to_owned(), id)])
        .build()
        .map_err(|e| e.to_string())
}

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
        let model_config = match files.has("config.json") {
            true => files.json_object("config.json")?,
            false => Default::default(),
        };
        let class = config
            .get("tokenizer_class")
            .or_else(|| model_config.get("tokenizer_class"))
            .and_then(Value::as_str);
        let model_type = model_config.get("model_type").and_then(Value::as_str);
        let (pipeline, unknown) = Pipeline::choose(model_type, class, is_byte_level(&tokenizer));
        if let Some(class) = unknown {
            tracing::warn!(
                "{}: tokenizer class {class}: transformers may build a pipeline of its own for \
                 it, which amalgam does not; tokenizer.json's is used as it is",
                dir.display()
            );
        }
        let flag =
            |key: &str, default: bool| config.get(key).and_then(Value::as_bool).unwrap_or(default);
        // A special token is named as a string or as an added-token object.
        let setting = |key: &str| -> Option<Option<String>> {
            let token = config.get(key)?;
            Some(
                token
                    .as_str()
                    .or_else(|| token.get("content").and_then(Value::as_str))
                    .map(str::to_owned),
            )
        };
        rebuild(&mut tokenizer, pipeline, &setting, &flag, dir)?;
        // The class's BOS (its default where the configuration names none), else EOS.
        let prefix = ["bos_token", "eos_token"].iter().find_map(|key| {
            let token = special_token(pipeline, &setting, key)?;
            tokenizer.token_to_id(&token).map(i64::from)
        });
        // transformers never truncates or pads unless asked; a file's own
        // settings would cut documents short (and each piece of a streamed one).
        tokenizer
            .with_truncation(None)
            .map_err(|e| NnError::Invalid(format!("{}: {e}", dir.display())))?;
        tokenizer.with_padding(None);
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

    /// The tokens of `text` (no special tokens added), with byte offsets
    /// shifted by `at`.
    pub fn encode_at(&self, text: &str, at: usize) -> Result<Vec<Token>> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| NnError::Invalid(format!("cannot tokenize the text: {e}")))?;
        Ok(encoding
            .get_ids()
            .iter()
            .zip(encoding.get_offsets())
            .map(|(&id, &(start, end))| Token {
                id: i64::from(id),
                start: at + start,
                end: at + end,
            })
            .collect())
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

/// A token of a document: its id and the bytes of the document it covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Token {
    pub id: i64,
    pub start: usize,
    pub end: usize,
}

/// The most bytes of a document handed on at once by [`TextFile::read`].
pub const PIECE_BYTES: usize = 1 << 20;

/// A stretch of one document, cut at a character boundary.
#[derive(Debug, Clone, Copy)]
pub struct Piece<'a> {
    pub text: &'a str,
    /// Whether this is the document's first piece.
    pub first: bool,
    /// Whether this is the document's last piece.
    pub last: bool,
    /// Bytes of the file read up to the end of this piece.
    pub read: u64,
}

/// A text file to score, read a piece at a time: a plain file is one
/// document, a `.jsonl` file one per non-blank line (the string at a field).
/// [`TextFile::scan`] checks all of it first (a regular file, UTF-8, every
/// line a JSON object with the field) and counts it, holding no more than
/// [`PIECE_BYTES`] of plain text or one line of JSON at a time.
#[derive(Debug, Clone)]
pub struct TextFile {
    path: PathBuf,
    /// The field of each line (`.jsonl` only).
    field: Option<String>,
    /// Bytes of the file.
    pub file_bytes: u64,
    /// UTF-8 bytes of its documents (what bits per byte divide by).
    pub document_bytes: u64,
    pub documents: u64,
    /// The longest line of a `.jsonl` file, held whole while it is read
    /// (0 for plain text).
    pub longest_line: u64,
}

impl TextFile {
    /// Reads `path` through once, checking and counting it.
    pub fn scan(path: &Path, field: &str) -> Result<Self> {
        let jsonl = path.extension().is_some_and(|e| e == "jsonl");
        let mut file = TextFile {
            path: path.to_owned(),
            field: jsonl.then(|| field.to_owned()),
            file_bytes: 0,
            document_bytes: 0,
            documents: 0,
            longest_line: 0,
        };
        let (mut bytes, mut documents) = (0u64, 0u64);
        let (read, longest) = file.pieces(&mut |piece| {
            bytes += piece.text.len() as u64;
            documents += u64::from(piece.first);
            Ok(true)
        })?;
        file.file_bytes = read;
        file.document_bytes = bytes;
        file.documents = documents;
        file.longest_line = longest;
        Ok(file)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether it is a `.jsonl` file (a document per line).
    pub fn jsonl(&self) -> bool {
        self.field.is_some()
    }

    /// Hands `each` the documents' pieces in order, until it returns false.
    pub fn read(&self, each: &mut dyn FnMut(Piece) -> Result<bool>) -> Result<()> {
        self.pieces(each).map(|_| ())
    }

    /// [`TextFile::read`], returning the bytes read and the longest line.
    fn pieces(&self, each: &mut dyn FnMut(Piece) -> Result<bool>) -> Result<(u64, u64)> {
        let file = amalgam_checkpoint::open_regular(&self.path)?;
        match &self.field {
            None => self.plain_pieces(file, each).map(|read| (read, 0)),
            Some(field) => self.line_pieces(file, field, each),
        }
    }

    fn io_error(&self, e: std::io::Error) -> NnError {
        NnError::Invalid(format!("reading {}: {e}", self.path.display()))
    }

    /// The whole file as one document, [`PIECE_BYTES`] at a time (cut after
    /// a line break where there is one in a piece's second half).
    fn plain_pieces(
        &self,
        mut file: std::fs::File,
        each: &mut dyn FnMut(Piece) -> Result<bool>,
    ) -> Result<u64> {
        let mut buffer: Vec<u8> = Vec::with_capacity(PIECE_BYTES);
        let (mut read, mut eof, mut first) = (0u64, false, true);
        loop {
            while !eof && buffer.len() < PIECE_BYTES {
                let start = buffer.len();
                buffer.resize(PIECE_BYTES, 0);
                let n = loop {
                    match file.read(&mut buffer[start..]) {
                        Ok(n) => break n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(self.io_error(e)),
                    }
                };
                buffer.truncate(start + n);
                read += n as u64;
                eof = n == 0;
            }
            let valid = match std::str::from_utf8(&buffer) {
                Ok(_) => buffer.len(),
                // A character cut by the read: its end comes with the next one.
                Err(e) if e.error_len().is_none() && !eof => e.valid_up_to(),
                Err(e) => {
                    let at = read - buffer.len() as u64 + e.valid_up_to() as u64;
                    return Err(NnError::Invalid(format!(
                        "{}: not UTF-8 text (an invalid byte at offset {at})",
                        self.path.display()
                    )));
                }
            };
            let text = std::str::from_utf8(&buffer[..valid]).expect("checked UTF-8");
            let cut = if eof { valid } else { line_cut(text) };
            let last = eof && cut == buffer.len();
            let piece = Piece {
                text: &text[..cut],
                first,
                last,
                read: read - (buffer.len() - cut) as u64,
            };
            if !each(piece)? || last {
                return Ok(read);
            }
            first = false;
            buffer.drain(..cut);
        }
    }

    /// One document per non-blank line: the string at `field`, handed on
    /// [`PIECE_BYTES`] at a time.
    fn line_pieces(
        &self,
        file: std::fs::File,
        field: &str,
        each: &mut dyn FnMut(Piece) -> Result<bool>,
    ) -> Result<(u64, u64)> {
        let mut reader = std::io::BufReader::with_capacity(64 << 10, file);
        let mut line = Vec::new();
        let (mut read, mut longest, mut number) = (0u64, 0u64, 0usize);
        loop {
            line.clear();
            let n = reader
                .read_until(b'\n', &mut line)
                .map_err(|e| self.io_error(e))?;
            if n == 0 {
                return Ok((read, longest));
            }
            read += n as u64;
            longest = longest.max(n as u64);
            number += 1;
            let at = || format!("{}:{number}", self.path.display());
            let text = std::str::from_utf8(&line)
                .map_err(|e| NnError::Invalid(format!("{}: not UTF-8 text: {e}", at())))?;
            if text.trim().is_empty() {
                continue;
            }
            let record: Value = serde_json::from_str(text)
                .map_err(|e| NnError::Invalid(format!("{}: not a JSON line: {e}", at())))?;
            let document = record
                .get(field)
                .and_then(Value::as_str)
                .ok_or_else(|| NnError::Invalid(format!("{}: no string field {field:?}", at())))?;
            let mut rest = document;
            let mut first = true;
            loop {
                let cut = if rest.len() <= PIECE_BYTES {
                    rest.len()
                } else {
                    line_cut(&rest[..floor_boundary(rest, PIECE_BYTES)])
                };
                let last = cut == rest.len();
                let piece = Piece {
                    text: &rest[..cut],
                    first,
                    last,
                    read,
                };
                if !each(piece)? {
                    return Ok((read, longest));
                }
                if last {
                    break;
                }
                first = false;
                rest = &rest[cut..];
            }
        }
    }
}

/// Where to end a piece of `text` (all of it but for a line break in its
/// second half: just after the last one).
fn line_cut(text: &str) -> usize {
    match text[text.len() / 2..].rfind('\n') {
        Some(at) => text.len() / 2 + at + 1,
        None => text.len(),
    }
}

/// The largest character boundary of `text` at most `at`, but past its
/// first character (a piece always holds one).
fn floor_boundary(text: &str, at: usize) -> usize {
    if at >= text.len() {
        return text.len();
    }
    let mut cut = at;
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    if cut == 0 {
        cut = text.chars().next().map_or(0, char::len_utf8);
    }
    cut
}

/// How a document is encoded a stretch at a time ([`DocumentEncoder`]).
#[derive(Debug, Clone, Copy)]
pub struct Chunking {
    /// New bytes per encoding.
    pub chunk: usize,
    /// Bytes before them encoded again, where the two encodings must agree.
    pub overlap: usize,
    /// The most bytes of a document held (and encoded at once) before giving
    /// up on finding a place to cut.
    pub max_held: usize,
    /// Tokens on each side of a cut that two encodings must share (or as
    /// many as cover a quarter of `overlap`, for long tokens).
    pub agree: usize,
}

/// The chunking `eval --text` uses: 64 KB encoded at a time, 4 KB of it
/// twice, at most 1 MB held where the tokens need more text to settle.
pub const CHUNKING: Chunking = Chunking {
    chunk: 64 << 10,
    overlap: 4 << 10,
    max_held: 1 << 20,
    agree: 16,
};

/// What the tokenizers crate holds at most per byte of text while it
/// encodes (its normalized string with per-byte alignments, the splits, the
/// encoding's per-token vectors and token strings): about 210 bytes for
/// amalgam's byte tokenizer (a token per byte), 60–95 for the published
/// tokenizers of tests/real_tokenizers.rs, measured on 270 KB of the corpus.
pub const ENCODING_BYTES_PER_BYTE: u64 = 256;

impl Chunking {
    /// The most memory a [`DocumentEncoder`] uses: the tokenizer at work on
    /// all it may hold, that text, and two encodings' [`Token`]s (with
    /// room for their buffers' growth).
    pub fn memory_bytes(&self) -> u64 {
        let held = (self.max_held + self.chunk + self.overlap) as u64;
        held.saturating_mul(ENCODING_BYTES_PER_BYTE + 2 + 4 * std::mem::size_of::<Token>() as u64)
    }
}

/// A document's tokens as the tokenizer gives them for the whole document,
/// found a stretch at a time in bounded memory. Each encoding covers the
/// text since the previous one and `overlap` bytes before it (from a line
/// start where there is one); the tokens are cut where the two encodings
/// agree on `agree` tokens (or a quarter of `overlap` in bytes) either side
/// of a token boundary, so that neither the start of the later one nor the
/// end of the earlier one — where the tokenizer saw the text begin or stop:
/// a prepended `▁`, a word cut short — reaches the tokens kept. Where no such
/// place is found, the earlier encoding is redone over more text and the
/// next overlap doubled, up to `max_held` bytes, then the document is refused.
/// crates/nn/tests/streamed_text.rs checks the tokens against whole-document
/// encoding for the published tokenizers (Llama 2, Llama 3, Qwen3, Gemma 3)
/// and the byte tokenizer, cut every few dozen bytes.
pub struct DocumentEncoder<'t> {
    tokenizer: &'t TextTokenizer,
    sizes: Chunking,
    /// The document from byte `held_from` to `received`.
    text: String,
    held_from: usize,
    received: usize,
    /// Tokens from `confirmed` on, of the encoding of `pending_base..encoded_to`.
    pending: Vec<Token>,
    pending_base: usize,
    encoded_to: usize,
    /// Every token before it has been handed on.
    confirmed: usize,
    started: bool,
    /// Cuts missed in a row (each doubles the overlap of the next try).
    misses: u32,
}

impl<'t> DocumentEncoder<'t> {
    pub fn new(tokenizer: &'t TextTokenizer, sizes: Chunking) -> Self {
        let sizes = Chunking {
            chunk: sizes.chunk.max(1),
            agree: sizes.agree.max(1),
            ..sizes
        };
        Self {
            tokenizer,
            sizes,
            text: String::new(),
            held_from: 0,
            received: 0,
            pending: Vec::new(),
            pending_base: 0,
            encoded_to: 0,
            confirmed: 0,
            started: false,
            misses: 0,
        }
    }

    /// Takes the document's next piece; the tokens now settled go to `out`.
    pub fn push(&mut self, piece: &str, out: &mut Vec<Token>) -> Result<()> {
        let mut rest = piece;
        while !rest.is_empty() {
            let room = (self.encoded_to + self.sizes.chunk).saturating_sub(self.received);
            let take = floor_boundary(rest, room.max(1));
            self.text.push_str(&rest[..take]);
            self.received += take;
            rest = &rest[take..];
            if self.received - self.encoded_to >= self.sizes.chunk {
                self.step(false, out)?;
            }
        }
        Ok(())
    }

    /// Ends the document: its remaining tokens go to `out`, and the encoder
    /// is ready for the next document.
    pub fn finish(&mut self, out: &mut Vec<Token>) -> Result<()> {
        let result = self.step(true, out);
        *self = DocumentEncoder::new(self.tokenizer, self.sizes);
        result
    }

    /// Bytes of text and tokens held now (what [`Chunking::memory_bytes`] bounds).
    pub fn held_bytes(&self) -> usize {
        self.text.capacity() + self.pending.capacity() * std::mem::size_of::<Token>()
    }

    fn encode_from(&self, from: usize) -> Result<Vec<Token>> {
        self.tokenizer
            .encode_at(&self.text[from - self.held_from..], from)
    }

    fn step(&mut self, last: bool, out: &mut Vec<Token>) -> Result<()> {
        let end = self.received;
        if !self.started {
            self.started = true;
            let tokens = self.encode_from(self.held_from)?;
            if last {
                out.extend(tokens);
                return Ok(());
            }
            self.pending = tokens;
            self.encoded_to = end;
            return Ok(());
        }
        if last && end == self.encoded_to {
            // The last encoding reached the document's end: its tokens stand.
            out.append(&mut self.pending);
            return Ok(());
        }
        let start = self.overlap_start();
        let fresh = self.encode_from(start)?;
        let lo = start.max(self.confirmed);
        let agreed = agreement(
            &self.pending,
            &fresh,
            (lo, self.encoded_to),
            self.sizes.agree,
            self.sizes.overlap.div_ceil(4),
        );
        match agreed {
            Some((i, j)) => {
                out.extend_from_slice(&self.pending[..i]);
                self.confirmed = self.pending[i].start;
                self.pending = fresh;
                self.pending.drain(..j);
                self.pending_base = start;
                self.misses = 0;
            }
            None => {
                if end - self.pending_base > self.sizes.max_held {
                    return Err(NnError::Invalid(format!(
                        "the tokenizer's tokens around byte {} of a document depend on more \
                         than {} KB of text about them; amalgam encodes long documents a \
                         stretch at a time and finds no place to cut this one",
                        self.encoded_to,
                        self.sizes.max_held >> 10
                    )));
                }
                // The earlier encoding again, over the new text too.
                let wider = self.encode_from(self.pending_base)?;
                let j = continuation(&self.pending, &wider, self.confirmed, self.sizes.agree)
                    .ok_or_else(|| {
                        NnError::Invalid(format!(
                            "the tokenizer's tokens at byte {} of a document change with the \
                             text after them; amalgam cannot encode this document a stretch \
                             at a time",
                            self.confirmed
                        ))
                    })?;
                self.pending = wider;
                self.pending.drain(..j);
                self.misses = (self.misses + 1).min(usize::BITS - 1);
            }
        }
        self.encoded_to = end;
        if last {
            out.append(&mut self.pending);
            return Ok(());
        }
        // Text before the pending encoding's start is never encoded again.
        self.text.drain(..self.pending_base - self.held_from);
        self.held_from = self.pending_base;
        Ok(())
    }

    /// Where the next encoding starts: `overlap` bytes before the end of the
    /// last one (twice as many after each cut missed, for tokens longer than
    /// an overlap holds), moved to the next line start if there is one near.
    fn overlap_start(&self) -> usize {
        let overlap = self.sizes.overlap.saturating_mul(1 << self.misses);
        let mut start = self
            .encoded_to
            .saturating_sub(overlap)
            .max(self.pending_base);
        while !self.text.is_char_boundary(start - self.held_from) {
            start += 1;
        }
        let near = (start + overlap / 2).min(self.encoded_to);
        let mut near_boundary = near;
        while !self.text.is_char_boundary(near_boundary - self.held_from) {
            near_boundary -= 1;
        }
        let window = &self.text[start - self.held_from..near_boundary.max(start) - self.held_from];
        match window.find('\n') {
            Some(at) => start + at + 1,
            None => start,
        }
    }
}

/// Whether a token boundary lies before `tokens[i]` (not inside a character
/// several tokens share, nor after a zero-width token at the same place).
fn boundary(tokens: &[Token], i: usize) -> bool {
    i == 0 || (tokens[i - 1].end <= tokens[i].start && tokens[i - 1].start < tokens[i].start)
}

/// A token boundary of both `earlier` and `later` in `lo..hi` (as near its
/// middle as can be) where both have the same tokens on either side — `agree`
/// of them, or as many as cover `bytes` (for long tokens): the indices of
/// its token in each.
fn agreement(
    earlier: &[Token],
    later: &[Token],
    (lo, hi): (usize, usize),
    agree: usize,
    bytes: usize,
) -> Option<(usize, usize)> {
    let middle = lo + (hi.saturating_sub(lo)) / 2;
    let from = earlier.partition_point(|t| t.start < lo);
    let to = earlier.partition_point(|t| t.start < hi);
    let mut candidates: Vec<usize> = (from..to)
        .filter(|&i| i > 0 && boundary(earlier, i))
        .collect();
    candidates.sort_by_key(|&i| earlier[i].start.abs_diff(middle));
    // Whether the pairs agree on `agree` tokens or `bytes` bytes.
    let settled = |pairs: &mut dyn Iterator<Item = (&Token, &Token)>| {
        let (mut count, mut covered) = (0, 0);
        for (a, b) in pairs {
            if a != b {
                return false;
            }
            count += 1;
            covered += a.end - a.start;
            if count >= agree || covered >= bytes {
                return true;
            }
        }
        false
    };
    candidates.into_iter().find_map(|i| {
        let at = earlier[i].start;
        let j = later.partition_point(|t| t.start < at);
        (later.get(j).is_some_and(|t| t.start == at)
            && boundary(later, j)
            && settled(&mut earlier[..i].iter().rev().zip(later[..j].iter().rev()))
            && settled(&mut earlier[i..].iter().zip(&later[j..])))
        .then_some((i, j))
    })
}

/// Where `wider` (the encoding `pending` came from, redone over more text)
/// continues at `confirmed`: the index of its token there, if it has a
/// boundary there and begins as `pending` does.
fn continuation(
    pending: &[Token],
    wider: &[Token],
    confirmed: usize,
    agree: usize,
) -> Option<usize> {
    let j = wider.partition_point(|t| t.start < confirmed);
    let clean = j == 0
        || (wider[j - 1].end <= confirmed
            && wider.get(j).is_none_or(|t| wider[j - 1].start < t.start));
    let shared = agree.min(pending.len() / 2);
    (clean
        && wider.get(j).map(|t| t.start) == pending.first().map(|t| t.start)
        && wider.len() - j >= shared
        && wider[j..j + shared] == pending[..shared])
        .then_some(j)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The classes AutoTokenizer picked in the oracle tier's folders
    /// (tests/oracle/real_tokenizers.rs), as the rule gives them.
    #[test]
    fn the_pipeline_follows_the_model_type_and_the_class() {
        use Pipeline::*;
        for (model_type, class, byte_level, expected) in [
            // A generic mapping keeps the file's pipeline, whatever is named.
            (Some("mistral"), Some("LlamaTokenizerFast"), false, File),
            (Some("phi3"), Some("LlamaTokenizer"), false, File),
            // A distrusted published class: the model type's wins.
            (Some("qwen2"), Some("LlamaTokenizerFast"), false, Qwen2),
            (Some("qwen2"), Some("PreTrainedTokenizerFast"), false, Qwen2),
            // Otherwise the class named wins, generic meaning the file's.
            (Some("qwen3"), Some("PreTrainedTokenizerFast"), false, File),
            (
                Some("gemma3_text"),
                Some("LlamaTokenizerFast"),
                false,
                Llama,
            ),
            (
                Some("llama"),
                Some("CodeLlamaTokenizerFast"),
                false,
                CodeLlama,
            ),
            (None, Some("GPTNeoXTokenizerFast"), true, GptNeoX),
            // A Llama class over a byte-level file keeps the file's.
            (Some("llama"), Some("LlamaTokenizerFast"), true, File),
            // No class named: the model type's, none for Llama.
            (Some("qwen3_moe"), None, true, Qwen2),
            (Some("starcoder2"), None, true, Gpt2),
            (Some("llama"), None, false, File),
            (
                Some("not_a_model_type"),
                Some("GemmaTokenizer"),
                false,
                Gemma,
            ),
        ] {
            assert_eq!(
                Pipeline::choose(model_type, class, byte_level),
                (expected, None),
                "{model_type:?} {class:?}"
            );
        }
        // A class amalgam builds no pipeline for is named.
        assert_eq!(
            Pipeline::choose(Some("llama"), Some("T5TokenizerFast"), false),
            (File, Some("T5TokenizerFast"))
        );
    }
}
