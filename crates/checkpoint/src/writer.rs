use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::error::IoContext;
use crate::layout::{ShardLayout, TensorSpec, DEFAULT_SHARD_BYTES};
use crate::reader::INDEX_FILE;
use crate::{dtype_from_kind, Error, ModelCard, ModelConfig, Result, TOKENIZER_FILES};

/// How an output directory is written.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub max_shard_bytes: u64,
    /// Replace a non-empty output directory.
    pub force: bool,
    /// Input checkpoint directories: the output may not be, contain or lie inside any of them.
    pub inputs: Vec<PathBuf>,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: DEFAULT_SHARD_BYTES,
            force: false,
            inputs: vec![],
        }
    }
}

/// What goes into the output besides the weights.
pub struct Finish<'a> {
    /// The base `config.json`; its `torch_dtype` is set to the weights' dtype.
    pub config: &'a ModelConfig,
    /// Where tokenizer files and `generation_config.json` are copied from.
    pub tokenizer_source: Option<&'a Path>,
    /// Further files (name, contents) written as given.
    pub extra_files: &'a [(&'a str, Vec<u8>)],
    pub card: &'a ModelCard,
}

struct Slot {
    shard: usize,
    offset: u64,
    spec: usize,
}

/// Streams a checkpoint to disk. Every shard file is laid out (header written,
/// size set) when the writer is created, so tensor data can arrive in any
/// order, from any thread, and goes straight to its place in the file; nothing
/// is buffered per shard. Everything is written inside a hidden sibling of the
/// output directory, which [`CheckpointWriter::finish`] fsyncs and renames
/// into place; dropping an unfinished writer removes it.
pub struct CheckpointWriter {
    out: PathBuf,
    staging: PathBuf,
    layout: ShardLayout,
    specs: Vec<(usize, TensorSpec)>,
    files: Vec<File>,
    slots: HashMap<String, Slot>,
    /// Bytes written so far, per planned tensor.
    written: Vec<AtomicU64>,
    committed: bool,
}

impl CheckpointWriter {
    pub fn create(out: &Path, specs: Vec<TensorSpec>, options: &WriteOptions) -> Result<Self> {
        let out = absolute_output(out)?;
        for input in &options.inputs {
            let input = std::fs::canonicalize(input).at(input)?;
            if out.starts_with(&input) || input.starts_with(&out) {
                return Err(Error::OutputOverlapsInput { output: out, input });
            }
        }
        if out.exists() {
            if !out.is_dir() {
                return Err(Error::Write {
                    path: out,
                    message: "exists and is not a directory".into(),
                });
            }
            let empty = std::fs::read_dir(&out).at(&out)?.next().is_none();
            if !empty && !options.force {
                return Err(Error::OutputNotEmpty { path: out });
            }
        }
        let staging = sibling(&out, "tmp");
        std::fs::create_dir(&staging).at(&staging)?;
        let mut writer = Self {
            out,
            staging,
            layout: ShardLayout::plan(specs, options.max_shard_bytes),
            specs: vec![],
            files: vec![],
            slots: HashMap::new(),
            written: vec![],
            committed: false,
        };
        // From here on, Drop cleans the staging directory up on any error.
        writer.lay_out_shards()?;
        Ok(writer)
    }

