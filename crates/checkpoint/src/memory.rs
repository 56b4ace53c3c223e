//! Memory a run may use: the machine's available memory, and a limit (a
//! user's cap or what is available) that refuses a run before it allocates.

/// `MemAvailable` from /proc/meminfo, in bytes.
pub fn available() -> Option<u64> {
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

/// A limit on a run's estimated memory, and where it comes from.
#[derive(Debug, Clone)]
pub struct MemoryLimit {
    pub bytes: u64,
    /// For messages: `--memory-budget 4GB`, or `the memory available`.
    pub source: String,
    /// The flag that sets a cap.
    pub flag: &'static str,
}

impl MemoryLimit {
    /// The cap given with `flag` (its text as given), else the available
    /// memory (`None` where that cannot be read).
    pub fn new(cap: Option<(u64, &str)>, flag: &'static str) -> Option<Self> {
        match cap {
            Some((bytes, text)) => Some(Self {
                bytes,
                source: format!("{flag} {text}"),
                flag,
            }),
            None => available().map(|bytes| Self {
                bytes,
                source: "the memory available".into(),
                flag,
            }),
        }
    }

    /// Refuses an `estimate` over the limit, saying what (`what`) needs it.
    pub fn check(&self, estimate: u64, what: &str) -> Result<(), String> {
        if estimate <= self.bytes {
            return Ok(());
        }
        Err(format!(
            "{what} needs about {} (estimated before allocating anything), more than {} ({}); \
             use smaller sizes, or set {} if the estimate is too cautious",
            gigabytes(estimate),
            self.source,
            gigabytes(self.bytes),
            self.flag
        ))
    }
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}
