use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::Dtype;

use crate::direct::DirectFile;
use crate::error::IoContext;
use crate::files::ModelDir;
use crate::layout::{ShardLayout, TensorSpec, DEFAULT_SHARD_BYTES};
use crate::output::{create_file, OutputDir};
use crate::reader::INDEX_FILE;
use crate::{
    config_mismatch, count_nonfinite, dtype_from_kind, Error, ModelCard, ModelConfig, Result,
    CHAT_TEMPLATE_JINJA, CHAT_TEMPLATE_JSON, TOKENIZER_CONFIG, TOKENIZER_FILES,
};

/// How an output directory is written.
#[derive(Debug, Clone)]
pub struct WriteOptions {
    pub max_shard_bytes: u64,
    /// Replace a non-empty output directory.
    pub force: bool,
    /// Input checkpoint directories: the output may not be, contain or lie inside any of them.
    pub inputs: Vec<PathBuf>,
    /// Write tensors holding NaN or ±inf. Otherwise such a tensor fails the
    /// commit unless its writer vouched for it ([`CheckpointWriter::accept_nonfinite`]).
    pub allow_nonfinite: bool,
}

impl Default for WriteOptions {
    fn default() -> Self {
        Self {
            max_shard_bytes: DEFAULT_SHARD_BYTES,
            force: false,
            inputs: vec![],
            allow_nonfinite: false,
        }
    }
}

/// What goes into the output besides the weights.
pub struct Finish<'a> {
    /// The base `config.json`; its `torch_dtype` is set to the weights' dtype.
    pub config: &'a ModelConfig,
    /// Where tokenizer files and `generation_config.json` are copied from.
    pub tokenizer_source: Option<&'a Path>,
    /// A chat template that replaces the tokenizer source's: written as
    /// `chat_template.jinja`, and taken out of the copied `tokenizer_config.json`
    /// so that no loader finds the old one.
    pub chat_template: Option<&'a str>,
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
/// is buffered per shard. Everything is written inside an [`OutputDir`]'s
/// staging directory, which [`CheckpointWriter::finish`] checks, fsyncs and
/// renames into place; dropping an unfinished writer removes it.
pub struct CheckpointWriter {
    dir: OutputDir,
    out: PathBuf,
    staging: PathBuf,
    layout: ShardLayout,
    specs: Vec<(usize, TensorSpec)>,
    files: Vec<File>,
    /// Each shard's direct-write handle, where its filesystem has one.
    direct: Vec<Option<DirectFile>>,
    slots: HashMap<String, Slot>,
    /// Bytes written so far, per planned tensor.
    written: Vec<AtomicU64>,
    /// NaN or ±inf values written so far, per planned tensor.
    nonfinite: Vec<AtomicU64>,
    /// Tensors whose non-finite values came from their inputs.
    accepted: Vec<AtomicBool>,
    allow_nonfinite: bool,
}

