//! How an output directory comes to exist: everything is checked before
//! anything is created; the output is built in a hidden staging sibling and
//! renamed into place only when complete, with `RENAME_NOREPLACE` so that
//! nothing the run did not check is ever replaced (a directory created at the
//! output during the run, or a concurrent run's result); a lock beside the
//! output makes a second run into the same output fail at once; a run that
//! fails, or is interrupted, leaves nothing behind, and one that was killed
//! is cleaned up after by the next run into the same output.

use std::ffi::CString;
use std::fs::File;
use std::io::{Read, Seek, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};

use crate::error::IoContext;
use crate::interrupt::{self, Removal};
use crate::{Error, Result};

/// An output directory being written: files go into [`OutputDir::staging`];
/// [`OutputDir::commit`] puts them in place. Dropped uncommitted, it removes
/// the staging directory and any parent directories it created.
#[derive(Debug)]
pub struct OutputDir {
    out: PathBuf,
    staging: PathBuf,
    force: bool,
    /// What the checks found at `out`: an empty directory (else nothing).
    found_empty_dir: bool,
    /// Parent directories this run created, outermost first.
    created: Vec<PathBuf>,
    lock: Option<Lock>,
    /// Interrupt-cleanup registrations, in the order made.
    registered: Vec<u64>,
    committed: bool,
}

impl OutputDir {
    /// Checks `out` (not inside, nor containing, any of `inputs`; absent, an
    /// empty directory, or anything with `force`), then creates what is
    /// needed: missing parents, the lock, the staging directory.
    pub fn create(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<Self> {
        let (out, missing) = resolve_output(out)?;
        for input in inputs {
            let input = std::fs::canonicalize(input).at(input)?;
            if out.starts_with(&input) || input.starts_with(&out) {
                return Err(Error::OutputOverlapsInput { output: out, input });
            }
        }
        check_replaceable(&out, force)?;

        let mut dir = Self {
            staging: sibling(&out, "tmp"),
            out,
            force,
            found_empty_dir: false,
            created: vec![],
            lock: None,
            registered: vec![],
            committed: false,
        };
        // From here on, Drop undoes what was created.
        for parent in missing {
            std::fs::create_dir(&parent).at(&parent)?;
            dir.registered
                .push(interrupt::register(&parent, Removal::EmptyDir));
            dir.created.push(parent);
        }
        let lock = Lock::acquire(&dir.out)?;
        dir.registered
            .push(interrupt::register(&lock.path, Removal::File));
        dir.lock = Some(lock);
        remove_stale_siblings(&dir.out)?;
        // Under the lock, again: the output may have changed since the check.
        check_replaceable(&dir.out, force)?;
        dir.found_empty_dir = dir.out.is_dir();
        std::fs::create_dir(&dir.staging).at(&dir.staging)?;
        dir.registered
            .push(interrupt::register(&dir.staging, Removal::Tree));
        Ok(dir)
    }

    /// Where the output's files are written until the commit.
    pub fn staging(&self) -> &Path {
        &self.staging
    }

    /// The output directory (absolute).
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// Syncs the staging directory and renames it into place. Without
    /// `force`, only over what was checked at the start (nothing, or an empty
    /// directory that is still empty); with it, over whatever is there.
    pub fn commit(mut self) -> Result<PathBuf> {
        File::open(&self.staging)
            .and_then(|d| d.sync_all())
            .at(&self.staging)?;
        // No interrupt cleanup runs while the output is being swapped in.
        let mut registry = interrupt::registry();
        let displaced = if self.force && std::fs::symlink_metadata(&self.out).is_ok() {
            let old = sibling(&self.out, "old");
            std::fs::rename(&self.out, &old).at(&self.out)?;
            Some(old)
        } else if self.found_empty_dir {
            // The empty directory checked at the start; rmdir fails if
            // anything appeared in it since.
            match std::fs::remove_dir(&self.out) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) if e.kind() == std::io::ErrorKind::DirectoryNotEmpty => {
                    return Err(self.changed_during_run());
                }
                Err(e) if self.out.is_dir() => {
                    return Err(Error::Io {
                        path: self.out.clone(),
                        cause: e,
                    })
                }
                Err(_) => return Err(self.changed_during_run()),
            }
            None
        } else {
            None
        };
        if let Err(e) = rename_noreplace(&self.staging, &self.out) {
            if let Some(old) = &displaced {
                let _ = std::fs::rename(old, &self.out);
            }
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => self.changed_during_run(),
                _ => Error::Io {
                    path: self.out.clone(),
                    cause: e,
                },
            });
        }
        self.committed = true;
        for id in self.registered.drain(..) {
            registry.forget(id);
        }
        drop(registry);
        if let Some(old) = displaced {
            std::fs::remove_dir_all(&old).at(&old)?;
        }
        if let Some(parent) = self.out.parent() {
            File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
        }
        Ok(self.out.clone())
    }

    fn changed_during_run(&self) -> Error {
        Error::Write {
            path: self.out.clone(),
            message: "appeared or changed while amalgam was writing it (another process?); \
                      refusing to replace what was not checked (pass --force to replace it)"
                .into(),
        }
    }
}

