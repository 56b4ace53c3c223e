use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use rayon::prelude::*;
use sha2::{Digest, Sha256};

use crate::{Checkpoint, Result};

/// One input checkpoint as recorded in a model card.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    /// What the input was used as (`base`, `model`, `source` …).
    pub role: String,
    pub path: PathBuf,
    /// (file name, SHA-256 of its contents) for the weights and `config.json`;
    /// the same digests the Hub shows for LFS files. Cached per file (see
    /// `cached_sha256`), so repeated merges of the same inputs skip the hashing.
    pub files: Vec<(String, String)>,
}

impl InputRecord {
    /// Hashes the checkpoint's weight files and config.
    pub fn hash(role: &str, checkpoint: &Checkpoint) -> Result<Self> {
        let mut paths: Vec<PathBuf> = (0..checkpoint.shard_names().len())
            .map(|i| checkpoint.shard_path(i).to_path_buf())
            .collect();
        paths.extend(checkpoint.index_path().map(PathBuf::from));
        paths.push(checkpoint.dir().join("config.json"));
        Self::of_files(role, checkpoint.dir(), &paths)
    }

    /// Hashes `paths`, the files of the input at `dir`.
    pub fn of_files(role: &str, dir: &Path, paths: &[PathBuf]) -> Result<Self> {
        let files = paths
            .par_iter()
            .map(|path| {
                let digest = cached_sha256(path).map_err(|cause| crate::Error::Io {
                    path: path.clone(),
                    cause,
                })?;
                let name = path
                    .file_name()
                    .unwrap_or_default()
                    .to_string_lossy()
                    .into_owned();
                Ok((name, digest))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            role: role.into(),
            path: dir.to_path_buf(),
            files,
        })
    }
}

/// The SHA-256 of a file, remembered in the user's cache directory under its
/// path and keyed by (size, modification time, change time, inode), as build
/// tools do: a repeated merge of the same inputs does not read them all again
/// to hash them. The change time catches an in-place rewrite whose
/// modification time was set back (a user cannot set ctime).
fn cached_sha256(path: &Path) -> std::io::Result<String> {
    let entry = cache_dir().map(|dir| {
        let canonical = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        dir.join(hex(&Sha256::digest(
            canonical.as_os_str().as_encoded_bytes(),
        )))
    });
    cached_sha256_in(path, entry)
}

fn cached_sha256_in(path: &Path, entry: Option<PathBuf>) -> std::io::Result<String> {
    use std::os::unix::fs::MetadataExt;
    let meta = std::fs::metadata(path)?;
    let key = format!(
        "{} {} {} {} {} {}",
        meta.len(),
        meta.mtime(),
        meta.mtime_nsec(),
        meta.ctime(),
        meta.ctime_nsec(),
        meta.ino()
    );
    // A cache entry is a small regular file (never a FIFO that blocks).
    let cached = entry
        .as_ref()
        .and_then(|e| crate::read_regular(e, 4096, "a hash cache entry").ok())
        .and_then(|bytes| String::from_utf8(bytes).ok());
    if let Some(text) = cached {
        if let Some((cached_key, digest)) = text.trim_end().rsplit_once(' ') {
            if cached_key == key && digest.len() == 64 {
                return Ok(digest.to_owned());
            }
        }
    }
    let mut hasher = Sha256::new();
    std::io::copy(
        &mut std::io::BufReader::with_capacity(1 << 20, std::fs::File::open(path)?),
        &mut hasher,
    )?;
    let digest = hex(&hasher.finalize());
    if let Some(entry) = entry {
        // Best effort: a cache that cannot be written only costs time.
        // Written beside and renamed over: never through a link at its name.
        let parent = entry.parent().expect("a cache entry has a parent");
        let temporary = crate::output::sibling(&entry, "tmp");
        let _ = std::fs::create_dir_all(parent)
            .and_then(|()| crate::output::create_file(&temporary))
            .and_then(|mut f| {
                std::io::Write::write_all(&mut f, format!("{key} {digest}\n").as_bytes())
            })
            .and_then(|()| std::fs::rename(&temporary, &entry))
            .inspect_err(|_| {
                let _ = std::fs::remove_file(&temporary);
            });
    }
    Ok(digest)
}

/// `$AMALGAM_CACHE`, else `$XDG_CACHE_HOME/amalgam`, else `~/.cache/amalgam`; its `sha256/` folder.
fn cache_dir() -> Option<PathBuf> {
    let root = std::env::var_os("AMALGAM_CACHE")
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(|d| PathBuf::from(d).join("amalgam"))
                .or_else(|| {
                    std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache/amalgam"))
                })
        })?;
    Some(root.join("sha256"))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::new(), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// The `README.md` written with every output: Hub front matter, what was done,
