//! How a single-file output (a plot, a report) comes to exist, by the rules
//! an [`OutputDir`](crate::OutputDir) keeps: everything is checked before
//! anything is created (the output is never an input, never a directory, and
//! an existing file or symlink is replaced only with `force`); the contents go
//! into a hidden temporary sibling this run created (`O_CREAT|O_EXCL|
//! O_NOFOLLOW`: nothing planted at its name is opened, truncated or followed),
//! are synced, and the temporary file is renamed into place — with
//! `RENAME_NOREPLACE` without `force`, so that nothing that appeared at the
//! output meanwhile is replaced; with `force` the name is replaced, a symlink
//! as a link, never written through. A run that fails, is dropped or is
//! interrupted leaves no temporary file; one killed outright leaves one that
//! the next run into the same output removes.

use std::fs::File;
use std::io::Write;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Component, Path, PathBuf};

use crate::error::{IoContext, Occupant};
use crate::interrupt::{self, Removal};
use crate::output::{process_alive, rename_noreplace, sibling};
use crate::{Error, Result};

/// The purpose in the temporary sibling's name, `.NAME.amalgam-file-PID-NANOS`.
const PURPOSE: &str = "file";

/// A single output file being written. Write to it ([`Write`]), then
/// [`OutputFile::commit`]; dropped uncommitted, it removes its temporary file
/// and leaves the output as it found it.
#[derive(Debug)]
pub struct OutputFile {
    out: PathBuf,
    temp: PathBuf,
    file: File,
    force: bool,
    /// The temporary file's interrupt-cleanup registration; `None` once committed.
    registration: Option<u64>,
}

impl OutputFile {
    /// Checks `out` (its directory exists; it is not any of `inputs`, nor a
    /// link to one; nothing is there, or with `force` anything but a
    /// directory), then creates the temporary file beside it.
    pub fn create(out: &Path, force: bool, inputs: &[PathBuf]) -> Result<Self> {
        let out = resolve(out)?;
        for input in inputs {
            check_not_input(&out, input)?;
        }
        check_replaceable(&out, force)?;
        remove_stale_temporaries(&out);
        let temp = sibling(&out, PURPOSE);
        let (file, registration) = interrupt::create_registered(&temp, Removal::File, || {
            std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o666)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&temp)
                .at(&temp)
        })?;
        Ok(Self {
            out,
            temp,
            file,
            force,
            registration: Some(registration),
        })
    }

    /// The output (absolute, its last component as given: not followed).
    pub fn out(&self) -> &Path {
        &self.out
    }

    /// The opened temporary file, for writers that want a `File`.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Syncs the temporary file and renames it into place. Without `force`,
    /// only if the output is still absent; with it, over whatever is there
    /// but a directory (a symlink is replaced as a link). Returns the output.
    pub fn commit(mut self) -> Result<PathBuf> {
        self.file.sync_all().at(&self.temp)?;
        // No interrupt cleanup runs while the file is being renamed.
        let mut registry = interrupt::registry();
        let renamed = if self.force {
            std::fs::rename(&self.temp, &self.out)
        } else {
            rename_noreplace(&self.temp, &self.out)
        };
        if let Err(e) = renamed {
            drop(registry);
            return Err(match e.kind() {
                std::io::ErrorKind::AlreadyExists => Error::OutputOccupied {
                    path: self.out.clone(),
                    occupant: Occupant::ChangedDuringRun,
                },
                _ => Error::Io {
                    path: self.out.clone(),
                    cause: e,
                },
            });
        }
        if let Some(id) = self.registration.take() {
            registry.forget(id);
        }
        drop(registry);
        let parent = self.out.parent().expect("an absolute output has a parent");
        File::open(parent).and_then(|d| d.sync_all()).at(parent)?;
        Ok(self.out.clone())
    }
}

impl Write for OutputFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.file.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

impl Drop for OutputFile {
    fn drop(&mut self) {
        if let Some(id) = self.registration.take() {
            let mut registry = interrupt::registry();
            let _ = std::fs::remove_file(&self.temp);
            registry.forget(id);
        }
    }
}

/// Writes `contents` to `out` by the [`OutputFile`] protocol.
pub fn write_output_file(
    out: &Path,
    force: bool,
    inputs: &[PathBuf],
    contents: &[u8],
) -> Result<PathBuf> {
    let mut file = OutputFile::create(out, force, inputs)?;
    file.write_all(contents).at(&file.temp)?;
    file.commit()
}

/// `out` made absolute through its (existing, canonical) directory; its last
/// component is kept as given, never followed.
fn resolve(out: &Path) -> Result<PathBuf> {
    let refuse = |message: String| Error::Write {
        path: out.into(),
        message,
    };
    let name = match out.components().next_back() {
        Some(Component::Normal(name)) => name.to_owned(),
        _ => return Err(refuse("the output path names no file".into())),
    };
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let parent = match std::fs::canonicalize(parent) {
        Ok(parent) => parent,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(refuse(format!(
                "its directory {} does not exist",
                parent.display()
            )))
        }
        Err(e) => return Err(e).at(parent),
    };
    if !parent.is_dir() {
        return Err(refuse(format!("{} is not a directory", parent.display())));
    }
    Ok(parent.join(name))
}