impl Drop for OutputDir {
    fn drop(&mut self) {
        if self.committed {
            return;
        }
        let _ = std::fs::remove_dir_all(&self.staging);
        self.lock = None;
        for parent in self.created.iter().rev() {
            // Only if still empty: never remove what someone else put there.
            let _ = std::fs::remove_dir(parent);
        }
        let mut registry = interrupt::registry();
        for id in self.registered.drain(..) {
            registry.forget(id);
        }
    }
}

/// `out` made absolute through its deepest existing ancestor, without
/// creating anything, and the missing parent directories, outermost first.
fn resolve_output(out: &Path) -> Result<(PathBuf, Vec<PathBuf>)> {
    let name = match out.components().next_back() {
        Some(Component::Normal(name)) => name.to_owned(),
        _ => {
            return Err(Error::Write {
                path: out.into(),
                message: "output path has no directory name".into(),
            })
        }
    };
    let mut existing = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let mut missing_names = vec![];
    while std::fs::symlink_metadata(&existing).is_err() {
        match existing.components().next_back() {
            Some(Component::Normal(part)) => missing_names.push(part.to_owned()),
            _ => {
                return Err(Error::Write {
                    path: out.into(),
                    message: "the output's parent does not exist and cannot be created \
                              (it goes through `..` or `.`)"
                        .into(),
                })
            }
        }
        existing = match existing.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
    }
    let mut parent = std::fs::canonicalize(&existing).at(&existing)?;
    let mut missing = vec![];
    for part in missing_names.into_iter().rev() {
        parent.push(part);
        missing.push(parent.clone());
    }
    Ok((parent.join(name), missing))
}

/// Whether the output may be written: absent, an empty directory, or
/// (with `force`) any directory.
fn check_replaceable(out: &Path, force: bool) -> Result<()> {
    let Ok(meta) = std::fs::symlink_metadata(out) else {
        return Ok(());
    };
    if !meta.is_dir() {
        return Err(Error::Write {
            path: out.into(),
            message: "exists and is not a directory".into(),
        });
    }
    let empty = std::fs::read_dir(out).at(out)?.next().is_none();
    if !empty && !force {
        return Err(Error::OutputNotEmpty { path: out.into() });
    }
    Ok(())
}

/// `rename(2)` that fails with `AlreadyExists` instead of replacing `to`.
fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated paths, relative to nothing (absolute).
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            from_c.as_ptr(),
            libc::AT_FDCWD,
            to_c.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let error = std::io::Error::last_os_error();
    match error.raw_os_error() {
        // A filesystem without RENAME_NOREPLACE: check, then rename, under
        // the output's lock (exact against other amalgam runs).
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
        _ => Err(error),
    }
}

/// A hidden sibling of `out`, unique to this process and moment:
/// `.NAME.amalgam-PURPOSE-PID-NANOS`.
/// A directory for a run's intermediate results (the stages of a multi-stage
/// recipe), beside its output when the output's parent exists, else in the
/// system's temporary directory. Removed when dropped, when the run is
/// interrupted, or by a later run into the same output if this process died.
pub struct ScratchDir {
    path: PathBuf,
    registration: u64,
}

