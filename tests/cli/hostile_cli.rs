//! `pareto`, `tune` and `synth` on hostile input (issue 39): a plot never
//! written through a symlink or over a file without --force, never over an
//! input; errors instead of panics, aborts and hangs; a failed run leaves
//! nothing behind; empty work is an error.

use crate::common;

use std::ffi::OsStr;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// Runs amalgam; a run still going after `seconds` is killed and fails the test.
fn within<I, S>(seconds: u64, args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut child = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .arg("-q")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > Duration::from_secs(seconds) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("amalgam still ran after {seconds} s (a hang)");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

/// An error (exit 1, not a panic's 101 or a signal); its stderr.
fn error_of(out: &Output) -> String {
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        (out.status.code(), out.status.signal()),
        (Some(1), None),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

const SERIES: &str = r#"[
  {"model": "work/a", "parameters": 10, "domains": [{"domain": "german", "loss": 2.0}]},
  {"model": "work/b", "parameters": 20, "domains": [{"domain": "german", "loss": 1.5}]}
]"#;

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

fn pareto(series: &Path, png: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![
        "pareto".as_ref(),
        "--series".as_ref(),
        "--png".as_ref(),
        png.as_os_str(),
    ];
    let spec = format!("S={}", series.display());
    args.insert(2, spec.as_ref());
    args.extend(extra.iter().map(OsStr::new));
    within(60, &args)
}

fn is_png(path: &Path) -> bool {
    std::fs::read(path).unwrap().starts_with(b"\x89PNG")
}

#[test]
fn pareto_never_writes_a_plot_through_a_symlink() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write(tmp.path(), "s.json", SERIES);
    let victim = write(tmp.path(), "victim", "precious");
    let png = tmp.path().join("plot.png");
    std::os::unix::fs::symlink(&victim, &png).unwrap();
    let message = error_of(&pareto(&series, &png, &[]));
    assert!(
        message.contains("plot.png")
            && message.contains("symbolic link")
            && message.trim_end().ends_with("(pass --force to replace it)"),
        "{message}"
    );
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    // With --force the link is replaced by the plot; its target is untouched.
    let out = pareto(&series, &png, &["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(std::fs::symlink_metadata(&png).unwrap().is_file());
    assert!(is_png(&png));
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert_eq!(listing(tmp.path()), ["plot.png", "s.json", "victim"]);
}

#[test]
fn pareto_replaces_an_existing_plot_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write(tmp.path(), "s.json", SERIES);
    let png = write(tmp.path(), "plot.png", "an older plot");
    let message = error_of(&pareto(&series, &png, &[]));
    assert!(message.contains("exists (pass --force"), "{message}");
    assert_eq!(std::fs::read(&png).unwrap(), b"an older plot");
    let out = pareto(&series, &png, &["--force"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(is_png(&png));
    assert_eq!(
        listing(tmp.path()),
        ["plot.png", "s.json"],
        "no temporary file left"
    );
    // A new plot, and a plot into a missing directory (an error).
    let new = tmp.path().join("new.png");
    assert!(pareto(&series, &new, &[]).status.success());
    assert!(is_png(&new));
    let message = error_of(&pareto(&series, &tmp.path().join("no/plot.png"), &[]));
    assert!(message.contains("does not exist"), "{message}");
}

#[test]
fn pareto_never_plots_over_its_input() {
    let tmp = tempfile::tempdir().unwrap();
    let series = write(tmp.path(), "s.json", SERIES);
    let message = error_of(&pareto(&series, &series, &["--force"]));
    assert!(
        message.contains("refusing to write over input"),
        "{message}"
    );
    assert_eq!(std::fs::read_to_string(&series).unwrap(), SERIES);
    assert_eq!(listing(tmp.path()), ["s.json"]);
}

#[test]
fn pareto_on_empty_or_broken_series_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    for (text, expected) in [
        ("[]", "no models"),
        ("  [ ]\n", "no models"),
        ("  \n ", "not the JSON"),
        (
            r#"[{"model": "m", "parameters": 1, "domains": []}]"#,
            "m: no scores",
        ),
    ] {
        let series = write(tmp.path(), "bad.json", text);
        let spec = format!("S={}", series.display());
        let out = within(60, ["pareto", "--series", spec.as_str()]);
        let message = error_of(&out);
        assert!(
            message.contains("bad.json") && message.contains(expected),
            "{text:?}: {message}"
        );
    }
}

#[test]
fn pareto_refuses_models_scored_on_different_domains() {
    let tmp = tempfile::tempdir().unwrap();
    let one = write(tmp.path(), "one.json", SERIES);
    let other = write(
        tmp.path(),
        "other.json",
        r#"[{"model": "work/c", "parameters": 30, "domains": [{"domain": "c", "loss": 1.0}]}]"#,
    );
    let (a, b) = (
        format!("A={}", one.display()),
        format!("B={}", other.display()),
    );
    let out = within(
        60,
        ["pareto", "--series", a.as_str(), "--series", b.as_str()],
    );
    let message = error_of(&out);
    assert!(
        message.contains("other.json") && message.contains("same domains"),
        "{message}"
    );
}

#[test]
fn pareto_on_losses_too_large_to_plot_is_an_error_not_a_hang() {
    let tmp = tempfile::tempdir().unwrap();
    let png = tmp.path().join("plot.png");
    for (name, text, expected) in [
        (
            "mean.json",
            r#"[{"model": "m", "parameters": 1, "domains": [
                {"domain": "d", "loss": 1.7e308}, {"domain": "e", "loss": 1.7e308}]}]"#,
            "not a finite number",
        ),
        (
            "plot.json",
            r#"[{"model": "m", "parameters": 1, "domains": [{"domain": "d", "loss": 1.7e308}]},
                {"model": "n", "parameters": 2, "domains": [{"domain": "d", "loss": 1.0}]}]"#,
            "too large to plot",
        ),
    ] {
        let series = write(tmp.path(), name, text);
        let message = error_of(&pareto(&series, &png, &[]));
        assert!(message.contains(expected), "{name}: {message}");
        assert!(!png.exists());
    }
    assert_eq!(listing(tmp.path()), ["mean.json", "plot.json"]);
}

