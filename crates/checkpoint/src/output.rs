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
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Occupant};
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
        let (out, missing) = checked_output(out, force, inputs)?;

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
            let ((), id) = interrupt::create_registered(&parent, Removal::EmptyDir, || {
                std::fs::create_dir(&parent).at(&parent)
            })?;
            dir.registered.push(id);
            dir.created.push(parent);
        }
        let (lock, id) = interrupt::create_registered(&lock_path(&dir.out), Removal::File, || {
            Lock::acquire(&dir.out)
        })?;
        dir.registered.push(id);
        dir.lock = Some(lock);
        remove_stale_siblings(&dir.out)?;
        // Under the lock, again: the output may have changed since the check.
        check_replaceable(&dir.out, force)?;
        dir.found_empty_dir = dir.out.is_dir();
        let ((), id) = interrupt::create_registered(&dir.staging, Removal::Tree, || {
            std::fs::create_dir(&dir.staging).at(&dir.staging)
        })?;
        dir.registered.push(id);
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
            Some(Displaced::move_aside(&self.out)?)
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
                let _ = std::fs::rename(old.previous(), &self.out);
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
            std::fs::remove_dir_all(&old.dir).at(&old.dir)?;
        }
        if let Some(parent) = self.out.parent() {
            File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
        }
        Ok(self.out.clone())
    }

    fn changed_during_run(&self) -> Error {
        Error::OutputOccupied {
            path: self.out.clone(),
            occupant: Occupant::ChangedDuringRun,
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

/// The checks [`OutputDir::create`] makes before it creates anything, for a
/// command to make before its long work: `out` is not inside, nor holds, nor
/// is any of `inputs`, and is absent, an empty directory, or (with `force`)
/// a directory.
pub fn check_output(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<()> {
    checked_output(out, force, inputs).map(drop)
}

/// [`check_output`], returning what [`resolve_output`] does.
fn checked_output(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<(PathBuf, Vec<PathBuf>)> {
    let (out, missing) = resolve_output(out)?;
    for input in inputs {
        let input = std::fs::canonicalize(input).at(input)?;
        if out.starts_with(&input) || input.starts_with(&out) {
            return Err(Error::OutputOverlapsInput { output: out, input });
        }
    }
    check_replaceable(&out, force)?;
    Ok((out, missing))
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
        return Err(Error::OutputOccupied {
            path: out.into(),
            occupant: Occupant::NonEmptyDirectory,
        });
    }
    Ok(())
}

/// `rename(2)` that fails with `AlreadyExists` instead of
/// replacing `to`. Where the filesystem has no `RENAME_NOREPLACE`, a hard
/// link (which never replaces either) and an unlink; where it has no hard
/// links, a check and a rename.
pub(crate) fn rename_noreplace(from: &Path, to: &Path) -> std::io::Result<()> {
    let c = |p: &Path| CString::new(p.as_os_str().as_bytes()).map_err(std::io::Error::other);
    let (from_c, to_c) = (c(from)?, c(to)?);
    // SAFETY: two valid NUL-terminated absolute paths.
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
    if !matches!(
        error.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::ENOTSUP)
    ) {
        return Err(error);
    }
    match std::fs::hard_link(from, to) {
        Ok(()) => std::fs::remove_file(from),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Err(e),
        Err(_) => {
            if std::fs::symlink_metadata(to).is_ok() {
                return Err(std::io::ErrorKind::AlreadyExists.into());
            }
            std::fs::rename(from, to)
        }
    }
}

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
        // Private: in a shared temporary directory no one else may plant files in it.
        let ((), registration) = interrupt::create_registered(&path, Removal::Tree, || {
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(&path)
                .at(&path)
        })?;
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

/// Creates a new file in a directory this run made: never an existing one,
/// never through a symlink planted at its name.
pub(crate) fn create_file(path: &Path) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

/// A hidden sibling of `out`, unique to this process and moment:
/// `.NAME.amalgam-PURPOSE-PID-NANOS`.
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
/// processes that no longer run; the previous output a killed `--force` run
/// moved aside (`old`) is put back if `out` is missing, else removed. Only
/// what amalgam itself made is touched: a directory (never a symlink) owned
/// by this user, and for `old` one holding amalgam's marker; anything else at
/// those names is left where it is, with a warning. Says what it did.
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
        if !matches!(purpose, "tmp" | STAGES | "old") || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let leave = |why: &str| {
            tracing::warn!(
                "left {} alone: named like a run's leftover, but {why}",
                path.display()
            )
        };
        if !is_own_directory(&path) {
            leave("it is not a directory of this user's (a symlink or a planted file?)");
            continue;
        }
        match purpose {
            "old" => {
                let Some(old) = Displaced::recognise(&path) else {
                    leave("it lacks the marker amalgam writes when it moves an output aside");
                    continue;
                };
                if std::fs::symlink_metadata(out).is_err() {
                    std::fs::rename(old.previous(), out).at(&path)?;
                    tracing::warn!(
                        "restored {} from {}: a run (process {pid}) was killed while replacing \
                         it",
                        out.display(),
                        path.display()
                    );
                } else {
                    tracing::warn!(
                        "removed {}: the previous output, already replaced by process {pid}",
                        path.display()
                    );
                }
                std::fs::remove_dir_all(&path).at(&path)?;
            }
            _ => {
                std::fs::remove_dir_all(&path).at(&path)?;
                tracing::warn!(
                    "removed {}: an unfinished output left by process {pid}, which no longer runs",
                    path.display()
                );
            }
        }
    }
    Ok(())
}

