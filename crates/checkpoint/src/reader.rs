use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{tensor::TensorInfo, Dtype, SafeTensorError, SafeTensors};
use serde::Deserialize;

use crate::arch::{classify, Role};
use crate::error::IoContext;
use crate::{kind_from_dtype, Error, ModelConfig, Result};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
const PICKLE_SUFFIXES: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".pkl", ".bin.index.json"];

/// One stored tensor, as listed by the headers (nothing read yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorEntry {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Index into [`Checkpoint::shard_names`].
    pub shard: usize,
    /// Absolute byte range of the data within the shard file.
    pub byte_range: Range<u64>,
}

impl TensorEntry {
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }
}

struct Shard {
    name: String,
    path: PathBuf,
    mmap: Mmap,
}

/// A Hugging Face checkpoint directory opened for reading. Opening validates
/// `config.json`, the index and every shard header; tensor data is read only
/// when asked for, from memory maps.
pub struct Checkpoint {
    dir: PathBuf,
    config: ModelConfig,
    index: Option<PathBuf>,
    shards: Vec<Shard>,
    tensors: Vec<TensorEntry>,
    by_name: HashMap<String, usize>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        if !std::fs::metadata(&dir).at(&dir)?.is_dir() {
            return Err(Error::NotADirectory { path: dir });
        }
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (index, shards, placement) = if index_path.exists() {
            let (shards, placement) = open_sharded(&dir, &index_path)?;
            (Some(index_path), shards, Some(placement))
        } else if single_path.exists() {
            (None, vec![open_shard(&dir, SINGLE_FILE)?], None)
        } else {
            return Err(refuse_without_weights(&dir));
        };
        let config = ModelConfig::read(&dir.join("config.json"))?;

        let mut tensors = vec![];
        for (shard_index, (shard, metadata)) in shards.iter().enumerate() {
            let data_start = 8 + metadata.0 as u64;
            for name in metadata.1.offset_keys() {
                let info = metadata
                    .1
                    .info(&name)
                    .expect("offset_keys lists known tensors");
                if let Some(placement) = &placement {
                    check_placement(placement, index.as_deref().unwrap(), &shard.name, &name)?;
                }
                tensors.push(TensorEntry {
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    shard: shard_index,
                    byte_range: data_start + info.data_offsets.0 as u64
                        ..data_start + info.data_offsets.1 as u64,
                    name,
                });
            }
        }
        // Empty tensors share offsets, so the header alone cannot order them; use names.
        tensors.sort_by(|a, b| {
            (a.shard, a.byte_range.start, a.byte_range.end, &a.name).cmp(&(
                b.shard,
                b.byte_range.start,
                b.byte_range.end,
                &b.name,
            ))
        });
        let mut by_name = HashMap::with_capacity(tensors.len());
        for (i, entry) in tensors.iter().enumerate() {
            if let Some(previous) = by_name.insert(entry.name.clone(), i) {
                let path = index.clone().unwrap_or_else(|| single_path.clone());
                return Err(Error::IndexMismatch {
                    path,
                    tensor: entry.name.clone(),
                    message: format!(
                        "stored in both {} and {}",
                        shards[tensors[previous].shard].0.name, shards[entry.shard].0.name
                    ),
                });
            }
        }
        if let (Some(placement), Some(index)) = (&placement, &index) {
            if let Some(name) = placement.keys().find(|n| !by_name.contains_key(*n)) {
                return Err(Error::IndexMismatch {
                    path: index.clone(),
                    tensor: name.clone(),
                    message: format!(
                        "the index places it in {} but that shard does not contain it",
                        placement[name]
                    ),
                });
            }
        }
        Ok(Self {
            dir,
            config,
            index,
            shards: shards.into_iter().map(|(s, _)| s).collect(),
            tensors,
            by_name,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The index file, for a sharded checkpoint.
    pub fn index_path(&self) -> Option<&Path> {
        self.index.as_deref()
    }

    /// Every stored tensor, shard by shard in file order.
    pub fn tensors(&self) -> &[TensorEntry] {
        &self.tensors
    }

    pub fn shard_names(&self) -> impl ExactSizeIterator<Item = &str> {
        self.shards.iter().map(|s| s.name.as_str())
    }

    pub fn shard_path(&self, shard: usize) -> &Path {
        &self.shards[shard].path
    }

    /// Parameters stored in the files (a tied head is stored once, counted once).
    pub fn parameter_count(&self) -> u64 {
        self.tensors.iter().map(TensorEntry::numel).sum()
    }

    pub fn is_tied(&self) -> bool {
        self.config.tie_word_embeddings()
    }

    /// Looks a tensor up by name. In a tied checkpoint that does not store the
    /// output head, the head's name resolves to the input embedding.
    pub fn entry(&self, name: &str) -> Result<&TensorEntry> {
        if let Some(&i) = self.by_name.get(name) {
            return Ok(&self.tensors[i]);
        }
        if self.is_tied() && classify(name).role == Role::LmHead {
            if let Some(embedding) = self
                .tensors
                .iter()
                .find(|t| classify(&t.name).role == Role::Embedding)
            {
                return Ok(embedding);
            }
        }
        Err(Error::TensorNotFound {
            dir: self.dir.clone(),
            name: name.into(),
        })
    }

    /// The raw little-endian bytes of a tensor, straight from the memory map.
    pub fn bytes(&self, entry: &TensorEntry) -> &[u8] {
        let range = entry.byte_range.start as usize..entry.byte_range.end as usize;
        &self.shards[entry.shard].mmap[range]
    }

    /// Materialises one tensor as a CPU tch tensor of its own dtype (a copy out of the map).
    pub fn tensor(&self, name: &str) -> Result<tch::Tensor> {
        let entry = self.entry(name)?;
        let kind = kind_from_dtype(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.into(),
            dtype: entry.dtype,
        })?;
        self.read_as(name, kind)
    }

    /// Materialises one tensor converted to `kind`, in memory of its own: the
    /// conversion reads the mapped bytes directly (one pass, no staging copy).
    pub fn read_as(&self, name: &str, kind: tch::Kind) -> Result<tch::Tensor> {
        let entry = self.entry(name)?;
        let stored = kind_from_dtype(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.into(),
            dtype: entry.dtype,
        })?;
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        let bytes = self.bytes(entry);
        let torch = |cause| Error::Torch {
            name: name.into(),
            cause,
        };
        if bytes.is_empty() || (bytes.as_ptr() as usize) % stored.elt_size_in_bytes() != 0 {
            // Nothing to view, or a view libtorch may not read unaligned: copy first.
            let owned = tch::Tensor::f_from_data_size(bytes, &shape, stored).map_err(torch)?;
            return owned.f_to_kind(kind).map_err(torch);
        }
        // SAFETY: `bytes` is a live, read-only, element-aligned region of exactly
        // numel × element size bytes (validated at open). The view is consumed
        // here by a copy or conversion into a new tensor and never escapes.
        let view = unsafe {
            tch::Tensor::f_from_blob(bytes.as_ptr(), &shape, &[], stored, tch::Device::Cpu)
        }
        .map_err(torch)?;
        if stored == kind {
            Ok(view.copy())
        } else {
            view.f_to_kind(kind).map_err(torch)
        }
    }