#[test]
fn pareto_refuses_a_fifo_instead_of_hanging() {
    let tmp = tempfile::tempdir().unwrap();
    let fifo = tmp.path().join("series.json");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let spec = format!("S={}", fifo.display());
    let out = within(30, ["pareto", "--series", spec.as_str()]);
    let message = error_of(&out);
    assert!(message.contains("is a FIFO"), "{message}");
}

/// A tiny synthetic family and a linear recipe over it whose weight is tuned
/// (`marker` is the weight's value).
fn tune_setup(tmp: &Path, marker: &str) -> PathBuf {
    synth(&tmp.join("m"), &["--finetunes", "2"]);
    write(
        tmp,
        "tune.yml",
        &format!(
            "merge_method: linear\nmodels:\n  - model: {0}/m/finetune-1\n    parameters: \
             {{weight: {marker}}}\n  - model: {0}/m/finetune-2\n    parameters: {{weight: 1.0}}\n",
            tmp.display()
        ),
    )
}

fn tune(recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    let mut args: Vec<&OsStr> = vec![
        "tune".as_ref(),
        recipe.as_os_str(),
        out.as_os_str(),
        "--domains".as_ref(),
        "german".as_ref(),
        "--trials".as_ref(),
        "2".as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    within(120, &args)
}

#[test]
fn tune_refuses_a_window_longer_than_the_validation_text() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tune_setup(tmp.path(), "{tune: [0, 1]}");
    let out = tmp.path().join("tuned");
    let message = error_of(&tune(&recipe, &out, &["--seq-len", "50000"]));
    assert!(
        message.contains("a window of 50000 tokens is longer than the german held-out text (pass a smaller --seq-len)"),
        "{message}"
    );
    assert!(!out.exists(), "no best.yml from scoring nothing");
    // The same check as eval's.
    let message = error_of(&within(
        60,
        [
            "eval".as_ref(),
            tmp.path().join("m/base").as_os_str(),
            "--domains".as_ref(),
            "german".as_ref(),
            "--seq-len".as_ref(),
            "50000".as_ref(),
        ],
    ));
    assert!(
        message.contains("a window of 50000 tokens is longer than the german held-out text (pass a smaller --seq-len)"),
        "{message}"
    );
}

#[test]
fn tune_with_a_range_too_wide_is_an_error_naming_the_marker() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tune_setup(tmp.path(), "{tune: [-1e308, 1e308]}");
    let out = tmp.path().join("tuned");
    let message = error_of(&tune(&recipe, &out, &[]));
    assert!(
        message.contains("tune.yml:4:") && message.contains("too wide"),
        "{message}"
    );
    assert!(!out.exists());
}

#[test]
fn tune_tries_a_default_at_the_high_end_of_its_range() {
    let tmp = tempfile::tempdir().unwrap();
    let recipe = tune_setup(tmp.path(), "{tune: [0, 1], default: 1}");
    let out = tmp.path().join("tuned");
    let run = tune(&recipe, &out, &["--seq-len", "33", "--max-windows", "2"]);
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let table = std::fs::read_to_string(out.join("trials.md")).unwrap();
    assert_eq!(table.lines().count(), 2 + 2, "{table}");
    assert!(table.lines().nth(2).unwrap().starts_with("| 0"), "{table}");
    assert!(out.join("best.yml").is_file());
}