    fn lay_out_shards(&mut self) -> Result<()> {
        for (shard, specs) in self.layout.shards.iter().enumerate() {
            let path = self.staging.join(self.layout.file_name(shard));
            let mut infos = Vec::with_capacity(specs.len());
            let mut data_len = 0u64;
            for spec in specs {
                let end = data_len + spec.byte_len();
                infos.push((
                    spec.name.clone(),
                    TensorInfo {
                        dtype: spec.dtype,
                        shape: spec.shape.clone(),
                        data_offsets: (data_len as usize, end as usize),
                    },
                ));
                data_len = end;
            }
            let format = HashMap::from([("format".to_owned(), "pt".to_owned())]);
            let metadata = Metadata::new(Some(format), infos).map_err(|e| Error::Write {
                path: path.clone(),
                message: format!("invalid tensor layout: {e:?}"),
            })?;
            let mut header = serde_json::to_vec(&metadata).expect("metadata serialises");
            // Pad with spaces so tensor data starts 8-byte aligned, as safetensors does.
            header.resize(header.len().next_multiple_of(8), b' ');
            let data_start = 8 + header.len() as u64;
            let file = File::create(&path).at(&path)?;
            file.write_all_at(&(header.len() as u64).to_le_bytes(), 0)
                .at(&path)?;
            file.write_all_at(&header, 8).at(&path)?;
            file.set_len(data_start + data_len).at(&path)?;
            let mut offset = data_start;
            for spec in specs {
                let index = self.specs.len();
                let previous = self.slots.insert(
                    spec.name.clone(),
                    Slot {
                        shard,
                        offset,
                        spec: index,
                    },
                );
                if previous.is_some() {
                    return Err(Error::Write {
                        path: self.staging.clone(),
                        message: format!("tensor {} is planned twice", spec.name),
                    });
                }
                offset += spec.byte_len();
                self.specs.push((shard, spec.clone()));
                self.written.push(AtomicU64::new(0));
            }
            self.files.push(file);
        }
        Ok(())
    }

