use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;
use serde::Deserialize;

use crate::error::IoContext;
use crate::files::{duplicate_key, read_capped, ModelDir, MAX_JSON_BYTES};
use crate::{
    kind_from_dtype, mapped::MappedTensor, Error, ModelConfig, Result, CHAT_TEMPLATE_JINJA,
    CHAT_TEMPLATE_JSON, TOKENIZER_CONFIG, TOKENIZER_FILES,
};

pub const SINGLE_FILE: &str = "model.safetensors";
pub const INDEX_FILE: &str = "model.safetensors.index.json";
const PICKLE_SUFFIXES: &[&str] = &[".bin", ".pt", ".pth", ".ckpt", ".pkl", ".bin.index.json"];
/// The safetensors format's own limit on a header.
const MAX_HEADER_BYTES: u64 = 100_000_000;
/// Bytes converted per step when a tensor is read into another dtype.
const CONVERT_CHUNK_BYTES: usize = 8 << 20;

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
    file: File,
}

/// A Hugging Face checkpoint directory opened for reading. Opening validates
/// `config.json`, the index, every shard header and the companion files
/// (tokenizer, generation config: regular files inside the directory); tensor
/// data is read only when asked for, with positioned reads (`pread`) or as
/// guarded mappings ([`Checkpoint::map_as`]): a file truncated while it is
/// read is an error naming it, never a SIGBUS.
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
        let files = ModelDir::new(&dir)?;
        let index_path = dir.join(INDEX_FILE);
        let single_path = dir.join(SINGLE_FILE);
        let (index, shards, placement) = if files.has(INDEX_FILE) {
            let (shards, placement) = open_sharded(&files, &index_path)?;
            (Some(index_path), shards, Some(placement))
        } else if files.has(SINGLE_FILE) {
            (None, vec![open_shard(&files, SINGLE_FILE)?], None)
        } else {
            return Err(refuse_without_weights(&dir));
        };
        let config_path = dir.join("config.json");
        let config = match files.resolve("config.json") {
            Ok(real) => ModelConfig::read_as(&real, &config_path)?,
            Err(Error::Io { cause, .. }) => {
                return Err(Error::Config {
                    path: config_path,
                    message: format!("cannot read config.json: {cause}"),
                })
            }
            Err(e) => return Err(e),
        };
        // Refuse now, not at the end of a long run, a companion file the
        // output would copy from outside the directory.
        for name in TOKENIZER_FILES.iter().filter(|n| files.has(n)) {
            files.resolve(name)?;
        }

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
        if tensors.is_empty() {
            return Err(Error::Input {
                path: index.clone().unwrap_or_else(|| single_path.clone()),
                message: "holds no tensors".into(),
            });
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

    /// The number of blocks: the config's layer count where it has one
    /// (`num_hidden_layers`, or the family's own spelling; refused if the
    /// stored tensors number their layers otherwise), else counted from the
    /// tensor names.
    pub fn layers(&self) -> Result<usize> {
        let stored = crate::arch::layer_count(self.tensors.iter().map(|t| t.name.as_str()));
        match self.config.layer_count() {
            Some(layers) if stored > 0 && stored != layers => Err(Error::Config {
                path: self.dir.join("config.json"),
                message: format!(
                    "`{}` is {layers} but the weights hold {stored} layers",
                    self.config.layer_count_key()
                ),
            }),
            Some(layers) => Ok(layers),
            None => Ok(stored),
        }
    }

    /// The model's `tokenizer.json`, read by the `tokenizers` crate; `None` without one.
    pub fn tokenizer(&self) -> Result<Option<tokenizers::Tokenizer>> {
        ModelDir::new(&self.dir)?.tokenizer()
    }

    /// The chat template the model carries, as transformers finds it:
    /// `chat_template.jinja`, else `chat_template.json`'s or
    /// `tokenizer_config.json`'s `chat_template` (a string, or the entry
    /// named `default` of a list of named templates).
    pub fn chat_template(&self) -> Result<Option<String>> {
        let files = ModelDir::new(&self.dir)?;
        if files.has(CHAT_TEMPLATE_JINJA) {
            let bytes = files.read(CHAT_TEMPLATE_JINJA, MAX_JSON_BYTES, "a chat template")?;
            return Ok(Some(String::from_utf8_lossy(&bytes).into_owned()));
        }
        for name in [CHAT_TEMPLATE_JSON, TOKENIZER_CONFIG] {
            if !files.has(name) {
                continue;
            }
            let template = match files.json_object(name)?.remove("chat_template") {
                Some(serde_json::Value::String(text)) => Some(text),
                Some(serde_json::Value::Array(named)) => named
                    .iter()
                    .find(|t| t["name"] == "default")
                    .and_then(|t| t["template"].as_str().map(str::to_owned)),
                _ => None,
            };
            if template.is_some() {
                return Ok(template);
            }
        }
        Ok(None)
    }

    /// The dtype the model is stored in: its embeddings' (F32 if it has
    /// none this crate recognises).
    pub fn weights_dtype(&self) -> Dtype {
        let family = crate::family::of(self.config());
        self.tensors()
            .iter()
            .find(|t| crate::family::is_embedding(family, &t.name))
            .map_or(Dtype::F32, |t| t.dtype)
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
        let family = crate::family::of(&self.config);
        if self.is_tied() && crate::family::is_head(family, name) {
            if let Some(embedding) = self
                .tensors
                .iter()
                .find(|t| crate::family::is_embedding(family, &t.name))
            {
                return Ok(embedding);
            }
        }
        Err(Error::TensorNotFound {
            dir: self.dir.clone(),
            name: name.into(),
        })
    }

    /// Reads `buf.len()` bytes of a tensor's data starting `offset` bytes into it.
    pub fn read_range(&self, entry: &TensorEntry, offset: u64, buf: &mut [u8]) -> Result<()> {
        let shard = &self.shards[entry.shard];
        let end = offset + buf.len() as u64;
        assert!(
            entry.byte_range.start + end <= entry.byte_range.end,
            "read past tensor {}",
            entry.name
        );
        shard
            .file
            .read_exact_at(buf, entry.byte_range.start + offset)
            .map_err(|cause| match cause.kind() {
                std::io::ErrorKind::UnexpectedEof => Error::Safetensors {
                    path: shard.path.clone(),
                    tensor: Some(entry.name.clone()),
                    message: TRUNCATED_WHILE_READ.into(),
                },
                _ => Error::Io {
                    path: shard.path.clone(),
                    cause,
                },
            })
    }

    /// The raw little-endian bytes of a tensor, read into memory of their own.
    pub fn read_bytes(&self, entry: &TensorEntry) -> Result<Vec<u8>> {
        let mut bytes = vec![0; (entry.byte_range.end - entry.byte_range.start) as usize];
        self.read_range(entry, 0, &mut bytes)?;
        Ok(bytes)
    }

    /// Materialises one tensor as a CPU tch tensor of its own dtype.
    pub fn tensor(&self, name: &str) -> Result<tch::Tensor> {
        let entry = self.entry(name)?;
        let kind = kind_from_dtype(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.into(),
            dtype: entry.dtype,
        })?;
        self.read_as(name, kind)
    }

    /// Materialises one tensor converted to `kind`: the stored bytes are read
    /// straight into the tensor, or, for a conversion, a few MB at a time
    /// and converted into it (no whole-tensor staging copy).
    pub fn read_as(&self, name: &str, kind: tch::Kind) -> Result<tch::Tensor> {
        let entry = self.entry(name)?;
        let stored = kind_from_dtype(entry.dtype).ok_or_else(|| Error::UnsupportedDtype {
            name: name.into(),
            dtype: entry.dtype,
        })?;
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        let torch = |cause| Error::Torch {
            name: name.into(),
            cause,
        };
        let out = tch::Tensor::f_empty(&shape, (kind, tch::Device::Cpu)).map_err(torch)?;
        let numel = entry.numel() as usize;
        if numel == 0 {
            return Ok(out);
        }
        let elem = stored.elt_size_in_bytes();
        if stored == kind {
            // SAFETY: `out` is a new contiguous CPU tensor of numel × elem
            // bytes, owned here; the slice does not outlive this block.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(out.data_ptr() as *mut u8, numel * elem) };
            self.read_range(entry, 0, bytes)?;
            return Ok(out);
        }
        let flat = out.f_view([-1]).map_err(torch)?;
        let chunk = (CONVERT_CHUNK_BYTES / elem).min(numel);
        // u64 words: aligned for every element type.
        let mut buffer = vec![0u64; (chunk * elem).div_ceil(8)];
        for first in (0..numel).step_by(chunk) {
            let n = chunk.min(numel - first);
            // SAFETY: the buffer holds at least chunk × elem bytes.
            let bytes =
                unsafe { std::slice::from_raw_parts_mut(buffer.as_mut_ptr() as *mut u8, n * elem) };
            self.read_range(entry, (first * elem) as u64, bytes)?;
            // SAFETY: `bytes` is live, aligned and n × elem long; the view is
            // consumed by the copy below and never escapes.
            let view = unsafe {
                tch::Tensor::f_from_blob(bytes.as_ptr(), &[n as i64], &[], stored, tch::Device::Cpu)
            }
            .map_err(torch)?;
            flat.f_narrow(0, first as i64, n as i64)
                .and_then(|mut dst| dst.f_copy_(&view))
                .map_err(torch)?;
        }
        Ok(out)
    }

    /// The tensor `name` in `kind` as a mapping of its bytes in the shard
    /// file (no copy), when it is stored in `kind` and can be mapped;
    /// `None` otherwise (read it with [`Checkpoint::read_as`]).
    ///
    /// # Safety
    /// No tensor sharing the mapped tensor's data (a shallow clone, a view,
    /// an op's result that is its input) may be used after the
    /// [`MappedTensor`] is dropped: copy any that [`MappedTensor::contains`]
    /// reports first.
    pub unsafe fn map_as(&self, name: &str, kind: tch::Kind) -> Result<Option<MappedTensor>> {
        let entry = self.entry(name)?;
        if kind_from_dtype(entry.dtype) != Some(kind) {
            return Ok(None);
        }
        let shard = &self.shards[entry.shard];
        let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
        Ok(MappedTensor::map(
            &shard.file,
            &shard.path,
            &entry.name,
            entry.byte_range.start,
            (entry.byte_range.end - entry.byte_range.start) as usize,
            &shape,
            kind,
        ))
    }

    /// Asks the kernel to start reading a tensor's bytes (readahead).
    pub fn prefetch(&self, entry: &TensorEntry) {
        let file = &self.shards[entry.shard].file;
        let len = entry.byte_range.end - entry.byte_range.start;
        // SAFETY: an advisory call on an open descriptor; nothing is borrowed.
        unsafe {
            libc::posix_fadvise(
                file.as_raw_fd(),
                entry.byte_range.start as libc::off_t,
                len as libc::off_t,
                libc::POSIX_FADV_WILLNEED,
            );
        }
    }
}