/// Refuses an output that is `input`: the same name (however spelt), or
/// a link (symbolic or hard) to the same file.
fn check_not_input(out: &Path, input: &Path) -> Result<()> {
    let overlap = |input: &Path| Error::OutputOverlapsInput {
        output: out.into(),
        input: input.into(),
    };
    let real = std::fs::canonicalize(input).at(input)?;
    if out == real || resolve(input).is_ok_and(|named| named == out) {
        return Err(overlap(&real));
    }
    let same = std::fs::metadata(out)
        .ok()
        .zip(std::fs::metadata(&real).ok())
        .is_some_and(|(a, b)| a.dev() == b.dev() && a.ino() == b.ino());
    if same {
        return Err(overlap(&real));
    }
    Ok(())
}

/// Whether `out` may be written: absent, or with `force` anything but a
/// directory (what is there is replaced, never written into).
fn check_replaceable(out: &Path, force: bool) -> Result<()> {
    let meta = match std::fs::symlink_metadata(out) {
        Ok(meta) => meta,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e).at(out),
    };
    let refuse = |message: &str| Error::Write {
        path: out.into(),
        message: message.into(),
    };
    if meta.is_dir() {
        return Err(refuse(
            "is a directory; refusing to replace a directory with a file",
        ));
    }
    if !force {
        return Err(Error::OutputOccupied {
            path: out.into(),
            occupant: if meta.file_type().is_symlink() {
                Occupant::Symlink
            } else {
                Occupant::File
            },
        });
    }
    Ok(())
}

/// The name prefix of `out`'s temporary files.
fn temporary_prefix(out: &Path) -> Vec<u8> {
    let name = out.file_name().unwrap_or_default().as_bytes();
    [b".", name, b".amalgam-", PURPOSE.as_bytes(), b"-"].concat()
}

