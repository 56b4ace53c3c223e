//! What a run may use, checked before anything is allocated: memory (a run
//! whose estimate exceeds what is available, or the user's cap, is refused
//! with the estimate), threads (a sane multiple of the cores) and recipe
//! files (regular files of bounded size: never a FIFO or /dev/zero).

use amalgam_checkpoint::memory::MemoryLimit;
use amalgam_checkpoint::parse_byte_size;
use anyhow::{anyhow, Result};

/// The most bytes of a recipe read (real ones are a few KB).
const MAX_RECIPE_BYTES: u64 = 16 << 20;

/// A recipe's text: a regular UTF-8 file of at most 16 MB.
pub fn read_recipe(path: &std::path::Path) -> Result<String> {
    let bytes = amalgam_checkpoint::read_regular(path, MAX_RECIPE_BYTES, "a recipe")
        .map_err(|e| anyhow!("reading recipe: {e}"))?;
    String::from_utf8(bytes).map_err(|e| anyhow!("{}: not UTF-8 text: {e}", path.display()))
}

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available_memory() -> Option<u64> {
    amalgam_checkpoint::memory::available()
}

/// The limit a `cap` (a size such as `8GB`, from the flag named `flag`) sets,
/// or, without one, the available memory.
pub fn memory_limit(cap: Option<&str>, flag: &'static str) -> Result<Option<MemoryLimit>> {
    let cap = match cap {
        Some(text) => Some((parse_byte_size(text)?, text)),
        None => None,
    };
    Ok(MemoryLimit::new(cap, flag))
}

/// Refuses a run whose memory `estimate` exceeds `cap`, or, without one, the
/// available memory.
pub fn check_memory(
    estimate: u64,
    cap: Option<&str>,
    flag: &'static str,
    what: &str,
) -> Result<()> {
    match memory_limit(cap, flag)? {
        Some(limit) => limit.check(estimate, what).map_err(|e| anyhow!(e)),
        None => Ok(()),
    }
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