impl CheckpointWriter {
    pub fn create(out: &Path, specs: Vec<TensorSpec>, options: &WriteOptions) -> Result<Self> {
        let dir = OutputDir::create(out, options.force, &options.inputs)?;
        let mut writer = Self {
            out: dir.out().to_path_buf(),
            staging: dir.staging().to_path_buf(),
            dir,
            layout: ShardLayout::plan(specs, options.max_shard_bytes),
            specs: vec![],
            files: vec![],
            direct: vec![],
            slots: HashMap::new(),
            written: vec![],
            nonfinite: vec![],
            accepted: vec![],
            allow_nonfinite: options.allow_nonfinite,
        };
        // From here on, dropping the writer cleans up on any error.
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
            let file = create_file(&path).at(&path)?;
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
                self.nonfinite.push(AtomicU64::new(0));
                self.accepted.push(AtomicBool::new(false));
            }
            self.files.push(file);
            self.direct.push(DirectFile::open(&path));
        }
        Ok(())
    }

    /// The layout the writer chose (which tensor goes in which shard).
    pub fn layout(&self) -> &ShardLayout {
        &self.layout
    }

    /// Writes one tensor's raw little-endian bytes. Safe to call from several
    /// threads at once; each tensor exactly once. Returns how many of the
    /// values are NaN or ±inf.
    pub fn write_bytes(&self, name: &str, bytes: &[u8]) -> Result<u64> {
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
    /// produced piece by piece; the pieces must not overlap, must start at
    /// whole elements and must cover the tensor by [`CheckpointWriter::finish`].
    /// Returns how many of the piece's values are NaN or ±inf (not counted,
    /// 0, for a tensor already accepted with [`Self::accept_nonfinite`]).
    pub fn write_part(&self, name: &str, offset: u64, bytes: &[u8]) -> Result<u64> {
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
        let elem = (spec.dtype.bitsize() / 8).max(1) as u64;
        if offset % elem != 0 {
            return Err(self.error(format!(
                "tensor {name}: a piece at byte {offset} starts inside an element"
            )));
        }
        // A tensor vouched for in advance (a verbatim copy) is not counted.
        let nonfinite = match self.accepted[slot.spec].load(Ordering::Acquire) {
            true => 0,
            false => count_nonfinite(spec.dtype, bytes),
        };
        self.nonfinite[slot.spec].fetch_add(nonfinite, Ordering::AcqRel);
        let path = self.staging.join(self.layout.file_name(slot.shard));
        let file = &self.files[slot.shard];
        let at = slot.offset + offset;
        match &self.direct[slot.shard] {
            Some(direct) => direct.write_all_at(file, bytes, at),
            None => file.write_all_at(bytes, at),
        }
        .at(path)?;
        Ok(nonfinite)
    }

    /// Vouches that a tensor's NaN or ±inf values came from its inputs,
    /// which were not finite either (or that it is a verbatim copy of an
    /// input, vouched for before writing, so its values are not counted):
    /// the commit does not refuse it for them.
    pub fn accept_nonfinite(&self, name: &str) -> Result<()> {
        let (slot, _) = self.slot(name)?;
        self.accepted[slot.spec].store(true, Ordering::Release);
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<(&Slot, &TensorSpec)> {
        let slot = self
            .slots
            .get(name)
            .ok_or_else(|| self.error(format!("tensor {name} is not in the planned output")))?;
        Ok((slot, &self.specs[slot.spec].1))
    }

    /// Writes a tch tensor, which must have the planned dtype and shape;
    /// returns how many of its values are NaN or ±inf.
    pub fn write_tensor(&self, name: &str, tensor: &tch::Tensor) -> Result<u64> {
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

    /// Completes the output: checks it (every tensor written, finite unless
    /// vouched for, the config consistent with the tensors), then writes the
    /// index, config, tokenizer files and card, fsyncs everything and renames
    /// the staging directory into place.
    pub fn finish(self, finish: Finish<'_>) -> Result<PathBuf> {
        self.check_and_sync()?;
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
        let specs: Vec<TensorSpec> = self.specs.iter().map(|(_, s)| s.clone()).collect();
        if let Some(problem) = config_mismatch(&config, &specs) {
            return Err(self.error(format!(
                "config.json would not match the weights: {problem}; refusing to write a model \
                 that loads wrong or not at all"
            )));
        }
        self.write_file("config.json", config.to_json_pretty().as_bytes())?;
        if let Some(source) = finish.tokenizer_source {
            let files = ModelDir::new(source)?;
            // Files the caller writes itself (a union vocabulary's tokenizer) are not copied.
            let written_later = |name: &str| finish.extra_files.iter().any(|(n, _)| *n == name);
            for name in TOKENIZER_FILES
                .iter()
                .filter(|n| files.has(n) && !written_later(n))
            {
                let replaced = finish.chat_template.is_some();
                match *name {
                    CHAT_TEMPLATE_JINJA | CHAT_TEMPLATE_JSON if replaced => {}
                    TOKENIZER_CONFIG if replaced => {
                        let mut config = files.json_object(name)?;
                        config.remove("chat_template");
                        let text = serde_json::to_string_pretty(&config).expect("JSON") + "\n";
                        self.write_file(name, text.as_bytes())?;
                    }
                    _ => {
                        let (from, from_path) = files.open(name)?;
                        let to = self.staging.join(name);
                        copy_file(from, &from_path, create_file(&to).at(&to)?, &to)?;
                    }
                }
            }
        }
        if let Some(template) = finish.chat_template {
            self.write_file(CHAT_TEMPLATE_JINJA, template.as_bytes())?;
        }
        for (name, contents) in finish.extra_files {
            self.write_file(name, contents)?;
        }
        self.write_file("README.md", finish.card.render().as_bytes())?;
        drop((self.files, self.direct));
        self.dir.commit()
    }

    /// Completes one part of an output split across processes (a split
    /// merge's): checked and synced as [`Self::finish`] does, with `manifest`
    /// written as `manifest_file` instead of a config, index and card.
    pub fn finish_part(self, manifest_file: &str, manifest: &[u8]) -> Result<PathBuf> {
        self.check_and_sync()?;
        self.write_file(manifest_file, manifest)?;
        drop((self.files, self.direct));
        self.dir.commit()
    }

    /// Every planned tensor written, finite unless vouched for; the shards synced.
    fn check_and_sync(&self) -> Result<()> {
        for (i, (_, spec)) in self.specs.iter().enumerate() {
            if self.written[i].load(Ordering::Acquire) != spec.byte_len() {
                return Err(self.error(format!("tensor {} was never written", spec.name)));
            }
            let nonfinite = self.nonfinite[i].load(Ordering::Acquire);
            if nonfinite > 0 && !self.allow_nonfinite && !self.accepted[i].load(Ordering::Acquire) {
                return Err(self.error(format!(
                    "tensor {}: {nonfinite} of its {} values are NaN or infinite; refusing to \
                     write a broken model",
                    spec.name,
                    spec.numel()
                )));
            }
        }
        for (shard, file) in self.files.iter().enumerate() {
            file.sync_all()
                .at(self.staging.join(self.layout.file_name(shard)))?;
        }
        tracing::debug!(
            bytes = self.direct_bytes(),
            "tensor bytes written past the page cache"
        );
        Ok(())
    }

    /// Tensor bytes written directly to the device so far, past the page
    /// cache (where the output's filesystem allows it; see `direct`).
    fn direct_bytes(&self) -> u64 {
        self.direct.iter().flatten().map(DirectFile::written).sum()
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
        let file = create_file(&path).at(&path)?;
        file.write_all_at(contents, 0).at(&path)?;
        file.sync_all().at(&path)
    }
}

/// The most bytes of a companion file (tokenizer, chat template, generation
/// config) copied into an output: the largest published `tokenizer.json` is
/// tens of MB, a `tokenizer.model` a few MB; more is not a tokenizer.
pub const MAX_COMPANION_BYTES: u64 = 512 << 20;

/// Copies an opened file to `to` (synced), refusing one larger than
/// [`MAX_COMPANION_BYTES`]; only its data is copied, holes stay holes (a
/// sparse file is not written out densely). A read error names the source, a
/// write error (a full disk, a file-size limit) the destination.
fn copy_file(from: File, from_path: &Path, out: File, to: &Path) -> Result<()> {
    let len = from.metadata().at(from_path)?.len();
    if len > MAX_COMPANION_BYTES {
        return Err(Error::Input {
            path: from_path.into(),
            message: format!(
                "is {len} bytes, larger than the {} MB a file copied beside a model may be",
                MAX_COMPANION_BYTES >> 20
            ),
        });
    }
    let mut buffer = vec![0u8; 1 << 20];
    let mut offset = 0;
    while offset < len {
        // The next byte of data at or after `offset`; ENXIO: only a hole is left.
        let start = match seek(&from, offset, libc::SEEK_DATA) {
            Ok(start) => start,
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) => break,
            // A filesystem without SEEK_DATA: everything is data.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => offset,
            Err(e) => return Err(e).at(from_path),
        };
        let end = seek(&from, start, libc::SEEK_HOLE).unwrap_or(len).min(len);
        let mut at = start;
        while at < end {
            let want = buffer.len().min((end - at) as usize);
            let n = from.read_at(&mut buffer[..want], at).at(from_path)?;
            if n == 0 {
                return Err(Error::Input {
                    path: from_path.into(),
                    message: "ended while amalgam copied it (truncated or replaced?)".into(),
                });
            }
            out.write_all_at(&buffer[..n], at).at(to)?;
            at += n as u64;
        }
        offset = end;
    }
    out.set_len(len).at(to)?;
    out.sync_all().at(to)
}

/// `lseek(2)` with `whence` (SEEK_DATA / SEEK_HOLE), the offset it finds.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    // SAFETY: lseek on an open descriptor; our reads use pread, so the
    // file position it moves is not relied on.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(at as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tensors_written_from_threads_in_any_order_read_back_exactly() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        // Odd sizes: every tensor starts and ends inside a block, and the
        // large ones have whole blocks in between (written directly where
        // the filesystem allows).
        let sizes = [3usize, 700_003, 11, 300_001, 1_200_007];
        let specs = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| TensorSpec::new(format!("t{i}"), Dtype::F32, vec![n]))
            .collect();
        let writer = CheckpointWriter::create(&out, specs, &WriteOptions::default()).unwrap();
        let data: Vec<Vec<u8>> = sizes
            .iter()
            .enumerate()
            .map(|(i, &n)| {
                (0..n)
                    .flat_map(|j| ((i * n + j) as f32).to_le_bytes())
                    .collect()
            })
            .collect();
        std::thread::scope(|scope| {
            for (i, bytes) in data.iter().enumerate().rev() {
                let writer = &writer;
                scope.spawn(move || writer.write_bytes(&format!("t{i}"), bytes).unwrap());
            }
        });
        let dir = writer.finish_part("part.json", b"{}").unwrap();
        let file = std::fs::read(dir.join("model.safetensors")).unwrap();
        let read = safetensors::SafeTensors::deserialize(&file).unwrap();
        for (i, bytes) in data.iter().enumerate() {
            assert!(
                read.tensor(&format!("t{i}")).unwrap().data() == bytes,
                "t{i} differs"
            );
        }
    }

    #[test]
    fn a_full_disk_is_reported_against_the_output_not_the_input() {
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("tokenizer.json");
        std::fs::write(&source, vec![b'x'; 4096]).unwrap();
        let full = Path::new("/dev/full");
        let sink = std::fs::OpenOptions::new().write(true).open(full).unwrap();
        let err = copy_file(File::open(&source).unwrap(), &source, sink, full)
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("/dev/full:") && err.contains("No space left"),
            "{err}"
        );
    }

    #[test]
    fn companion_files_are_copied_sparse_and_capped() {
        use std::os::unix::fs::MetadataExt;
        let tmp = tempfile::tempdir().unwrap();
        let source = tmp.path().join("tokenizer.model");
        let file = File::create(&source).unwrap();
        file.write_all_at(b"head", 0).unwrap();
        file.write_all_at(b"tail", (256 << 20) - 4).unwrap();
        let to = tmp.path().join("copy");
        copy_file(
            File::open(&source).unwrap(),
            &source,
            File::create(&to).unwrap(),
            &to,
        )
        .unwrap();
        let copied = std::fs::read(&to).unwrap();
        assert_eq!(copied.len(), 256 << 20);
        assert_eq!(
            (&copied[..4], &copied[copied.len() - 4..]),
            (&b"head"[..], &b"tail"[..])
        );
        assert!(copied[4..copied.len() - 4].iter().all(|&b| b == 0));
        let allocated = std::fs::metadata(&to).unwrap().blocks() * 512;
        assert!(
            allocated < 16 << 20,
            "written densely: {allocated} bytes allocated"
        );

        file.set_len(MAX_COMPANION_BYTES + 1).unwrap();
        let refused = tmp.path().join("refused");
        let err = copy_file(
            File::open(&source).unwrap(),
            &source,
            File::create(&refused).unwrap(),
            &refused,
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("tokenizer.model") && err.contains("512 MB"),
            "{err}"
        );
        assert_eq!(std::fs::metadata(&refused).unwrap().len(), 0);
    }
}