/// Removes temporary files of `out` left by processes that no longer run
/// (killed outright): only regular files of this user's with one link;
/// anything else at such a name is left alone. Best effort: a failure here
/// does not stop the run.
fn remove_stale_temporaries(out: &Path) {
    let Some(parent) = out.parent() else { return };
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    let prefix = temporary_prefix(out);
    // SAFETY: geteuid has no preconditions.
    let uid = unsafe { libc::geteuid() };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.as_bytes().strip_prefix(prefix.as_slice()) else {
            continue;
        };
        let Some(pid) = std::str::from_utf8(rest)
            .ok()
            .and_then(|r| r.split('-').next())
            .and_then(|p| p.parse::<i32>().ok())
        else {
            continue;
        };
        if pid <= 0 || process_alive(pid) {
            continue;
        }
        let path = entry.path();
        let ours = std::fs::symlink_metadata(&path)
            .is_ok_and(|m| m.is_file() && m.uid() == uid && m.nlink() == 1);
        if ours && std::fs::remove_file(&path).is_ok() {
            tracing::warn!(
                "removed {}: an unfinished output left by process {pid}, which no longer runs",
                path.display()
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn a_new_file_appears_whole_and_nothing_else_is_left() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plot.png");
        let mut file = OutputFile::create(&out, false, &[]).unwrap();
        assert!(!out.exists(), "nothing at the output before the commit");
        file.write_all(b"contents").unwrap();
        let written = file.commit().unwrap();
        assert_eq!(written, std::fs::canonicalize(&out).unwrap());
        assert_eq!(std::fs::read(&out).unwrap(), b"contents");
        assert_eq!(names(tmp.path()), ["plot.png"]);
    }

    #[test]
    fn an_existing_file_is_replaced_only_with_force() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plot.png");
        std::fs::write(&out, "old").unwrap();
        let error = write_output_file(&out, false, &[], b"new").unwrap_err();
        assert!(
            matches!(
                error,
                Error::OutputOccupied {
                    occupant: Occupant::File,
                    ..
                }
            ),
            "{error}"
        );
        assert_eq!(std::fs::read(&out).unwrap(), b"old");
        assert_eq!(names(tmp.path()), ["plot.png"]);
        write_output_file(&out, true, &[], b"new").unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), b"new");
        assert_eq!(names(tmp.path()), ["plot.png"]);
    }

    #[test]
    fn a_symlink_is_never_written_through() {
        let tmp = tempfile::tempdir().unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, "precious").unwrap();
        let out = tmp.path().join("plot.png");
        std::os::unix::fs::symlink(&victim, &out).unwrap();
        let error = write_output_file(&out, false, &[], b"plot").unwrap_err();
        assert!(error.to_string().contains("symbolic link"), "{error}");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // With --force the link itself is replaced; its target is untouched.
        write_output_file(&out, true, &[], b"plot").unwrap();
        assert!(std::fs::symlink_metadata(&out).unwrap().is_file());
        assert_eq!(std::fs::read(&out).unwrap(), b"plot");
        assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
        // A dangling link counts as something there.
        let dangling = tmp.path().join("dangling.png");
        std::os::unix::fs::symlink(tmp.path().join("nowhere"), &dangling).unwrap();
        assert!(write_output_file(&dangling, false, &[], b"plot").is_err());
        assert!(!tmp.path().join("nowhere").exists());
        assert_eq!(names(tmp.path()), ["dangling.png", "plot.png", "victim"]);
    }

    #[test]
    fn a_directory_is_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("dir");
        std::fs::create_dir(&out).unwrap();
        for force in [false, true] {
            let error = write_output_file(&out, force, &[], b"x").unwrap_err();
            assert!(error.to_string().contains("is a directory"), "{error}");
        }
        assert!(out.is_dir());
        assert_eq!(names(tmp.path()), ["dir"]);
    }

    #[test]
    fn an_input_is_never_the_output() {
        let tmp = tempfile::tempdir().unwrap();
        let input = tmp.path().join("series.json");
        std::fs::write(&input, "[]").unwrap();
        let link = tmp.path().join("link.json");
        std::os::unix::fs::symlink(&input, &link).unwrap();
        let hard = tmp.path().join("hard.json");
        std::fs::hard_link(&input, &hard).unwrap();
        let spelt = tmp.path().join(".").join("series.json");
        for (out, given) in [
            (&input, &input),
            (&spelt, &input),
            (&link, &input),
            (&hard, &input),
            (&input, &link),
        ] {
            let error =
                write_output_file(out, true, std::slice::from_ref(given), b"x").unwrap_err();
            assert!(
                matches!(error, Error::OutputOverlapsInput { .. }),
                "{}: {error}",
                out.display()
            );
        }
        assert_eq!(std::fs::read(&input).unwrap(), b"[]");
        assert_eq!(names(tmp.path()), ["hard.json", "link.json", "series.json"]);
    }

    #[test]
    fn a_missing_directory_or_name_is_an_error() {
        let tmp = tempfile::tempdir().unwrap();
        let error =
            write_output_file(&tmp.path().join("no/plot.png"), false, &[], b"x").unwrap_err();
        assert!(error.to_string().contains("does not exist"), "{error}");
        for out in ["..", "/", "."] {
            assert!(write_output_file(Path::new(out), true, &[], b"x").is_err());
        }
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn a_dropped_output_leaves_nothing() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plot.png");
        let mut file = OutputFile::create(&out, false, &[]).unwrap();
        file.write_all(b"half").unwrap();
        assert_eq!(names(tmp.path()).len(), 1, "the temporary file");
        drop(file);
        assert!(names(tmp.path()).is_empty());
    }

    #[test]
    fn what_appears_during_the_run_is_not_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plot.png");
        let mut file = OutputFile::create(&out, false, &[]).unwrap();
        file.write_all(b"ours").unwrap();
        std::fs::write(&out, "theirs").unwrap();
        let error = file.commit().unwrap_err();
        assert!(error.to_string().contains("appeared"), "{error}");
        assert_eq!(std::fs::read(&out).unwrap(), b"theirs");
        assert_eq!(names(tmp.path()), ["plot.png"]);
    }

    #[test]
    fn a_killed_runs_temporary_file_is_removed_by_the_next_run() {
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("plot.png");
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let dead = child.id();
        child.wait().unwrap();
        let stale = tmp.path().join(format!(".plot.png.amalgam-file-{dead}-1"));
        std::fs::write(&stale, "half").unwrap();
        let live = tmp
            .path()
            .join(format!(".plot.png.amalgam-file-{}-1", std::process::id()));
        std::fs::write(&live, "being written").unwrap();
        // A planted link at a stale name is not ours: left alone.
        let planted = tmp.path().join(format!(".plot.png.amalgam-file-{dead}-2"));
        std::os::unix::fs::symlink(&live, &planted).unwrap();
        write_output_file(&out, false, &[], b"x").unwrap();
        assert!(!stale.exists());
        assert!(live.exists());
        assert!(std::fs::symlink_metadata(&planted).is_ok());
    }

    #[test]
    fn temporary_files_are_named_as_the_stale_check_expects() {
        let out = Path::new("/x/plot.png");
        let temp = sibling(out, PURPOSE);
        let name = temp.file_name().unwrap().as_bytes();
        let rest = name.strip_prefix(temporary_prefix(out).as_slice()).unwrap();
        let pid = std::str::from_utf8(rest)
            .unwrap()
            .split('-')
            .next()
            .unwrap();
        assert_eq!(pid, std::process::id().to_string());
    }
}