impl ScratchDir {
    pub fn create(out: &Path) -> Result<Self> {
        let beside = out
            .parent()
            .filter(|p| p.as_os_str().is_empty() || p.is_dir());
        let path = match beside {
            Some(_) => sibling(out, STAGES),
            None => sibling(&std::env::temp_dir().join("amalgam"), STAGES),
        };
        std::fs::create_dir(&path).at(&path)?;
        let registration = interrupt::register(&path, Removal::Tree);
        Ok(Self { path, registration })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ScratchDir {
    fn drop(&mut self) {
        let mut registry = interrupt::registry();
        let _ = std::fs::remove_dir_all(&self.path);
        registry.forget(self.registration);
    }
}

const STAGES: &str = "stages";

pub(crate) fn sibling(out: &Path, purpose: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    out.with_file_name(format!(
        "{}{purpose}-{}-{nanos}",
        sibling_prefix(out),
        std::process::id()
    ))
}

fn sibling_prefix(out: &Path) -> String {
    format!(
        ".{}.amalgam-",
        out.file_name().unwrap_or_default().to_string_lossy()
    )
}

/// Removes staging (`tmp`) and scratch (`stages`) siblings of `out` left by
/// processes that no longer run; an `old` sibling (the previous output, displaced by a `--force` run
/// killed mid-commit) is put back if `out` is missing, else removed. Says what
/// it did.
fn remove_stale_siblings(out: &Path) -> Result<()> {
    let parent = out.parent().expect("an absolute output has a parent");
    let prefix = sibling_prefix(out);
    for entry in std::fs::read_dir(parent).at(parent)? {
        let entry = entry.at(parent)?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(&prefix)) else {
            continue;
        };
        let Some((purpose, pid)) = rest
            .split_once('-')
            .and_then(|(purpose, rest)| Some((purpose, rest.split('-').next()?.parse().ok()?)))
        else {
            continue;
        };
        if process_alive(pid) {
            continue;
        }
        let path = entry.path();
        match purpose {
            "tmp" | STAGES => {
                std::fs::remove_dir_all(&path).at(&path)?;
                tracing::warn!(
                    "removed {}: an unfinished output left by process {pid}, which no longer runs",
                    path.display()
                );
            }
            "old" if std::fs::symlink_metadata(out).is_err() => {
                std::fs::rename(&path, out).at(&path)?;
                tracing::warn!(
                    "restored {} from {}: a run with --force (process {pid}) was killed while \
                     replacing it",
                    out.display(),
                    path.display()
                );
            }
            "old" => {
                std::fs::remove_dir_all(&path).at(&path)?;
                tracing::warn!(
                    "removed {}: the previous output, already replaced by process {pid}",
                    path.display()
                );
            }
            _ => {}
        }
    }
    Ok(())
}

fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// An exclusive `flock` on `.NAME.amalgam-lock` beside the output, held for
/// the run; the file holds the owner's pid and is removed on release.
#[derive(Debug)]
struct Lock {
    path: PathBuf,
    file: File,
}

impl Lock {
    fn acquire(out: &Path) -> Result<Self> {
        let path = out.with_file_name(format!("{}lock", sibling_prefix(out)));
        loop {
            let mut file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .open(&path)
                .at(&path)?;
            // SAFETY: flock on an open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let mut owner = String::new();
                let _ = file.read_to_string(&mut owner);
                let owner = owner.trim();
                return Err(Error::Write {
                    path: out.into(),
                    message: format!(
                        "another amalgam process{} is writing this output; wait for it to \
                         finish or choose another output",
                        if owner.is_empty() {
                            String::new()
                        } else {
                            format!(" (pid {owner})")
                        }
                    ),
                });
            }
            // The holder before us may have removed the file after we opened
            // it: then this lock guards nothing; take the one now at `path`.
            let same = std::fs::metadata(&path)
                .ok()
                .zip(file.metadata().ok())
                .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev());
            if !same {
                continue;
            }
            file.set_len(0).at(&path)?;
            file.rewind().at(&path)?;
            write!(file, "{}", std::process::id()).at(&path)?;
            return Ok(Self { path, file });
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held, so a waiting run re-opens a fresh file.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}
