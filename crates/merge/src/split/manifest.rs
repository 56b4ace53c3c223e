//! An output split across processes or machines (`amalgam merge --part I/N`):
//! part I of N is a directory `OUT.parts/part-I-of-N/` holding one
//! safetensors file with its tensors and a manifest, `part.json` (a
//! [`PartManifest`]), written by [`CheckpointWriter::finish_part`]. The
//! join copies every part's tensors into the output's own writer, which lays
//! out and finishes the checkpoint exactly as a single process would.
//!
//! A manifest names what determines its part's bytes (the recipe text, which
//! holds the dtype options; the seed; `--allow-nonfinite`; the part's number)
//! and lists its tensors (name, dtype, shape, the SHA-256 of their bytes); its
//! `checksum` is the SHA-256 of all of that ([`PartManifest::expected_checksum`]),
//! so a manifest edited after the fact, or data computed by another run
//! under it, is refused at the join ([`copy_part`] checks every tensor's bytes
//! as it copies them, before the output is committed).

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};

use amalgam_checkpoint::{
    CheckpointWriter, Dtype, Error, IoContext as _, Result, TensorSpec, MAX_JSON_BYTES,
};

/// A part's manifest file.
pub const MANIFEST: &str = "part.json";

/// A part manifest's `format`.
pub const FORMAT: &str = "amalgam-merge-part";

/// The manifest version this build writes and reads (1: no checksums).
pub const VERSION: u64 = 2;

/// The most parts an output may be split into. More machines than this do
/// not help any checkpoint amalgam writes (a part holds at least one tensor
/// to be of use, and few models have more tensors), and it bounds what the
/// split and the join allocate and list.
pub const MAX_PARTS: usize = 4096;

/// Bytes copied at a time by [`copy_part`].
const CHUNK: u64 = 64 << 20;

/// A SHA-256 digest.
pub type Digest = [u8; 32];

/// One tensor of a part.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// The SHA-256 of the tensor's bytes, as 64 lowercase hex digits.
    pub sha256: String,
}

/// A part's `part.json`. [`parse_manifest`] gives only manifests whose
/// fields are well formed and agree with their `checksum`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartManifest {
    /// [`FORMAT`].
    pub format: String,
    /// [`VERSION`].
    pub version: u64,
    /// 1-based, at most `count`.
    pub part: usize,
    /// At most [`MAX_PARTS`].
    pub count: usize,
    pub seed: u64,
    /// The recipe's text (its dtype options included).
    pub recipe: String,
    /// Whether the part was computed with `--allow-nonfinite`.
    pub allow_nonfinite: bool,
    /// In plan order.
    pub tensors: Vec<PartTensor>,
    /// Tensors (of `tensors`) whose NaN or ±inf values the part accepted.
    pub accepted_nonfinite: Vec<String>,
    /// [`PartManifest::expected_checksum`], as 64 lowercase hex digits.
    pub checksum: String,
}

/// Why bytes are not a part manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct ManifestError {
    pub message: String,
}

fn invalid(message: impl Into<String>) -> ManifestError {
    ManifestError {
        message: message.into(),
    }
}