/// A directory (not followed if a symlink) owned by this process's user.
fn is_own_directory(path: &Path) -> bool {
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    std::fs::symlink_metadata(path).is_ok_and(|m| m.is_dir() && m.uid() == uid)
}

/// The previous output moved aside by a `--force` commit: inside a private
/// directory `.OUT.amalgam-old-PID-NANOS/` that holds a marker written
/// before the move, so that a later run restores only what amalgam moved.
struct Displaced {
    dir: PathBuf,
}

const DISPLACED_MARKER: &str = "moved-aside-by-amalgam";
const DISPLACED_ENTRY: &str = "previous";

impl Displaced {
    fn move_aside(out: &Path) -> Result<Self> {
        let dir = sibling(out, "old");
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .at(&dir)?;
        let marker = dir.join(DISPLACED_MARKER);
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&marker)
            .and_then(|mut f| writeln!(f, "{}", out.display()).and_then(|()| f.sync_all()));
        let moved = written
            .at(&marker)
            .and_then(|()| std::fs::rename(out, dir.join(DISPLACED_ENTRY)).at(out));
        if let Err(e) = moved {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(e);
        }
        Ok(Self { dir })
    }

    /// `dir` as [`Self::move_aside`] leaves it: the marker a regular file,
    /// the previous output a directory (neither a symlink).
    fn recognise(dir: &Path) -> Option<Self> {
        let marker = std::fs::symlink_metadata(dir.join(DISPLACED_MARKER)).ok()?;
        let previous = std::fs::symlink_metadata(dir.join(DISPLACED_ENTRY)).ok()?;
        (marker.is_file() && previous.is_dir()).then(|| Self { dir: dir.into() })
    }

    fn previous(&self) -> PathBuf {
        self.dir.join(DISPLACED_ENTRY)
    }
}

pub(crate) fn process_alive(pid: i32) -> bool {
    // SAFETY: signal 0 only checks that the process exists.
    let rc = unsafe { libc::kill(pid, 0) };
    rc == 0 || std::io::Error::last_os_error().raw_os_error() != Some(libc::ESRCH)
}

/// An exclusive `flock` on `.NAME.amalgam-lock` beside the output, held for
/// the run; the file holds the owner's pid and is removed on release. The
/// lock file is always one this run created (`O_CREAT|O_EXCL|O_NOFOLLOW`):
/// nothing planted at its name (a symlink, a hard link to another file, a
/// device) is ever opened for writing, truncated or followed.
#[derive(Debug)]
struct Lock {
    path: PathBuf,
    file: File,
}

/// The lock file of the output `out`.
fn lock_path(out: &Path) -> PathBuf {
    out.with_file_name(format!("{}lock", sibling_prefix(out)))
}

