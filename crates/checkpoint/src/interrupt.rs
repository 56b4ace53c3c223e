//! What an interrupted run leaves behind: nothing. Outputs being written
//! register their staging directory, lock file and created parents here;
//! [`install`] (called first thing by a program) routes SIGINT, SIGTERM and
//! SIGHUP to a thread that removes them, says so, and then lets the signal
//! end the process as it would have. SIGXFSZ is ignored so that a write past
//! the file-size limit is an error naming the file (EFBIG), not a silent kill.

use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

/// How a registered path is removed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Removal {
    /// A directory and everything in it (a staging directory).
    Tree,
    /// A directory, only if empty (a parent the run created).
    EmptyDir,
    File,
}

/// Paths to remove if the process is interrupted, in registration order.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    entries: Vec<(u64, PathBuf, Removal)>,
    next: u64,
}

impl Registry {
    /// Stops tracking an entry (its owner committed or cleaned it up).
    pub fn forget(&mut self, id: u64) {
        self.entries.retain(|(i, _, _)| *i != id);
    }

    /// Removes every entry, newest first; returns the trees removed.
    fn remove_all(&mut self) -> Vec<PathBuf> {
        let mut removed = vec![];
        for (_, path, removal) in self.entries.drain(..).rev() {
            let done = match removal {
                Removal::Tree => std::fs::remove_dir_all(&path).is_ok(),
                Removal::EmptyDir => std::fs::remove_dir(&path).is_ok(),
                Removal::File => std::fs::remove_file(&path).is_ok(),
            };
            if done && removal == Removal::Tree {
                removed.push(path);
            }
        }
        removed
    }
}

static REGISTRY: Mutex<Registry> = Mutex::new(Registry {
    entries: vec![],
    next: 0,
});

/// The registry, locked: while it is held no interrupt cleanup runs (an
/// output being renamed into place is never half-removed).
pub(crate) fn registry() -> MutexGuard<'static, Registry> {
    REGISTRY
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Creates what `create` makes at `path` and registers it for removal on
/// an interrupt, with the registry held throughout: no interrupt cleanup
/// runs between the two (one that did would leave it behind, unsaid).
pub(crate) fn create_registered<T, E>(
    path: &Path,
    removal: Removal,
    create: impl FnOnce() -> Result<T, E>,
) -> Result<(T, u64), E> {
    let mut registry = registry();
    let made = create()?;
    registry.next += 1;
    let id = registry.next;
    registry.entries.push((id, path.to_path_buf(), removal));
    Ok((made, id))
}

/// Installs the interrupt cleanup. Call it before any other thread starts
/// (the signals are blocked in the calling thread, and so in every thread it
/// starts later, and waited for by one thread of their own).
pub fn install() {
    // SAFETY: plain libc signal-mask and disposition calls on a local set.
    unsafe {
        libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for signal in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
            libc::sigaddset(&mut set, signal);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        std::thread::Builder::new()
            .name("interrupt".into())
            .spawn(move || wait_and_clean_up(set))
            .expect("the interrupt thread starts");
    }
}

fn wait_and_clean_up(set: libc::sigset_t) {
    let mut signal = 0;
    // SAFETY: `set` is an initialised signal set; `signal` a valid out-pointer.
    if unsafe { libc::sigwait(&set, &mut signal) } != 0 {
        return;
    }
    // Held until the process ends: no output is committed after this.
    let mut registry = registry();
    let name = match signal {
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "SIGHUP",
    };
    for path in registry.remove_all() {
        eprintln!(
            "amalgam: interrupted ({name}): removed the unfinished output {}",
            path.display()
        );
    }
    // End the process by the signal itself, as an unhandled one would.
    // SAFETY: restoring the default action and unblocking it in this thread.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        let mut one: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut one);
        libc::sigaddset(&mut one, signal);
        libc::pthread_sigmask(libc::SIG_UNBLOCK, &one, std::ptr::null_mut());
        libc::raise(signal);
    }
    std::process::exit(128 + signal);
}