impl PartManifest {
    /// The manifest of part `part` of `count` holding `tensors` (in plan
    /// order, each with the digest of its bytes), its checksum computed.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        part: usize,
        count: usize,
        seed: u64,
        recipe: &str,
        allow_nonfinite: bool,
        tensors: Vec<(TensorSpec, Digest)>,
        accepted_nonfinite: Vec<String>,
    ) -> Self {
        let mut manifest = Self {
            format: FORMAT.to_owned(),
            version: VERSION,
            part,
            count,
            seed,
            recipe: recipe.to_owned(),
            allow_nonfinite,
            tensors: tensors
                .into_iter()
                .map(|(spec, digest)| PartTensor {
                    name: spec.name,
                    dtype: spec.dtype,
                    shape: spec.shape,
                    sha256: hex(&digest),
                })
                .collect(),
            accepted_nonfinite,
            checksum: String::new(),
        };
        manifest.checksum = hex(&manifest.expected_checksum());
        manifest
    }

    /// The SHA-256 of every field but `checksum`, each length-prefixed (or of
    /// fixed width) so that no two manifests encode alike.
    pub fn expected_checksum(&self) -> Digest {
        let mut hash = Sha256::new();
        let text = |hash: &mut Sha256, s: &str| {
            hash.update((s.len() as u64).to_le_bytes());
            hash.update(s.as_bytes());
        };
        let number = |hash: &mut Sha256, n: u64| hash.update(n.to_le_bytes());
        text(&mut hash, &self.format);
        number(&mut hash, self.version);
        number(&mut hash, self.part as u64);
        number(&mut hash, self.count as u64);
        number(&mut hash, self.seed);
        text(&mut hash, &self.recipe);
        number(&mut hash, self.allow_nonfinite as u64);
        number(&mut hash, self.tensors.len() as u64);
        for tensor in &self.tensors {
            text(&mut hash, &tensor.name);
            text(&mut hash, &format!("{:?}", tensor.dtype));
            number(&mut hash, tensor.shape.len() as u64);
            for &dim in &tensor.shape {
                number(&mut hash, dim as u64);
            }
            text(&mut hash, &tensor.sha256);
        }
        number(&mut hash, self.accepted_nonfinite.len() as u64);
        for name in &self.accepted_nonfinite {
            text(&mut hash, name);
        }
        hash.finalize().into()
    }

    /// The manifest as written to `part.json`.
    pub fn to_json(&self) -> Vec<u8> {
        let mut bytes = serde_json::to_vec_pretty(self).expect("a manifest serialises");
        bytes.push(b'\n');
        bytes
    }

    /// The tensors as planned specs.
    pub fn specs(&self) -> Vec<TensorSpec> {
        self.tensors
            .iter()
            .map(|t| TensorSpec::new(t.name.clone(), t.dtype, t.shape.clone()))
            .collect()
    }
}

/// Parses and checks a part manifest: the JSON of a [`PartManifest`] (no
/// unknown or duplicate fields), this [`FORMAT`] and [`VERSION`],
/// `1 ≤ part ≤ count ≤ MAX_PARTS`, tensor names unique, digests of 64 hex
/// digits, accepted tensors among the part's, and a `checksum` that agrees
/// with the rest. Pure: reads nothing but `bytes`.
pub fn parse_manifest(bytes: &[u8]) -> std::result::Result<PartManifest, ManifestError> {
    let value: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| invalid(format!("not JSON: {e}")))?;
    // The format and version first, so that an old manifest says so rather
    // than which field it lacks.
    if value.get("format").and_then(|f| f.as_str()) != Some(FORMAT) {
        return Err(invalid(format!(
            "not a part manifest (no `format: {FORMAT}`)"
        )));
    }
    match value.get("version").and_then(|v| v.as_u64()) {
        Some(VERSION) => {}
        Some(old) if old < VERSION => {
            return Err(invalid(format!(
                "manifest version {old}, written by an older amalgam (without checksums); \
                 compute the part again"
            )))
        }
        other => {
            return Err(invalid(format!(
                "manifest version {}, this amalgam reads version {VERSION}",
                other.map_or("missing".to_owned(), |v| v.to_string())
            )))
        }
    }
    if let Some(key) = amalgam_checkpoint::duplicate_key(bytes) {
        return Err(invalid(format!("field `{key}` given twice")));
    }
    let manifest: PartManifest =
        serde_json::from_value(value).map_err(|e| invalid(format!("malformed: {e}")))?;
    check_numbers(manifest.part, manifest.count).map_err(invalid)?;
    let mut names = HashSet::new();
    for tensor in &manifest.tensors {
        if !names.insert(tensor.name.as_str()) {
            return Err(invalid(format!("tensor {} listed twice", tensor.name)));
        }
        unhex(&tensor.sha256).ok_or_else(|| {
            invalid(format!(
                "tensor {}: sha256 is not 64 lowercase hex digits",
                tensor.name
            ))
        })?;
    }
    let mut accepted = HashSet::new();
    for name in &manifest.accepted_nonfinite {
        if !names.contains(name.as_str()) {
            return Err(invalid(format!(
                "accepted_nonfinite names tensor {name}, which the part does not hold"
            )));
        }
        if !accepted.insert(name.as_str()) {
            return Err(invalid(format!(
                "accepted_nonfinite names tensor {name} twice"
            )));
        }
    }
    let expected = manifest.expected_checksum();
    if unhex(&manifest.checksum) != Some(expected) {
        return Err(invalid(format!(
            "checksum {:?} does not match the manifest's contents (sha256 {}): it was changed \
             after the part was written",
            manifest.checksum,
            hex(&expected)
        )));
    }
    Ok(manifest)
}

