//! The files of a model directory, read as a hostile directory may hand them
//! over: only regular files (never a FIFO or device that blocks or reads
//! forever), only files that resolve inside the directory (a symlink to a
//! secret elsewhere is not copied into an output that users publish), and
//! JSON read with a size cap and duplicate keys refused (a reader that keeps
//! the last of two values silently disagrees with one that keeps the first).
//!
//! A Hugging Face cache snapshot (`…/models--org--name/snapshots/REV/`) is
//! made of symlinks into the same cache entry's `blobs/`; exactly those are
//! allowed besides the directory itself.

use std::collections::HashSet;
use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::error::IoContext;
use crate::{Error, Result};

/// The most bytes of a `config.json` or index read: real ones are kilobytes
/// (an index of a 400B model is a few MB); more is not a config.
pub const MAX_JSON_BYTES: u64 = 64 << 20;

/// A model directory whose files may be read.
#[derive(Debug, Clone)]
pub struct ModelDir {
    /// The directory as given, for messages.
    dir: PathBuf,
    /// Where its files may resolve: the directory itself (canonical) and, for
    /// a cache snapshot, the cache entry's `blobs/`.
    allowed: Vec<PathBuf>,
}

impl ModelDir {
    pub fn new(dir: &Path) -> Result<Self> {
        if !std::fs::metadata(dir).at(dir)?.is_dir() {
            return Err(Error::NotADirectory { path: dir.into() });
        }
        let root = std::fs::canonicalize(dir).at(dir)?;
        let mut allowed = vec![root.clone()];
        if let Some(blobs) = snapshot_blobs(&root) {
            allowed.push(blobs);
        }
        Ok(Self {
            dir: dir.into(),
            allowed,
        })
    }

    /// Whether the directory has an entry `name` (a dangling link counts).
    pub fn has(&self, name: &str) -> bool {
        std::fs::symlink_metadata(self.dir.join(name)).is_ok()
    }

    /// The file `name` resolves to, refused unless it is a regular file
    /// inside the directory (or the snapshot's blobs).
    pub fn resolve(&self, name: &str) -> Result<PathBuf> {
        let path = self.dir.join(name);
        let real = std::fs::canonicalize(&path).at(&path)?;
        if !self.allowed.iter().any(|a| real.starts_with(a)) {
            return Err(Error::Input {
                path,
                message: format!(
                    "resolves to {}, outside the model directory; amalgam reads and copies only \
                     files inside it (copy the file in if you mean to use it)",
                    real.display()
                ),
            });
        }
        let kind = std::fs::metadata(&real).at(&path)?.file_type();
        if !kind.is_file() {
            return Err(not_regular(&path, kind));
        }
        Ok(real)
    }

    /// Opens the regular file `name` resolves to; returns it with its path
    /// as the directory names it (for messages).
    pub fn open(&self, name: &str) -> Result<(File, PathBuf)> {
        let real = self.resolve(name)?;
        let path = self.dir.join(name);
        let file = open_regular(&real).map_err(|e| match e {
            Error::Io { cause, .. } => Error::Io {
                path: path.clone(),
                cause,
            },
            Error::Input { message, .. } => Error::Input {
                path: path.clone(),
                message,
            },
            other => other,
        })?;
        Ok((file, path))
    }
}

impl ModelDir {
    /// The file `name`, at most `limit` bytes (`what` it is, for the message).
    pub fn read(&self, name: &str, limit: u64, what: &str) -> Result<Vec<u8>> {
        let (file, path) = self.open(name)?;
        read_capped(file, &path, limit, what)
    }

