//! What a run may use, checked before anything is allocated: the address
//! space, memory (the caps are [`crate::options::MaxMemory`]), threads (a
//! sane multiple of the cores) and recipe files (regular files of bounded
//! size: never a FIFO or /dev/zero).

use amalgam_recipe::MAX_RECIPE_BYTES;
use anyhow::{anyhow, Result};

/// A recipe's text: a regular UTF-8 file of at most 16 MB.
pub fn read_recipe(path: &std::path::Path) -> Result<String> {
    let bytes = amalgam_checkpoint::read_regular(path, MAX_RECIPE_BYTES, "a recipe")
        .map_err(|e| anyhow!("reading recipe: {e}"))?;
    String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text: {e}", path.display()))
}

/// The least address space (`ulimit -v`) amalgam starts in. libtorch alone
/// reserves about 450 MB when it loads (below ~440 MB its own start-up
/// aborts with `std::bad_alloc` before any of amalgam's code runs, which
/// nothing in the process can catch); just above, thread stacks and the
/// first tensors fail in ways that abort. Under this floor amalgam stops at
/// once with an error instead.
const MIN_ADDRESS_SPACE: u64 = 1 << 30;

/// Refuses to start under an address-space limit too small to run in.
pub fn check_address_space() -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_AS, &mut limit) } != 0
        || limit.rlim_cur == libc::RLIM_INFINITY
    {
        return Ok(());
    }
    let cur: u64 = limit.rlim_cur;
    if cur < MIN_ADDRESS_SPACE {
        return Err(anyhow!(
            "the address space is limited to {} MB (ulimit -v); amalgam needs at least {} MB \
             (libtorch alone maps about 450 MB): raise the limit",
            cur >> 20,
            MIN_ADDRESS_SPACE >> 20
        ));
    }
    Ok(())
}

/// Worker threads: as asked (default: the cores), at most four per core —
/// thousands of threads only thrash (and can exhaust the process's limits).
pub fn threads(requested: Option<usize>) -> usize {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let cap = 4 * cores;
    match requested {
        None => cores,
        Some(0) => 1,
        Some(n) if n > cap => {
            tracing::warn!("--threads {n} capped at {cap} (four per core on this machine)");
            cap
        }
        Some(n) => n,
    }
}