/// `1 ≤ part ≤ count ≤ MAX_PARTS`, else why not.
pub fn check_numbers(part: usize, count: usize) -> std::result::Result<(), String> {
    if count == 0 || count > MAX_PARTS {
        return Err(format!(
            "{count} parts: an output is split into 1 to {MAX_PARTS} parts"
        ));
    }
    if part == 0 || part > count {
        return Err(format!(
            "part {part} of {count}: parts are numbered 1 to {count}"
        ));
    }
    Ok(())
}

/// `(I, N)` of a part directory's name `part-I-of-N`, written exactly so
/// (no signs, no leading zeros), with `1 ≤ I ≤ N ≤ MAX_PARTS`.
pub fn parse_part_name(name: &str) -> Option<(usize, usize)> {
    let (i, n) = name.strip_prefix("part-")?.split_once("-of-")?;
    let number = |s: &str| -> Option<usize> {
        let canonical = !s.is_empty()
            && s.len() <= 20
            && s.bytes().all(|b| b.is_ascii_digit())
            && (s == "0" || !s.starts_with('0'));
        canonical.then(|| s.parse().ok()).flatten()
    };
    let (part, count) = (number(i)?, number(n)?);
    check_numbers(part, count).ok()?;
    Some((part, count))
}

/// The SHA-256 of a tensor's bytes as they are written (CPU, contiguous).
pub fn tensor_digest(tensor: &tch::Tensor) -> Digest {
    let tensor = tensor.to_device(tch::Device::Cpu).contiguous();
    let len = tensor.numel() * tensor.kind().elt_size_in_bytes();
    if len == 0 {
        return Sha256::digest([]).into();
    }
    // SAFETY: `tensor` is a contiguous CPU tensor of `len` (> 0) bytes, alive for the borrow.
    let bytes = unsafe { std::slice::from_raw_parts(tensor.data_ptr() as *const u8, len) };
    Sha256::digest(bytes).into()
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A digest from 64 lowercase hex digits.
fn unhex(text: &str) -> Option<Digest> {
    let bytes = text.as_bytes();
    if bytes.len() != 64 {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    };
    let mut digest = [0u8; 32];
    for (i, pair) in bytes.chunks(2).enumerate() {
        digest[i] = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(digest)
}

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
/// Hidden entries (the output protocol's staging and lock files) and
/// entries not named `part-…` are passed over; one named `part-…` must be a
/// part's name ([`parse_part_name`]) and a directory (not a symlink), and
/// there are at most [`MAX_PARTS`]; otherwise an error naming it.
pub fn find_parts(out: &Path) -> Result<Vec<(usize, usize, PathBuf)>> {
    let dir = parts_dir(out);
    let mut found = vec![];
    for entry in std::fs::read_dir(&dir).at(&dir)? {
        let entry = entry.at(&dir)?;
        let path = entry.path();
        let name = entry.file_name();
        let Some(name) = name.to_str() else {
            continue;
        };
        if !name.starts_with("part-") {
            continue;
        }
        let Some((part, count)) = parse_part_name(name) else {
            return Err(Error::Input {
                path,
                message: format!(
                    "not a part's name (part-I-of-N, 1 ≤ I ≤ N ≤ {MAX_PARTS}); remove or rename it"
                ),
            });
        };
        if !entry.file_type().at(&path)?.is_dir() {
            return Err(Error::Input {
                path,
                message: "is not a directory (a symlink or a file); a part is a directory \
                          amalgam wrote"
                    .into(),
            });
        }
        if found.len() == MAX_PARTS {
            return Err(Error::Input {
                path: dir,
                message: format!("more than {MAX_PARTS} parts"),
            });
        }
        found.push((part, count, path));
    }
    found.sort();
    Ok(found)
}

/// A part's manifest (at most [`MAX_JSON_BYTES`], checked by [`parse_manifest`]).
pub fn read_manifest(dir: &Path) -> Result<PartManifest> {
    let path = dir.join(MANIFEST);
    let bytes = amalgam_checkpoint::read_regular(&path, MAX_JSON_BYTES, "a part manifest")?;
    parse_manifest(&bytes).map_err(|e| Error::Input {
        path,
        message: e.message,
    })
}

/// A tensor [`copy_part`] copied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Copied {
    pub name: String,
    /// NaN or ±inf values among its bytes (as the writer counted them).
    pub nonfinite: u64,
}

/// Copies every tensor of the part in `dir` into `writer` (which must plan
/// them), a chunk at a time, checking on the way that the part's file holds
/// exactly the tensors of `manifest` (names, dtypes, shapes) and that each
/// one's bytes have the digest the manifest gives. Returns them in manifest
/// order. The writer must not have accepted them in advance, so that it
/// counts their NaN or ±inf values.
pub fn copy_part(
    dir: &Path,
    manifest: &PartManifest,
    writer: &CheckpointWriter,
) -> Result<Vec<Copied>> {
    if manifest.tensors.is_empty() {
        // A part may hold nothing (more parts than tensors).
        return Ok(vec![]);
    }
    let path = dir.join("model.safetensors");
    let file = amalgam_checkpoint::open_regular(&path)?;
    // Validated as every shard is (offsets, dtypes, the file's length).
    let (length, metadata) = amalgam_checkpoint::read_shard_header(&file, &path)?;
    let data_start = 8 + length as u64;
    let fail = |tensor: &str, message: String| Error::Safetensors {
        path: path.clone(),
        tensor: Some(tensor.to_owned()),
        message,
    };
    let listed: HashMap<&str, &PartTensor> = manifest
        .tensors
        .iter()
        .map(|t| (t.name.as_str(), t))
        .collect();
    if let Some(name) = metadata
        .tensors()
        .keys()
        .find(|name| !listed.contains_key(name.as_str()))
    {
        return Err(fail(
            name,
            format!("not in the part's {MANIFEST}; the part's data and manifest disagree"),
        ));
    }
    let mut copied = vec![];
    for tensor in &manifest.tensors {
        let info = metadata.info(&tensor.name).ok_or_else(|| {
            fail(
                &tensor.name,
                format!("listed in the part's {MANIFEST} but missing from its data"),
            )
        })?;
        if info.dtype != tensor.dtype || info.shape != tensor.shape {
            return Err(fail(
                &tensor.name,
                format!(
                    "stored as {:?} {:?}, the manifest says {:?} {:?}",
                    info.dtype, info.shape, tensor.dtype, tensor.shape
                ),
            ));
        }
        let (start, end) = info.data_offsets;
        let (digest, nonfinite) = copy_range(
            &file,
            &path,
            writer,
            &tensor.name,
            data_start + start as u64,
            (end - start) as u64,
        )?;
        if Some(digest) != unhex(&tensor.sha256) {
            return Err(fail(
                &tensor.name,
                format!(
                    "its bytes (sha256 {}) are not those the part's {MANIFEST} vouches for \
                     ({}): the data was changed or computed by another run; compute the part \
                     again",
                    hex(&digest),
                    tensor.sha256
                ),
            ));
        }
        copied.push(Copied {
            name: tensor.name.clone(),
            nonfinite,
        });
    }
    Ok(copied)
}

/// Copies one tensor's bytes; returns their digest and NaN/±inf count.
fn copy_range(
    file: &File,
    path: &Path,
    writer: &CheckpointWriter,
    name: &str,
    at: u64,
    len: u64,
) -> Result<(Digest, u64)> {
    let mut buffer = vec![0u8; CHUNK.min(len) as usize];
    let mut hash = Sha256::new();
    let mut nonfinite = 0;
    let mut done = 0;
    while done < len {
        let n = CHUNK.min(len - done) as usize;
        file.read_exact_at(&mut buffer[..n], at + done).at(path)?;
        hash.update(&buffer[..n]);
        nonfinite += writer.write_part(name, done, &buffer[..n])?;
        done += n as u64;
    }
    Ok((hash.finalize().into(), nonfinite))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> PartManifest {
        PartManifest::new(
            2,
            3,
            7,
            "merge_method: linear\n",
            false,
            vec![
                (
                    TensorSpec::new("a", Dtype::BF16, vec![2, 3]),
                    Sha256::digest(b"a").into(),
                ),
                (
                    TensorSpec::new("b", Dtype::F32, vec![4]),
                    Sha256::digest(b"b").into(),
                ),
            ],
            vec!["b".into()],
        )
    }

    #[test]
    fn a_manifest_round_trips_and_its_checksum_binds_every_field() {
        let written = manifest();
        assert_eq!(parse_manifest(&written.to_json()).unwrap(), written);
        let edits: Vec<fn(&mut PartManifest)> = vec![
            |m| m.seed = 6,
            |m| m.part = 1,
            |m| m.count = 4,
            |m| m.recipe.push(' '),
            |m| m.allow_nonfinite = true,
            |m| m.tensors[0].name = "c".into(),
            |m| m.tensors[0].dtype = Dtype::F16,
            |m| m.tensors[0].shape = vec![3, 2],
            |m| m.tensors[1].sha256 = hex(&Sha256::digest(b"c")),
            |m| {
                m.tensors.pop();
                m.accepted_nonfinite.clear();
            },
            |m| m.accepted_nonfinite.clear(),
            |m| m.tensors.swap(0, 1),
        ];
        for (i, edit) in edits.iter().enumerate() {
            let mut edited = written.clone();
            edit(&mut edited);
            let error = parse_manifest(&edited.to_json()).unwrap_err();
            assert!(
                error.message.contains("does not match the manifest"),
                "edit {i}: {error}"
            );
        }
    }

    #[test]
    fn malformed_manifests_are_errors_not_panics() {
        let good = String::from_utf8(manifest().to_json()).unwrap();
        let cases = [
            ("", "not JSON"),
            ("[]", "not a part manifest"),
            (
                "{\"format\": \"amalgam-merge-part\", \"version\": 1}",
                "older amalgam",
            ),
            (
                "{\"format\": \"amalgam-merge-part\", \"version\": 3}",
                "reads version 2",
            ),
            (
                "{\"format\": \"amalgam-merge-part\", \"version\": 2}",
                "malformed",
            ),
            (
                &good.replace("\"part\": 2", "\"part\": 2, \"part\": 2"),
                "twice",
            ),
            (
                &good.replace("\"part\": 2", "\"part\": 0"),
                "numbered 1 to 3",
            ),
            (
                &good.replace("\"count\": 3", "\"count\": 1000000000000"),
                "1 to 4096",
            ),
            (
                &good.replace("\"count\": 3", "\"count\": 99999999999999999999999"),
                "malformed",
            ),
            (&good.replace("\"seed\": 7", "\"seed\": -7"), "malformed"),
            (&good.replace("\"BF16\"", "\"Q4\""), "malformed"),
            (
                &good.replace("\"seed\": 7", "\"seed\": 7, \"extra\": 1"),
                "malformed",
            ),
            (
                &good.replace("\"name\": \"b\"", "\"name\": \"a\""),
                "listed twice",
            ),
            (
                &good.replace(
                    "\"accepted_nonfinite\": [\n    \"b\"",
                    "\"accepted_nonfinite\": [\n    \"z\"",
                ),
                "does not hold",
            ),
            (
                &good.replace(&hex(&Sha256::digest(b"a")), "00"),
                "64 lowercase hex",
            ),
        ];
        for (text, needle) in cases {
            let error = parse_manifest(text.as_bytes()).unwrap_err();
            assert!(error.message.contains(needle), "{text:?}: {error}");
        }
    }

    #[test]
    fn part_names_are_parsed_exactly_and_bounded() {
        assert_eq!(parse_part_name("part-2-of-3"), Some((2, 3)));
        assert_eq!(parse_part_name("part-4096-of-4096"), Some((4096, 4096)));
        for name in [
            "part-1-of-1000000000",
            "part-1-of-1000000000000",
            "part-1-of-99999999999999999999999999",
            "part-0-of-3",
            "part-4-of-3",
            "part-01-of-3",
            "part-+1-of-3",
            "part-1-of-",
            "part--of-3",
            "part-1-of-3-of-3",
            "part-1-of-3 ",
        ] {
            assert_eq!(parse_part_name(name), None, "{name}");
        }
    }

    #[test]
    fn a_directory_named_as_a_huge_part_is_an_error_naming_it() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("merged");
        let huge = parts_dir(&out).join("part-1-of-1000000000000");
        std::fs::create_dir_all(&huge).unwrap();
        std::fs::create_dir_all(parts_dir(&out).join(".part-1-of-2.amalgam-tmp")).unwrap();
        let error = find_parts(&out).unwrap_err().to_string();
        assert!(
            error.contains("part-1-of-1000000000000") && error.contains("not a part's name"),
            "{error}"
        );
        std::fs::remove_dir(&huge).unwrap();
        std::os::unix::fs::symlink(tmp.path(), parts_dir(&out).join("part-1-of-1")).unwrap();
        let error = find_parts(&out).unwrap_err().to_string();
        assert!(error.contains("is not a directory"), "{error}");
    }
}
