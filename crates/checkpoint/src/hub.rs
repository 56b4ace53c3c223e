//! Models named as on the Hugging Face Hub (`org/name`, `org/name@revision`)
//! found offline in the local Hugging Face cache, laid out as
//! `huggingface_hub` lays it out: `models--org--name/refs/REVISION` holds a
//! commit hash, `snapshots/COMMIT/` the files (links into `blobs/`). amalgam
//! never downloads; a model not in the cache is an error that gives the
//! command which fetches it.

use std::path::{Path, PathBuf};

use crate::error::IoContext;
use crate::files::read_regular;
use crate::{Error, Result};

/// A model reference as a recipe writes it, made a directory: an existing
/// path as it is, else a Hub id resolved in the local cache.
pub fn locate(reference: &str) -> Result<PathBuf> {
    let path = Path::new(reference);
    if path.exists() {
        return Ok(path.to_path_buf());
    }
    match HubId::parse(reference) {
        Some(id) => id.resolve(&cache_dir()),
        None => Err(Error::Locate {
            message: format!(
                "model `{reference}` is not a local directory (nor a Hub id such as `org/name`)"
            ),
        }),
    }
}

/// `org/name`, optionally `@revision` (a branch, tag or commit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HubId {
    pub repo: String,
    pub revision: Option<String>,
}

impl HubId {
    pub fn parse(text: &str) -> Option<Self> {
        let (repo, revision) = match text.split_once('@') {
            Some((repo, revision)) if is_revision_name(revision) => {
                (repo, Some(revision.to_owned()))
            }
            Some(_) => return None,
            None => (text, None),
        };
        let (org, name) = repo.split_once('/')?;
        let part = |p: &str| {
            !p.is_empty()
                && !p.starts_with(['.', '-'])
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        (part(org) && part(name)).then(|| Self {
            repo: repo.to_owned(),
            revision,
        })
    }

    /// The snapshot directory of this revision (default `main`) in `cache`.
    pub fn resolve(&self, cache: &Path) -> Result<PathBuf> {
        let entry = cache.join(format!("models--{}", self.repo.replace('/', "--")));
        let revision = self.revision.as_deref().unwrap_or("main");
        let not_cached = |what: String| Error::Locate {
            message: format!(
                "model `{self}` {what}; amalgam never downloads: fetch it with `{}` and run \
                 again (or name a local directory)",
                self.download_command()
            ),
        };
        if !entry.is_dir() {
            return Err(not_cached(format!(
                "is not in the Hugging Face cache ({})",
                cache.display()
            )));
        }
        // A branch or tag names a commit in refs/; a commit names itself.
        // Every file read resolves inside this entry, and is a small regular file.
        let inside = |path: &Path| {
            let real = std::fs::canonicalize(path).at(path)?;
            let root = std::fs::canonicalize(&entry).at(&entry)?;
            if !real.starts_with(&root) {
                return Err(Error::Input {
                    path: path.into(),
                    message: format!(
                        "resolves to {}, outside its cache entry {}; refusing it",
                        real.display(),
                        root.display()
                    ),
                });
            }
            Ok(real)
        };
        let reference = entry.join("refs").join(revision);
        let commit =
            if std::fs::symlink_metadata(&reference).is_ok() {
                let bytes = read_regular(&inside(&reference)?, MAX_REF_BYTES, "a cache ref")
                    .map_err(|e| match e {
                        Error::Io { path, cause } => Error::Input {
                            path,
                            message: cause.to_string(),
                        },
                        other => other,
                    })?;
                String::from_utf8_lossy(&bytes).trim().to_owned()
            } else {
                revision.to_owned()
            };
        if !is_commit_hash(&commit) {
            let message = if commit == revision {
                format!(
                    "is in the Hugging Face cache ({}) but not at revision `{revision}`",
                    entry.display()
                )
            } else {
                format!(
                    "has a ref `{revision}` in the Hugging Face cache that holds {commit:?}, not \
                     a commit hash"
                )
            };
            return Err(not_cached(message));
        }
        let snapshot = entry.join("snapshots").join(&commit);
        match std::fs::symlink_metadata(&snapshot) {
            Ok(meta) if meta.is_dir() => {
                inside(&snapshot)?;
                Ok(snapshot)
            }
            Ok(_) => Err(Error::Input {
                path: snapshot,
                message: "is not a directory of the cache entry (a symlink?); a snapshot is \
                          the cache's own directory of links into its blobs"
                    .into(),
            }),
            Err(_) => Err(not_cached(format!(
                "is in the Hugging Face cache ({}) but not at revision `{revision}`",
                entry.display()
            ))),
        }
    }

    /// The `hf` command that puts this model in the cache.
    pub fn download_command(&self) -> String {
        match &self.revision {
            Some(revision) => format!("hf download {} --revision {revision}", self.repo),
            None => format!("hf download {}", self.repo),
        }
    }
}

impl std::fmt::Display for HubId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.revision {
            Some(revision) => write!(f, "{}@{revision}", self.repo),
            None => f.write_str(&self.repo),
        }
    }
}