    /// The directory's `tokenizer.json`, read by the `tokenizers` crate; `None` without one.
    pub fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        if !self.has(TOKENIZER_JSON) {
            return Ok(None);
        }
        let text = self.read(TOKENIZER_JSON, MAX_TOKENIZER_BYTES, "a tokenizer.json")?;
        check_added_tokens(&text, &self.dir.join(TOKENIZER_JSON))?;
        let tokenizer = tokenizers::Tokenizer::from_bytes(&text).map_err(|e| Error::Input {
            path: self.dir.join(TOKENIZER_JSON),
            message: format!("not a tokenizer the `tokenizers` library reads: {e}"),
        })?;
        Ok(Some(tokenizer))
    }

    /// The JSON object in the file `name` (a companion file such as
    /// `tokenizer_config.json`), capped at [`MAX_JSON_BYTES`].
    pub fn json_object(&self, name: &str) -> Result<serde_json::Map<String, serde_json::Value>> {
        let bytes = self.read(name, MAX_JSON_BYTES, "a JSON file")?;
        serde_json::from_slice(&bytes).map_err(|e| Error::Input {
            path: self.dir.join(name),
            message: format!("not a JSON object: {e}"),
        })
    }
}

const TOKENIZER_JSON: &str = "tokenizer.json";

/// The longest added token (in bytes) a tokenizer may carry. The `tokenizers`
/// library builds its added-token matcher in time quadratic in a token's
/// length when the token repeats itself (one 16 KB token took seconds, 256 KB
/// more than five minutes), on every load and every token added; real added
/// tokens (special and chat markers, whitespace runs) are tens of bytes. With
/// every added token at most this long, loading costs at most a constant
/// times the tokens' total length.
pub const MAX_ADDED_TOKEN_BYTES: usize = 1024;

/// Refuses a `tokenizer.json` (at `path`, for the message) with an added
/// token longer than [`MAX_ADDED_TOKEN_BYTES`], before the `tokenizers`
/// library reads it. Text that is not such a file is left to that library.
fn check_added_tokens(text: &[u8], path: &Path) -> Result<()> {
    #[derive(serde::Deserialize)]
    struct Head {
        #[serde(default)]
        added_tokens: Vec<Added>,
    }
    #[derive(serde::Deserialize)]
    struct Added {
        #[serde(default)]
        id: Option<u64>,
        #[serde(default)]
        content: String,
    }
    let Ok(head) = serde_json::from_slice::<Head>(text) else {
        return Ok(());
    };
    match head
        .added_tokens
        .iter()
        .find(|t| t.content.len() > MAX_ADDED_TOKEN_BYTES)
    {
        Some(token) => Err(Error::Input {
            path: path.into(),
            message: format!(
                "added token {} is {} bytes long; amalgam reads added tokens of at most \
                 {MAX_ADDED_TOKEN_BYTES} bytes (the tokenizers library's matcher takes time \
                 quadratic in a token's length)",
                token
                    .id
                    .map_or_else(|| "(without an id)".into(), |id| format!("id {id}")),
                token.content.len()
            ),
        }),
        None => Ok(()),
    }
}

/// The most bytes of a `tokenizer.json` read (the largest published ones are
/// tens of MB).
const MAX_TOKENIZER_BYTES: u64 = 512 << 20;

/// `…/models--org--name/blobs` when `root` is `…/models--org--name/snapshots/REV`.
fn snapshot_blobs(root: &Path) -> Option<PathBuf> {
    let snapshots = root.parent()?;
    let entry = snapshots.parent()?;
    let entry_name = entry.file_name()?.to_str()?;
    let is_snapshot = snapshots.file_name()? == "snapshots"
        && ["models--", "datasets--", "spaces--"]
            .iter()
            .any(|p| entry_name.starts_with(p));
    is_snapshot.then(|| entry.join("blobs"))
}

fn not_regular(path: &Path, kind: std::fs::FileType) -> Error {
    let what = if kind.is_fifo() {
        "a FIFO"
    } else if kind.is_char_device() {
        "a character device"
    } else if kind.is_block_device() {
        "a block device"
    } else if kind.is_socket() {
        "a socket"
    } else if kind.is_dir() {
        "a directory"
    } else {
        "not a regular file"
    };
    Error::Input {
        path: path.into(),
        message: format!("is {what}; amalgam reads only regular files"),
    }
}