/// the recipe verbatim and the inputs with content hashes.
#[derive(Debug, Clone, Default)]
pub struct ModelCard {
    pub title: String,
    /// One paragraph on how the model was made.
    pub summary: String,
    /// The recipe text, verbatim (YAML).
    pub recipe: Option<String>,
    pub inputs: Vec<InputRecord>,
}

impl ModelCard {
    pub fn render(&self) -> String {
        let mut out = String::from("---\nlibrary_name: transformers\ntags:\n- amalgam\n");
        if let Some(base) = self.inputs.iter().find(|i| i.role == "base") {
            let _ = writeln!(
                out,
                "base_model: {}",
                yaml_string(&base.path.display().to_string())
            );
        }
        let _ = write!(out, "---\n\n# {}\n\n{}\n", self.title, self.summary);
        let _ = writeln!(out, "\nMade with amalgam {}.", env!("CARGO_PKG_VERSION"));
        if let Some(recipe) = &self.recipe {
            let _ = write!(out, "\n## Recipe\n\n```yaml\n{}", recipe);
            if !recipe.ends_with('\n') {
                out.push('\n');
            }
            out.push_str("```\n");
        }
        if !self.inputs.is_empty() {
            out.push_str("\n## Inputs\n\n| role | path | file | sha256 |\n|---|---|---|---|\n");
            for input in &self.inputs {
                for (file, digest) in &input.files {
                    let _ = writeln!(
                        out,
                        "| {} | `{}` | {} | `{}` |",
                        input.role,
                        input.path.display(),
                        file,
                        digest
                    );
                }
            }
        }
        out
    }
}

fn yaml_string(text: &str) -> String {
    serde_json::to_string(text).expect("a string serialises")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn card_records_recipe_and_hashes() {
        let card = ModelCard {
            title: "merged".into(),
            summary: "Linear merge.".into(),
            recipe: Some("merge_method: linear".into()),
            inputs: vec![InputRecord {
                role: "base".into(),
                path: "/models/base".into(),
                files: vec![("model.safetensors".into(), "ab".repeat(32))],
            }],
        };
        let text = card.render();
        assert!(text.starts_with("---\n"));
        assert!(text.contains("base_model: \"/models/base\""));
        assert!(text.contains("```yaml\nmerge_method: linear\n```"));
        assert!(text.contains(&format!(
            "| base | `/models/base` | model.safetensors | `{}` |",
            "ab".repeat(32)
        )));
    }

    #[test]
    fn an_in_place_rewrite_with_its_mtime_restored_is_hashed_again() {
        let tmp = tempfile::tempdir().unwrap();
        let (file, entry) = (tmp.path().join("w"), tmp.path().join("cache/entry"));
        std::fs::write(&file, b"first contents").unwrap();
        let first = cached_sha256_in(&file, Some(entry.clone())).unwrap();
        assert_eq!(first, hex(&Sha256::digest(b"first contents")));
        let mtime = std::fs::metadata(&file).unwrap().modified().unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Same size, same inode, modification time set back.
        std::fs::write(&file, b"other contents").unwrap();
        std::fs::File::options()
            .write(true)
            .open(&file)
            .unwrap()
            .set_modified(mtime)
            .unwrap();
        let second = cached_sha256_in(&file, Some(entry)).unwrap();
        assert_eq!(second, hex(&Sha256::digest(b"other contents")));
    }

    #[test]
    fn cache_entries_are_never_followed_or_blocked_on() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("w");
        std::fs::write(&file, b"contents").unwrap();
        let digest = hex(&Sha256::digest(b"contents"));
        // A link planted at the entry's name: replaced, its target untouched.
        let (victim, entry) = (tmp.path().join("victim"), tmp.path().join("entry"));
        std::fs::write(&victim, b"precious").unwrap();
        std::os::unix::fs::symlink(&victim, &entry).unwrap();
        assert_eq!(
            cached_sha256_in(&file, Some(entry.clone())).unwrap(),
            digest
        );
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        assert!(std::fs::read_to_string(&entry)
            .unwrap()
            .ends_with(&format!(" {digest}\n")));
        // A FIFO at the entry's name is not read (the digest is computed).
        let fifo_entry = tmp.path().join("fifo");
        let path = std::ffi::CString::new(fifo_entry.to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);
        assert_eq!(cached_sha256_in(&file, Some(fifo_entry)).unwrap(), digest);
    }

    #[test]
    fn hex_is_lowercase_two_digits_per_byte() {
        assert_eq!(hex(&[0, 15, 255]), "000fff");
        // SHA-256 of the empty string, a published test vector.
        assert_eq!(
            hex(&Sha256::digest(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
    }
}
