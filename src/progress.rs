//! Progress bars (drawn only when stderr is a terminal).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar counting bytes, with throughput and ETA.
pub fn bytes(total: u64, message: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template(
            "{msg} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// A bar counting steps or items, with a message (for training and evaluation).
pub fn steps(total: u64, message: &str, quiet: bool) -> ProgressBar {
    if quiet {
        return ProgressBar::hidden();
    }
    let bar = ProgressBar::new(total);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:30}] {pos}/{len} {per_sec} ETA {eta}")
            .expect("a valid template")
            .progress_chars("=> "),
    );
    bar.set_message(message.to_owned());
    bar
}

/// A step bar for a library's long run ([`amalgam_merge::Progress`]),
/// created when the run says how many steps it has.
pub struct Steps {
    bar: std::sync::Mutex<Option<ProgressBar>>,
    quiet: bool,
}

impl Steps {
    pub fn new(quiet: bool) -> Self {
        Self {
            bar: std::sync::Mutex::new(None),
            quiet,
        }
    }
}

impl amalgam_merge::Progress for Steps {
    fn start(&self, total: u64, label: &str) {
        *self.bar.lock().expect("progress lock") = Some(steps(total, label, self.quiet));
    }

    fn advance(&self, n: u64) {
        if let Some(bar) = &*self.bar.lock().expect("progress lock") {
            bar.inc(n);
        }
    }

    fn finish(&self) {
        if let Some(bar) = self.bar.lock().expect("progress lock").take() {
            bar.finish_and_clear();
        }
    }
}