/// The most bytes of a `refs/` file (a commit hash and a newline).
const MAX_REF_BYTES: u64 = 1024;

/// A branch, tag or commit: `/`-separated names of letters, digits, `-`, `_`
/// and `.`, none empty or starting with a dot (so never `..`, never a path
/// out of `refs/`).
fn is_revision_name(revision: &str) -> bool {
    !revision.is_empty()
        && revision.split('/').all(|part| {
            !part.is_empty()
                && !part.starts_with('.')
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        })
}

/// A git commit hash as the cache names snapshots: 40 (SHA-1) or 64
/// (SHA-256) lowercase hex digits.
fn is_commit_hash(text: &str) -> bool {
    matches!(text.len(), 40 | 64) && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Where `huggingface_hub` keeps its cache: `HF_HUB_CACHE`, else the legacy
/// `HUGGINGFACE_HUB_CACHE`, else `HF_HOME/hub`, else
/// `XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
pub fn cache_dir() -> PathBuf {
    let var = |name: &str| {
        std::env::var_os(name)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    if let Some(dir) = var("HF_HUB_CACHE").or_else(|| var("HUGGINGFACE_HUB_CACHE")) {
        return dir;
    }
    let home = var("HF_HOME").unwrap_or_else(|| {
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .unwrap_or_else(|| PathBuf::from(".cache"))
            .join("huggingface")
    });
    home.join("hub")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hub_ids_parse_with_and_without_a_revision() {
        let id = HubId::parse("meta-llama/Llama-3.2-1B").unwrap();
        assert_eq!(
            (id.repo.as_str(), id.revision),
            ("meta-llama/Llama-3.2-1B", None)
        );
        let id = HubId::parse("org/name@v1.0").unwrap();
        assert_eq!(id.revision.as_deref(), Some("v1.0"));
        assert_eq!(
            id.download_command(),
            "hf download org/name --revision v1.0"
        );
        for not_an_id in [
            "./models/x",
            "/abs/path",
            "a/b/c",
            "name",
            "org/",
            "../x",
            "org/name@",
            "org/m@../../../x",
            "org/m@refs/../../x",
            "org/m@/etc/passwd",
            "org/m@.hidden",
            "org/m@a//b",
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
        assert!(HubId::parse("org/m@refs/pr/1").is_some());
    }

    /// A cache entry with `refs/main` holding `commit` and its snapshot.
    fn entry(cache: &Path, commit: &str) -> PathBuf {
        let entry = cache.join("models--org--m");
        std::fs::create_dir_all(entry.join("refs")).unwrap();
        std::fs::create_dir_all(entry.join("snapshots").join(commit)).unwrap();
        std::fs::write(entry.join("refs/main"), commit).unwrap();
        entry
    }

    const COMMIT: &str = "0123456789abcdef0123456789abcdef01234567";

    #[test]
    fn cache_files_must_resolve_inside_their_entry() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = tmp.path().join("hub");
        let entry = entry(&cache, COMMIT);
        let id = HubId::parse("org/m").unwrap();
        assert_eq!(
            id.resolve(&cache).unwrap(),
            entry.join("snapshots").join(COMMIT)
        );

        // A snapshot that is a symlink out of the cache.
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        let linked = "1111111111111111111111111111111111111111";
        std::os::unix::fs::symlink(&outside, entry.join("snapshots").join(linked)).unwrap();
        let err = HubId::parse(&format!("org/m@{linked}"))
            .unwrap()
            .resolve(&cache)
            .unwrap_err()
            .to_string();
        assert!(err.contains("not a directory of the cache entry"), "{err}");

        // A ref that is a symlink out of the entry, one that holds a path,
        // a FIFO, a huge file: each refused, none read whole or followed.
        let secret = tmp.path().join("secret");
        std::fs::write(&secret, COMMIT).unwrap();
        std::os::unix::fs::symlink(&secret, entry.join("refs/out")).unwrap();
        std::fs::write(entry.join("refs/path"), "../../../../etc").unwrap();
        let fifo = std::ffi::CString::new(entry.join("refs/fifo").to_str().unwrap()).unwrap();
        // SAFETY: a valid path.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let huge = std::fs::File::create(entry.join("refs/huge")).unwrap();
        huge.set_len(3 << 30).unwrap();
        for (revision, needle) in [
            ("out", "outside its cache entry"),
            ("path", "not a commit hash"),
            ("fifo", "FIFO"),
            ("huge", "too large"),
        ] {
            let err = HubId::parse(&format!("org/m@{revision}"))
                .unwrap()
                .resolve(&cache)
                .unwrap_err()
                .to_string();
            assert!(err.contains(needle), "{revision}: {err}");
        }
    }
}
