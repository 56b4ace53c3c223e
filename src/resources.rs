//! What a run may use, checked before anything is allocated: memory (a run
//! whose estimate exceeds what is available, or the user's cap, is refused
//! with the estimate), threads (a sane multiple of the cores) and recipe
//! files (regular files of bounded size: never a FIFO or /dev/zero).

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
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = text
        .lines()
        .find_map(|line| line.strip_prefix("MemAvailable:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse::<u64>()
        .ok()?;
    Some(kib * 1024)
}

/// Refuses a run whose memory `estimate` exceeds `cap` (a size such as
/// `8GB`, from the flag named `flag`), or, without one, the available memory.
pub fn check_memory(estimate: u64, cap: Option<&str>, flag: &str, what: &str) -> Result<()> {
    let (limit, source) = match cap {
        Some(text) => (parse_byte_size(text)?, format!("{flag} {text}")),
        None => match available_memory() {
            Some(bytes) => (bytes, "the memory available".to_owned()),
            None => return Ok(()),
        },
    };
    if estimate > limit {
        return Err(anyhow!(
            "{what} needs about {} (estimated before allocating anything), more than {source} \
             ({}); use smaller sizes, or set {flag} if the estimate is too cautious",
            gigabytes(estimate),
            gigabytes(limit)
        ));
    }
    Ok(())
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
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
