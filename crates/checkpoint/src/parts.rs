//! An output split across processes or machines (`amalgam merge --part I/N`):
//! part I of N is a directory `OUT.parts/part-I-of-N/` holding one
//! safetensors file with its tensors and a manifest, `part.json`, written by
//! [`crate::CheckpointWriter::finish_part`]. The join copies every part's
//! tensors into the output's own writer, which lays out and finishes the
//! checkpoint exactly as a single process would.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::{CheckpointWriter, Error, Result, MAX_JSON_BYTES};

/// A part's manifest file.
pub const MANIFEST: &str = "part.json";

/// Bytes copied at a time by [`copy_part`].
const CHUNK: u64 = 64 << 20;

/// Where the parts of the output `out` are written: the sibling `OUT.parts`.
pub fn parts_dir(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".parts");
    out.with_file_name(name)
}

/// Part `part` (1-based) of `count`.
pub fn part_dir(out: &Path, part: usize, count: usize) -> PathBuf {
    parts_dir(out).join(format!("part-{part}-of-{count}"))
}

/// The parts found for `out`: `(part, count, directory)`, sorted by part.
pub fn find_parts(out: &Path) -> Result<Vec<(usize, usize, PathBuf)>> {
    let dir = parts_dir(out);
    let mut found = vec![];
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let parsed = name
            .strip_prefix("part-")
            .and_then(|rest| rest.split_once("-of-"))
            .and_then(|(i, n)| Some((i.parse().ok()?, n.parse().ok()?)));
        if let Some((part, count)) = parsed {
            found.push((part, count, entry.path()));
        }
    }
    found.sort();
    Ok(found)
}

/// A part's manifest (at most [`MAX_JSON_BYTES`]).
pub fn read_manifest(dir: &Path) -> Result<serde_json::Value> {
    let path = dir.join(MANIFEST);
    let bytes = crate::read_regular(&path, MAX_JSON_BYTES, "a part manifest")?;
    serde_json::from_slice(&bytes).map_err(|e| Error::Write {
        path,
        message: format!("not a part manifest: {e}"),
    })
}

/// Copies every tensor of the part in `dir` into `writer` (which must plan
/// them), a chunk at a time; returns their names.
pub fn copy_part(dir: &Path, writer: &CheckpointWriter) -> Result<Vec<String>> {
    let path = dir.join("model.safetensors");
    let file = crate::open_regular(&path)?;
    // Validated as every shard is (offsets, dtypes, the file's length).
    let (length, metadata) = crate::reader::read_header(&file, &path)?;
    let data_start = 8 + length as u64;
    let mut names = vec![];
    for (name, info) in metadata.tensors() {
        let (start, end) = info.data_offsets;
        copy_range(
            &file,
            &path,
            writer,
            &name,
            data_start + start as u64,
            (end - start) as u64,
        )?;
        names.push(name);
    }
    Ok(names)
}

fn copy_range(
    file: &File,
    path: &Path,
    writer: &CheckpointWriter,
    name: &str,
    at: u64,
    len: u64,
) -> Result<()> {
    let mut buffer = vec![0u8; CHUNK.min(len) as usize];
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.read_exact_at(&mut buffer[..n], at + done).at(path)?;
        writer.write_part(name, done, &buffer[..n])?;
        done += n as u64;
    }
    Ok(())
}