    /// Asks the kernel to start reading a tensor's bytes (readahead).
    pub fn prefetch(&self, entry: &TensorEntry) {
        let mmap = &self.shards[entry.shard].mmap;
        let (start, len) = (
            entry.byte_range.start as usize,
            (entry.byte_range.end - entry.byte_range.start) as usize,
        );
        let _ = mmap.advise_range(memmap2::Advice::WillNeed, start, len);
    }

    /// Drops a tensor's pages from this process's resident memory once it has
    /// been read; they stay in the page cache, so a later read costs no I/O.
    pub fn release(&self, entry: &TensorEntry) {
        let mmap = &self.shards[entry.shard].mmap;
        let (start, len) = (
            entry.byte_range.start as usize,
            (entry.byte_range.end - entry.byte_range.start) as usize,
        );
        // SAFETY: the map is private and read-only, so MADV_DONTNEED only drops
        // clean pages, which are re-read from the file if touched again; no
        // reference into the range is held across this call by amalgam.
        let _ =
            unsafe { mmap.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, len) };
    }
}

type ShardHeader = (usize, safetensors::tensor::Metadata);
/// Tensor name → shard file, as the index says.
type Placement = BTreeMap<String, String>;

fn open_sharded(dir: &Path, index_path: &Path) -> Result<(Vec<(Shard, ShardHeader)>, Placement)> {
    let text = std::fs::read(index_path).at(index_path)?;
    let index: IndexFile = serde_json::from_slice(&text).map_err(|e| Error::Index {
        path: index_path.into(),
        message: e.to_string(),
    })?;
    let mut shard_names: Vec<&String> = index.weight_map.values().collect();
    shard_names.sort();
    shard_names.dedup();
    let mut shards = vec![];
    for shard in shard_names {
        let is_plain_name =
            !shard.is_empty() && !shard.contains(['/', '\\']) && shard != ".." && shard != ".";
        if !is_plain_name {
            return Err(Error::Index {
                path: index_path.into(),
                message: format!(
                    "shard name {shard:?} is not a file name in the checkpoint directory"
                ),
            });
        }
        if !dir.join(shard).exists() {
            let tensor = index
                .weight_map
                .iter()
                .find(|(_, s)| *s == shard)
                .map(|(t, _)| t.clone())
                .unwrap_or_default();
            return Err(Error::ShardMissing {
                index: index_path.into(),
                shard: shard.clone(),
                tensor,
            });
        }
        shards.push(open_shard(dir, shard)?);
    }
    Ok((shards, index.weight_map))
}

fn check_placement(placement: &Placement, index: &Path, shard: &str, tensor: &str) -> Result<()> {
    match placement.get(tensor) {
        Some(placed) if placed == shard => Ok(()),
        Some(placed) => Err(Error::IndexMismatch {
            path: index.into(),
            tensor: tensor.into(),
            message: format!("stored in {shard} but the index places it in {placed}"),
        }),
        None => Err(Error::IndexMismatch {
            path: index.into(),
            tensor: tensor.into(),
            message: format!("stored in {shard} but missing from the index's weight_map"),
        }),
    }
}