/// A multi-stage recipe is tuned through the stage placement `merge`
/// uses: markers in any stage, earlier stages written to a scratch directory
/// (removed afterwards), the same trials from the same seed, and a best
/// recipe `amalgam merge` runs as it is.
#[test]
fn tune_searches_a_multi_stage_recipe() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("m"), &["--finetunes", "2"]);
    let m = tmp.path().join("m").display().to_string();
    let recipe = write(
        tmp.path(),
        "stages.yml",
        &format!(
            "name: soup\nmerge_method: linear\nmodels:\n  - model: {m}/finetune-1\n    \
             parameters: {{weight: {{tune: [0, 1]}}}}\n  - model: {m}/finetune-2\n    \
             parameters: {{weight: 1.0}}\n---\nmerge_method: linear\nmodels:\n  - model: soup\n    \
             parameters: {{weight: {{tune: [0.5, 1]}}}}\n  - model: {m}/base\n    \
             parameters: {{weight: 1.0}}\n"
        ),
    );
    let trials = |out: &Path| {
        let run = tune(&recipe, out, &["--seq-len", "33", "--max-windows", "2"]);
        assert!(
            run.status.success(),
            "{}",
            String::from_utf8_lossy(&run.stderr)
        );
        std::fs::read_to_string(out.join("trials.md")).unwrap()
    };
    let out = tmp.path().join("tuned");
    let table = trials(&out);
    assert_eq!(table.lines().count(), 2 + 2, "{table}");
    assert!(table.lines().next().unwrap().contains("soup"), "{table}");
    assert_eq!(
        trials(&tmp.path().join("again")),
        table,
        "same seed, same trials"
    );
    assert_eq!(
        listing(tmp.path()),
        ["again", "m", "stages.yml", "tuned"],
        "no scratch directory left"
    );
    let best = out.join("best.yml");
    assert!(std::fs::read_to_string(&best).unwrap().contains("---"));
    let merged = tmp.path().join("merged");
    let run = within(
        120,
        ["merge".as_ref(), best.as_os_str(), merged.as_os_str()],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(merged.join("config.json").is_file());
}

fn synth_fails(out: &Path, args: &[&str]) -> String {
    let mut all: Vec<&OsStr> = vec!["synth".as_ref(), out.as_os_str()];
    all.extend(args.iter().map(OsStr::new));
    error_of(&within(60, &all))
}

#[test]
fn synth_sizes_beyond_the_limits_are_errors_stating_them() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("family");
    for (args, expected) in [
        (&["--finetunes", "18446744073709551615"][..], "at most 1024"),
        (&["--finetunes", "1000000000000"], "at most 1024"),
        (&["--layers", "1000000000000"], "1 to 4096 layers"),
        (&["--layers", "18446744073709551615"], "1 to 4096 layers"),
        (&["--intermediate", "1000000000000"], "1 to 1048576"),
        (&["--hidden", "1099511627776"], "at most 1048576"),
        // Within the limits, but far more than any machine's memory.
        (
            &["--hidden", "1048576", "--intermediate", "1048576"],
            "needs about",
        ),
        (
            &["--shape", "tinyllama", "--max-memory", "100MB"],
            "--max-memory 100MB",
        ),
    ] {
        let message = synth_fails(&out, args);
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(listing(tmp.path()).is_empty(), "{args:?}: nothing created");
    }
}

#[test]
fn a_failed_synth_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("family");
    for (args, expected) in [
        (&["--layers", "0"][..], "--layers 0"),
        (&["--intermediate", "0"], "--intermediate 0"),
    ] {
        let message = synth_fails(&out, args);
        assert!(message.contains(expected), "{args:?}: {message}");
        assert!(
            listing(tmp.path()).is_empty(),
            "{args:?}: {:?}",
            listing(tmp.path())
        );
    }
    // A dtype that is none is refused as the command line is read (exit 2).
    let result = within(
        60,
        [
            "synth".as_ref(),
            out.as_os_str(),
            "--dtype".as_ref(),
            "int8".as_ref(),
        ],
    );
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("'--dtype <DTYPE>': unknown dtype `int8`"),
        "{stderr}"
    );
    assert!(listing(tmp.path()).is_empty());
}

#[test]
fn a_synth_that_runs_out_of_space_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("family");
    let mut command = Command::new(env!("CARGO_BIN_EXE_amalgam"));
    command.args(["synth".as_ref(), out.as_os_str(), "-q".as_ref()]);
    // SAFETY: setrlimit is async-signal-safe; it runs in the child before exec.
    unsafe {
        command.pre_exec(|| {
            let limit = libc::rlimit {
                rlim_cur: 64 << 10,
                rlim_max: 64 << 10,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let message = error_of(&command.output().unwrap());
    assert!(message.contains("File too large"), "{message}");
    assert!(listing(tmp.path()).is_empty(), "{:?}", listing(tmp.path()));
}

#[test]
fn synth_writes_the_family_whole_and_replaces_it_only_with_force() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("family");
    synth(&out, &["--finetunes", "1"]);
    assert_eq!(listing(&out), ["base", "finetune-1"]);
    assert_eq!(
        listing(tmp.path()),
        ["family"],
        "no staging, lock or parts left"
    );
    let message = synth_fails(&out, &["--finetunes", "1"]);
    assert!(
        message.contains("exists and is not empty (pass --force to replace it)"),
        "{message}"
    );
    synth(&out, &["--finetunes", "0", "--force"]);
    assert_eq!(listing(&out), ["base"]);
    assert_eq!(listing(tmp.path()), ["family"]);
}