impl Lock {
    fn acquire(out: &Path) -> Result<Self> {
        let path = lock_path(out);
        loop {
            let created = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&path);
            let mut file = match created {
                Ok(file) => file,
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                    Self::clear_stale(out, &path)?;
                    continue;
                }
                Err(e) => return Err(e).at(&path),
            };
            // SAFETY: flock on an open descriptor.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                // Another run opened the file we just created and locked it first.
                return Err(Self::held(out, &path));
            }
            // A run before us may have removed the name after we created it
            // (it took our new file for a stale one): then this lock guards
            // nothing; start again.
            if !same_file(&path, &file) {
                continue;
            }
            write!(file, "{}", std::process::id()).at(&path)?;
            return Ok(Self { path, file });
        }
    }

    /// Something is at the lock's name: a live run's lock (an error naming
    /// its pid), a lock a killed run left (removed, so the caller can create
    /// its own), or anything else (refused, never touched).
    fn clear_stale(out: &Path, path: &Path) -> Result<()> {
        let planted = |what: &str| Error::Write {
            path: out.into(),
            message: format!(
                "{} is {what}, not a lock file amalgam wrote; refusing to use or remove it \
                 (remove it yourself if it is yours)",
                path.display()
            ),
        };
        let file = match std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
        {
            Ok(file) => file,
            // Removed in between: the caller tries to create it again.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => {
                return Err(planted("a symbolic link"))
            }
            Err(e) => return Err(e).at(path),
        };
        let meta = file.metadata().at(path)?;
        if !meta.is_file() {
            return Err(planted("not a regular file"));
        }
        // SAFETY: flock on an open descriptor (a shared lock needs no write access).
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            return Err(Self::held(out, path));
        }
        // SAFETY: geteuid has no preconditions.
        let ours = meta.uid() == unsafe { libc::geteuid() } && meta.nlink() == 1;
        let pid: Option<i32> = read_small(file, 32).and_then(|t| t.trim().parse().ok());
        // We hold its lock, so the run that wrote it is gone (a lock dies with
        // its process); empty, its run died between creating and writing it.
        let stale = ours && (pid.is_some_and(|p| p > 0) || meta.len() == 0);
        if !stale {
            return Err(planted(
                "a file whose contents or owner are not a dead run's",
            ));
        }
        // Only the name is removed, and only if it still names the file checked.
        let again = std::fs::symlink_metadata(path).at(path)?;
        if again.ino() == meta.ino() && again.dev() == meta.dev() {
            std::fs::remove_file(path).at(path)?;
            tracing::warn!(
                "removed {}: the lock of process {}, which no longer runs",
                path.display(),
                pid.unwrap_or_default()
            );
        }
        Ok(())
    }

    fn held(out: &Path, path: &Path) -> Error {
        let owner = std::fs::OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)
            .ok()
            .and_then(|f| read_small(f, 32))
            .and_then(|t| t.trim().parse::<i32>().ok());
        Error::Write {
            path: out.into(),
            message: format!(
                "another amalgam process{} is writing this output; wait for it to finish or \
                 choose another output",
                owner.map(|p| format!(" (pid {p})")).unwrap_or_default()
            ),
        }
    }
}

/// At most `limit` bytes of an opened file, as text.
fn read_small(file: File, limit: u64) -> Option<String> {
    let mut text = String::new();
    file.take(limit).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Whether `path` (not followed) names the opened `file`.
fn same_file(path: &Path, file: &File) -> bool {
    std::fs::symlink_metadata(path)
        .ok()
        .zip(file.metadata().ok())
        .is_some_and(|(a, b)| a.ino() == b.ino() && a.dev() == b.dev())
}

impl Drop for Lock {
    fn drop(&mut self) {
        // Removed while still held, so a waiting run re-opens a fresh file.
        let _ = std::fs::remove_file(&self.path);
        let _ = &self.file;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// While the interrupt cleanup holds the registry (it is removing what
    /// is registered), an output being created makes nothing: creating a
    /// staging directory and registering it are one step, so no interrupt
    /// can fall between them and leave the directory behind.
    #[test]
    fn nothing_is_created_while_the_interrupt_cleanup_runs() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("out");
        let cleanup = interrupt::registry();
        let creating = {
            let out = out.clone();
            std::thread::spawn(move || OutputDir::create(&out, false, &[]).map(drop))
        };
        std::thread::sleep(std::time::Duration::from_millis(300));
        let made: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().collect();
        assert!(made.is_empty(), "created while the cleanup ran: {made:?}");
        drop(cleanup);
        creating.join().unwrap().unwrap();
    }
}