fn open_shard(dir: &Path, name: &str) -> Result<(Shard, ShardHeader)> {
    let path = dir.join(name);
    let file = File::open(&path).at(&path)?;
    // SAFETY: the map is read-only; amalgam never writes to an input, and a
    // checkpoint modified by another process while being read is out of scope
    // (as for every mmap-based safetensors reader).
    let mmap = unsafe { Mmap::map(&file) }.at(&path)?;
    let header = SafeTensors::read_metadata(&mmap).map_err(|e| header_error(&path, &mmap, e))?;
    Ok((
        Shard {
            name: name.into(),
            path,
            mmap,
        },
        header,
    ))
}

fn refuse_without_weights(dir: &Path) -> Error {
    let pickle = std::fs::read_dir(dir).ok().and_then(|entries| {
        entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .find(|name| PICKLE_SUFFIXES.iter().any(|s| name.ends_with(s)))
    });
    match pickle {
        Some(file) => Error::PickleRefused {
            dir: dir.into(),
            file,
        },
        None => Error::NoWeights { dir: dir.into() },
    }
}

/// Turns the safetensors crate's verdict into a message that names the
/// tensor at fault, re-reading the (already valid JSON) header to find it.
fn header_error(path: &Path, buffer: &[u8], error: SafeTensorError) -> Error {
    let fail = |tensor: Option<&str>, message: String| Error::Safetensors {
        path: path.into(),
        tensor: tensor.map(str::to_owned),
        message,
    };
    let file_len = buffer.len();
    let declared = buffer
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().unwrap()));
    match error {
        SafeTensorError::HeaderTooSmall => fail(
            None,
            format!(
                "file is {file_len} bytes, too short to hold a safetensors header (truncated?)"
            ),
        ),
        SafeTensorError::HeaderTooLarge | SafeTensorError::InvalidHeaderLength => fail(
            None,
            format!(
                "header length {} bytes goes beyond the end of the {file_len}-byte file \
                 (truncated, or not a safetensors file)",
                declared.unwrap_or(0)
            ),
        ),
        SafeTensorError::InvalidHeader(e) => fail(None, format!("header is not UTF-8: {e}")),
        SafeTensorError::InvalidHeaderDeserialization(e) => {
            fail(None, format!("header is not valid safetensors JSON: {e}"))
        }
        other => {
            let entries = header_entries(buffer).unwrap_or_default();
            let data_len = file_len.saturating_sub(8 + declared.unwrap_or(0) as usize);
            diagnose(&entries, data_len, other, fail)
        }
    }
}

fn diagnose(
    entries: &[(String, TensorInfo)],
    data_len: usize,
    error: SafeTensorError,
    fail: impl Fn(Option<&str>, String) -> Error,
) -> Error {
    let needed = |info: &TensorInfo| {
        info.shape
            .iter()
            .try_fold(info.dtype.bitsize(), |acc, &d| acc.checked_mul(d))
            .map(|bits| bits / 8)
    };
    let mut expected_start = 0;
    for (name, info) in entries {
        let (start, end) = info.data_offsets;
        if start != expected_start || end < start {
            return fail(
                Some(name),
                format!(
                    "data_offsets [{start}, {end}] overlap the previous tensor or leave a gap \
                     (expected it to start at {expected_start})"
                ),
            );
        }
        match needed(info) {
            Some(bytes) if bytes == end - start => {}
            Some(bytes) => {
                return fail(
                    Some(name),
                    format!(
                        "data_offsets [{start}, {end}] hold {} bytes but shape {:?} of {:?} needs {bytes}",
                        end - start,
                        info.shape,
                        info.dtype
                    ),
                )
            }
            None => return fail(Some(name), format!("shape {:?} overflows", info.shape)),
        }
        if end > data_len {
            return fail(
                Some(name),
                format!(
                    "data_offsets [{start}, {end}] run past the end of the file, which holds \
                     {data_len} bytes of tensor data (truncated file or offsets out of range)"
                ),
            );
        }
        expected_start = end;
    }
    match (error, entries.last()) {
        (SafeTensorError::MetadataIncompleteBuffer, Some((name, _))) => fail(
            Some(name),
            format!(
                "{} bytes of unaccounted data after the last tensor",
                data_len - expected_start
            ),
        ),
        (other, _) => fail(None, format!("invalid safetensors file: {other:?}")),
    }
}

/// The header's tensor entries sorted by offset, for diagnostics only.
fn header_entries(buffer: &[u8]) -> Option<Vec<(String, TensorInfo)>> {
    let n = u64::from_le_bytes(buffer.get(..8)?.try_into().ok()?) as usize;
    let header = buffer.get(8..8usize.checked_add(n)?)?;
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(header).ok()?;
    let mut entries: Vec<(String, TensorInfo)> = map
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    Some(entries)
}