/// Opens a path for reading only if it is a regular file. The open does not
/// block on a FIFO (O_NONBLOCK) and the type is checked on the opened file,
/// so a swap between check and open cannot slip a device in.
pub fn open_regular(path: &Path) -> Result<File> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .at(path)?;
    let kind = file.metadata().at(path)?.file_type();
    if !kind.is_file() {
        return Err(not_regular(path, kind));
    }
    Ok(file)
}

/// Reads a regular file of at most `limit` bytes; `what` names it in the
/// refusal ("a config.json").
pub fn read_regular(path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    read_capped(open_regular(path)?, path, limit, what)
}

pub(crate) fn read_capped(file: File, path: &Path, limit: u64, what: &str) -> Result<Vec<u8>> {
    let mut bytes = vec![];
    file.take(limit + 1).read_to_end(&mut bytes).at(path)?;
    if bytes.len() as u64 > limit {
        return Err(Error::Input {
            path: path.into(),
            message: format!(
                "larger than {}, too large for {what}",
                if limit >= 1 << 20 {
                    format!("{} MB", limit >> 20)
                } else {
                    format!("{limit} bytes")
                }
            ),
        });
    }
    Ok(bytes)
}

/// The first key that appears twice in one object of a JSON document, at any
/// depth; `None` for a document without duplicates (or one that is not JSON:
/// the typed parse that follows reports that).
pub fn duplicate_key(json: &[u8]) -> Option<String> {
    serde_json::from_slice::<FirstDuplicate>(json).ok()?.0
}

/// Walks any JSON value and keeps the first duplicate key it meets.
struct FirstDuplicate(Option<String>);

impl<'de> Deserialize<'de> for FirstDuplicate {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(FirstDuplicateVisitor)
    }
}

struct FirstDuplicateVisitor;

impl<'de> Visitor<'de> for FirstDuplicateVisitor {
    type Value = FirstDuplicate;

    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<FirstDuplicate, A::Error> {
        let mut seen = HashSet::new();
        let mut first = None;
        while let Some(key) = map.next_key::<String>()? {
            let inner = map.next_value::<FirstDuplicate>()?.0;
            if first.is_none() {
                first = inner.or_else(|| (!seen.insert(key.clone())).then_some(key));
            }
        }
        Ok(FirstDuplicate(first))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<FirstDuplicate, A::Error> {
        let mut first = None;
        while let Some(inner) = seq.next_element::<FirstDuplicate>()? {
            first = first.or(inner.0);
        }
        Ok(FirstDuplicate(first))
    }

    fn visit_bool<E>(self, _: bool) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_i64<E>(self, _: i64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_u64<E>(self, _: u64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_f64<E>(self, _: f64) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_str<E>(self, _: &str) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
    fn visit_unit<E>(self) -> Result<FirstDuplicate, E> {
        Ok(FirstDuplicate(None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicate_keys_are_found_at_any_depth() {
        assert_eq!(duplicate_key(br#"{"a": 1, "b": 2}"#), None);
        assert_eq!(duplicate_key(br#"{"a": 1, "a": 2}"#).as_deref(), Some("a"));
        assert_eq!(
            duplicate_key(br#"{"w": {"x.weight": "1", "y": [1, {"z": 0}], "x.weight": "2"}}"#)
                .as_deref(),
            Some("x.weight")
        );
        assert_eq!(duplicate_key(br#"[{"k": 1}, {"k": 2}]"#), None);
        assert_eq!(duplicate_key(b"{not json"), None);
    }

    #[test]
    fn cache_snapshots_allow_their_own_blobs() {
        let root = Path::new("/c/hub/models--org--name/snapshots/abc123");
        assert_eq!(
            snapshot_blobs(root),
            Some(PathBuf::from("/c/hub/models--org--name/blobs"))
        );
        assert_eq!(snapshot_blobs(Path::new("/data/models/llama")), None);
        assert_eq!(snapshot_blobs(Path::new("/x/snapshots/abc")), None);
    }
}
