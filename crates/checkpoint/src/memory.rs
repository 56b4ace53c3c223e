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
    pub fn check(&self, estimate: &MemoryEstimate, what: &str) -> Result<(), String> {
        if estimate.peak() <= self.bytes {
            return Ok(());
        }
        Err(format!(
            "{what} needs about {} (estimated before allocating anything: {estimate}), more \
             than {} ({}); use smaller sizes, or set {} if the estimate is too cautious",
            gigabytes(estimate.peak()),
            self.source,
            gigabytes(self.bytes),
            self.flag
        ))
    }
}

fn gigabytes(bytes: u64) -> String {
    format!("{:.1} GB", bytes as f64 / 1e9)
}

/// What a process running amalgam holds besides the tensors it works on
/// (libtorch, the binary, buffers), measured on the small zoo; part of every
/// estimate.
pub const PROCESS_BYTES: u64 = 250_000_000;

/// A run's peak memory, estimated before anything is allocated: what it
/// holds throughout (the process first) plus the largest of the phases it
/// runs one after another. Every command estimates and prints its memory
/// through this one type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryEstimate {
    held: Vec<(String, u64)>,
    phases: Vec<(String, u64)>,
}

impl Default for MemoryEstimate {
    fn default() -> Self {
        Self {
            held: vec![("the process".into(), PROCESS_BYTES)],
            phases: vec![],
        }
    }
}

impl MemoryEstimate {
    /// The process alone.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `bytes` held through every phase (left out when zero).
    pub fn held(mut self, what: impl Into<String>, bytes: u64) -> Self {
        if bytes > 0 {
            self.held.push((what.into(), bytes));
        }
        self
    }

    /// Adds a phase that needs `bytes` at its widest (left out when zero).
    pub fn phase(mut self, what: impl Into<String>, bytes: u64) -> Self {
        if bytes > 0 {
            self.phases.push((what.into(), bytes));
        }
        self
    }

    /// What is held throughout plus the largest phase (saturating: an
    /// estimate past u64 is u64::MAX).
    pub fn peak(&self) -> u64 {
        let held = self
            .held
            .iter()
            .fold(0u64, |sum, (_, b)| sum.saturating_add(*b));
        held.saturating_add(self.phases.iter().map(|(_, b)| *b).max().unwrap_or(0))
    }

    /// `{"peak": …, "held": {what: bytes}, "phases": {what: bytes}}`.
    pub fn to_json(&self) -> serde_json::Value {
        let map = |items: &[(String, u64)]| {
            items
                .iter()
                .map(|(what, bytes)| (what.clone(), serde_json::Value::from(*bytes)))
                .collect::<serde_json::Map<_, _>>()
        };
        serde_json::json!({
            "peak": self.peak(),
            "held": map(&self.held),
            "phases": map(&self.phases),
        })
    }
}

/// `peak memory ≈ 5.11 GB (the largest of: residual pass 0.62, widest layer
/// 3.12; plus the process 0.25, one batch's forward pass 0.77)`.
impl std::fmt::Display for MemoryEstimate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let gb = |bytes: u64| bytes as f64 / 1e9;
        let list = |items: &[(String, u64)]| {
            items
                .iter()
                .map(|(what, bytes)| format!("{what} {:.2}", gb(*bytes)))
                .collect::<Vec<_>>()
                .join(", ")
        };
        write!(f, "peak memory ≈ {:.2} GB (", gb(self.peak()))?;
        match self.phases.len() {
            0 => {}
            1 => write!(f, "{}; plus ", list(&self.phases))?,
            _ => write!(f, "the largest of: {}; plus ", list(&self.phases))?,
        }
        write!(f, "{})", list(&self.held))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_is_what_is_held_plus_the_largest_phase() {
        let estimate = MemoryEstimate::new()
            .held("one batch", 50_000_000)
            .phase("first pass", 1_000_000_000)
            .phase("second pass", 3_000_000_000)
            .phase("nothing", 0);
        assert_eq!(estimate.peak(), PROCESS_BYTES + 50_000_000 + 3_000_000_000);
        assert_eq!(
            estimate.to_string(),
            "peak memory ≈ 3.30 GB (the largest of: first pass 1.00, second pass 3.00; \
             plus the process 0.25, one batch 0.05)"
        );
        assert_eq!(
            estimate.to_json()["phases"]["second pass"],
            3_000_000_000u64
        );
        assert_eq!(
            MemoryEstimate::new().to_string(),
            "peak memory ≈ 0.25 GB (the process 0.25)"
        );
        let huge = MemoryEstimate::new()
            .held("a", u64::MAX)
            .phase("b", u64::MAX);
        assert_eq!(huge.peak(), u64::MAX);
    }
}
