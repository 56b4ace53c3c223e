//! Models named as on the Hugging Face Hub (`org/name`, `org/name@revision`)
//! found offline in the local Hugging Face cache, laid out as
//! `huggingface_hub` lays it out: `models--org--name/refs/REVISION` holds a
//! commit hash, `snapshots/COMMIT/` the files (links into `blobs/`). amalgam
//! never downloads; a model not in the cache is an error that gives the
//! command which fetches it.

use std::path::{Path, PathBuf};

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
            Some((repo, revision)) if !revision.is_empty() => (repo, Some(revision.to_owned())),
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
        let reference = entry.join("refs").join(revision);
        let commit = match std::fs::read_to_string(&reference) {
            Ok(text) => text.trim().to_owned(),
            Err(_) => revision.to_owned(),
        };
        let snapshot = entry.join("snapshots").join(&commit);
        let plain = !commit.is_empty() && !commit.contains(['/', '\\']) && commit != "..";
        if plain && snapshot.is_dir() {
            return Ok(snapshot);
        }
        Err(not_cached(format!(
            "is in the Hugging Face cache ({}) but not at revision `{revision}`",
            entry.display()
        )))
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
        ] {
            assert_eq!(HubId::parse(not_an_id), None, "{not_an_id}");
        }
    }
}
