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

use std::io::{BufRead, Read};
use std::path::{Path, PathBuf};

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