/// How a read that finds the file shorter than its header said is reported.
pub(crate) const TRUNCATED_WHILE_READ: &str =
    "the file ended before the tensor's data: it was truncated or replaced while amalgam read it";

pub type ShardHeader = (usize, safetensors::tensor::Metadata);
/// Tensor name → shard file, as the index says.
type Placement = BTreeMap<String, String>;

fn open_sharded(
    files: &ModelDir,
    index_path: &Path,
) -> Result<(Vec<(Shard, ShardHeader)>, Placement)> {
    let (file, _) = files.open(INDEX_FILE)?;
    let text = read_capped(file, index_path, MAX_JSON_BYTES, "an index")?;
    let invalid = |message: String| Error::Index {
        path: index_path.into(),
        message,
    };
    if let Some(key) = duplicate_key(&text) {
        return Err(invalid(format!(
            "key {key:?} appears twice (readers disagree on which one counts)"
        )));
    }
    let index: IndexFile = serde_json::from_slice(&text).map_err(|cause| Error::IndexJson {
        path: index_path.into(),
        cause,
    })?;
    if index.weight_map.is_empty() {
        return Err(invalid("weight_map is empty: it places no tensor".into()));
    }
    let mut shard_names: Vec<&String> = index.weight_map.values().collect();
    shard_names.sort();
    shard_names.dedup();
    let mut shards = vec![];
    for shard in shard_names {
        let is_plain_name =
            !shard.is_empty() && !shard.contains(['/', '\\']) && shard != ".." && shard != ".";
        if !is_plain_name {
            return Err(invalid(format!(
                "shard name {shard:?} is not a file name in the checkpoint directory"
            )));
        }
        if !files.has(shard) {
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
        shards.push(open_shard(files, shard)?);
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

fn open_shard(files: &ModelDir, name: &str) -> Result<(Shard, ShardHeader)> {
    let (file, path) = files.open(name)?;
    let header = read_shard_header(&file, &path)?;
    Ok((
        Shard {
            name: name.into(),
            path,
            file,
        },
        header,
    ))
}

/// Reads and validates a shard's header (the safetensors crate's own
/// validation of offsets, dtypes and shapes) against the file's length.
pub fn read_shard_header(file: &File, path: &Path) -> Result<ShardHeader> {
    let fail = |tensor: Option<&str>, message: String| Error::Safetensors {
        path: path.into(),
        tensor: tensor.map(str::to_owned),
        message,
    };
    let file_len = file.metadata().at(path)?.len();
    let mut prefix = [0u8; 8];
    if file_len < 8 || file.read_exact_at(&mut prefix, 0).is_err() {
        return Err(fail(
            None,
            format!(
                "file is {file_len} bytes, too short to hold a safetensors header (truncated?)"
            ),
        ));
    }
    let declared = u64::from_le_bytes(prefix);
    if declared > MAX_HEADER_BYTES && declared <= file_len - 8 {
        return Err(fail(
            None,
            format!("header length {declared} bytes is larger than safetensors allows (100 MB)"),
        ));
    }
    if declared > file_len - 8 {
        return Err(fail(
            None,
            format!(
                "header length {declared} bytes goes beyond the end of the {file_len}-byte file \
                 (truncated, or not a safetensors file)"
            ),
        ));
    }
    let mut header = vec![0u8; declared as usize];
    file.read_exact_at(&mut header, 8).at(path)?;
    let text = std::str::from_utf8(&header)
        .map_err(|e| fail(None, format!("header is not UTF-8: {e}")))?;
    if let Some(key) = duplicate_key(text.as_bytes()) {
        return Err(fail(
            Some(&key),
            "listed twice in the header (readers disagree on which entry counts)".into(),
        ));
    }
    let data_len = file_len - 8 - declared;
    match serde_json::from_str::<Metadata>(text) {
        Ok(metadata) if metadata.data_len() as u64 == data_len => Ok((header.len(), metadata)),
        Ok(_) => Err(diagnose(
            &header_entries(text).unwrap_or_default(),
            data_len,
            "invalid safetensors file".into(),
            fail,
        )),
        Err(e) if e.is_syntax() || e.is_eof() => Err(fail(
            None,
            format!("header is not valid safetensors JSON: {e}"),
        )),
        Err(e) => Err(diagnose(
            &header_entries(text).unwrap_or_default(),
            data_len,
            format!("header is not valid safetensors JSON: {e}"),
            fail,
        )),
    }
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

/// Names the tensor at fault in a header the safetensors crate refused (or
/// one whose data does not fill the file); `otherwise` when none is.
fn diagnose(
    entries: &[(String, TensorInfo)],
    data_len: u64,
    otherwise: String,
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
        let (start, end) = (info.data_offsets.0 as u64, info.data_offsets.1 as u64);
        if start != expected_start || end < start {
            return fail(
                Some(name),
                format!(
                    "data_offsets [{start}, {end}] overlap the previous tensor or leave a gap \
                     (expected it to start at {expected_start})"
                ),
            );
        }
        match needed(info).map(|b| b as u64) {
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
    match entries.last() {
        Some((name, _)) if data_len > expected_start => fail(
            Some(name),
            format!(
                "{} bytes of unaccounted data after the last tensor",
                data_len - expected_start
            ),
        ),
        _ => fail(None, otherwise),
    }
}

/// The header's tensor entries sorted by offset, for diagnostics only.
fn header_entries(header: &str) -> Option<Vec<(String, TensorInfo)>> {
    let map: serde_json::Map<String, serde_json::Value> = serde_json::from_str(header).ok()?;
    let mut entries: Vec<(String, TensorInfo)> = map
        .into_iter()
        .filter(|(k, _)| k != "__metadata__")
        .filter_map(|(k, v)| Some((k, serde_json::from_value(v).ok()?)))
        .collect();
    entries.sort_by_key(|(_, info)| info.data_offsets);
    Some(entries)
}