    /// The layout the writer chose (which tensor goes in which shard).
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// Writes one tensor's raw little-endian bytes. Safe to call from several
    /// threads at once; each tensor exactly once.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let (_, spec) = self.slot(name)?;
        if bytes.len() as u64 != spec.byte_len() {
            return Err(self.error(format!(
                "tensor {name}: got {} bytes, planned {} ({:?} {:?})",
                bytes.len(),
                spec.byte_len(),
                spec.dtype,
                spec.shape
            )));
        }
        self.write_part(name, 0, bytes)
    }

    /// Writes `bytes` at `offset` within one tensor's data, for tensors
    /// produced piece by piece; the pieces must not overlap and must cover
    /// the tensor by [`CheckpointWriter::finish`].
    pub fn write_part(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<()> {
        let (slot, spec) = self.slot(name)?;
        let len = bytes.len() as u64;
        if offset + len > spec.byte_len() {
            return Err(self.error(format!(
                "tensor {name}: bytes {offset}..{} lie outside its {} bytes",
                offset + len,
                spec.byte_len()
            )));
        }
        let before = self.written[slot.spec].fetch_add(len, Ordering::AcqRel);
        if before + len > spec.byte_len() {
            return Err(self.error(format!("tensor {name} written twice")));
        }
        let path = self.staging.join(self.layout.file_name(slot.shard));
        self.files[slot.shard]
            .write_all_at(bytes, slot.offset + offset)
            .at(path)
    }

    fn slot(&self, name: &str) -> Result<(&Slot, &TensorSpec)> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| self.error(format!("tensor {name} is not in the planned output")))?;
        Ok((slot, &self.specs[slot.spec].1))
    }

    /// Writes a tch tensor, which must have the planned dtype and shape.
    pub fn write_tensor(&self, name: &str, tensor: &tch::Tensor) -> Result<()> {
        let (_, spec) = self.slot(name)?;
        let shape: Vec<usize> = tensor.size().iter().map(|&d| d as usize).collect();
        if dtype_from_kind(tensor.kind()) != Some(spec.dtype) || shape != spec.shape {
            return Err(self.error(format!(
                "tensor {name}: got {:?} {shape:?}, planned {:?} {:?}",
                tensor.kind(),
                spec.dtype,
                spec.shape
            )));
        }
        let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
        let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
        // SAFETY: `tensor` is a contiguous CPU tensor of `len` bytes, alive for the borrow.
        let bytes = unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, len) };
        self.write_bytes(name, bytes)
    }

    fn error(&self, message: String) -> Error {
        Error::Write {
            path: self.out.clone(),
            message,
        }
    }

    /// Completes the output: index, config, tokenizer files and card; fsyncs
    /// everything and renames the staging directory into place.
    pub fn finish(mut self, finish: Finish<'_>) -> Result<PathBuf> {
        if let Some((_, spec)) = self
            .specs
            .iter()
            .zip(&self.written)
            .find(|((_, spec), done)| done.load(Ordering::Acquire) != spec.byte_len())
            .map(|(s, _)| s)
        {
            return Err(self.error(format!("tensor {} was never written", spec.name)));
        }
        for (shard, file) in self.files.iter().enumerate() {
            file.sync_all()
                .at(self.staging.join(self.layout.file_name(shard)))?;
        }
        if self.layout.shards.len() > 1 {
            let weight_map: BTreeMap<&str, String> = self
                .specs
                .iter()
                .map(|(shard, spec)| (spec.name.as_str(), self.layout.file_name(*shard)))
                .collect();
            let index = serde_json::json!({
                "metadata": {"total_size": self.layout.total_bytes()},
                "weight_map": weight_map,
            });
            let text = serde_json::to_string_pretty(&index).expect("index serialises") + "\n";
            self.write_file(INDEX_FILE, text.as_bytes())?;
        }
        let mut config = finish.config.clone();
        if let Some(dtype) = self.dominant_float_dtype() {
            config.set_dtype(dtype);
        }
        self.write_file("config.json", config.to_json_pretty().as_bytes())?;
        if let Some(source) = finish.tokenizer_source {
            for name in TOKENIZER_FILES {
                let from = source.join(name);
                if from.is_file() {
                    let to = self.staging.join(name);
                    std::fs::copy(&from, &to).at(&from)?;
                    File::open(&to).and_then(|f| f.sync_all()).at(&to)?;
                }
            }
        }
        for (name, contents) in finish.extra_files {
            self.write_file(name, contents)?;
        }
        self.write_file("README.md", finish.card.render().as_bytes())?;
        File::open(&self.staging)
            .and_then(|d| d.sync_all())
            .at(&self.staging)?;
        self.commit()?;
        Ok(self.out.clone())
    }

    fn dominant_float_dtype(&self) -> Option<Dtype> {
        let mut bytes: BTreeMap<Dtype, u64> = BTreeMap::new();
        for (_, spec) in &self.specs {
            if matches!(
                spec.dtype,
                Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64
            ) {
                *bytes.entry(spec.dtype).or_default() += spec.byte_len();
            }
        }
        bytes.into_iter().max_by_key(|&(_, b)| b).map(|(d, _)| d)
    }

    fn write_file(&self, name: &str, contents: &[u8]) -> Result<()> {
        let path = self.staging.join(name);
        let file = File::create(&path).at(&path)?;
        file.write_all_at(contents, 0).at(&path)?;
        file.sync_all().at(&path)
    }

    fn commit(&mut self) -> Result<()> {
        let displaced = if self.out.exists() {
            let old = sibling(&self.out, "old");
            std::fs::rename(&self.out, &old).at(&self.out)?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(&self.staging, &self.out) {
            if let Some(old) = &displaced {
                let _ = std::fs::rename(old, &self.out);
            }
            return Err(Error::Io {
                path: self.out.clone(),
                cause: e,
            });
        }
        self.committed = true;
        if let Some(old) = displaced {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        if let Some(parent) = self.out.parent() {
            File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
        }
        Ok(())
    }
}

impl Drop for CheckpointWriter {
    fn drop(&mut self) {
        if !self.committed {
            let _ = std::fs::remove_dir_all(&self.staging);
        }
    }
}

/// The output path made absolute through its (created if need be) parent, so
/// that overlap checks compare like with like.
fn absolute_output(out: &Path) -> Result<PathBuf> {
    let name = out.file_name().ok_or_else(|| Error::Write {
        path: out.into(),
        message: "output path has no directory name".into(),
    })?;
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    std::fs::create_dir_all(&parent).at(&parent)?;
    Ok(std::fs::canonicalize(&parent).at(&parent)?.join(name))
}

/// A hidden sibling of `out`, unique to this process and moment.
pub fn sibling(out: &Path, purpose: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(
        ".{name}.amalgam-{purpose}-{}-{nanos}",
        std::process::id()
    ))
}
