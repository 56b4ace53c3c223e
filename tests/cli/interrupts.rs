//! Runs that end badly end cleanly: SIGINT/SIGTERM remove the unfinished
//! output and say so; the leftovers of a `kill -9` are removed by the next
//! run into the same output; of two runs into one output exactly one
//! succeeds; a file-size limit is an error, not a silent kill.

use crate::common;

use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;

/// `amalgam synth OUT --shape tinyllama` (seconds of work), started.
fn start_long_synth(out: &Path) -> Child {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["synth".as_ref(), out.as_os_str()])
        .args([
            "--shape",
            "tinyllama",
            "--finetunes",
            "0",
            "--dtype",
            "bfloat16",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

/// Waits until `dir` holds a staging directory (the run is writing).
fn wait_for_staging(dir: &Path) {
    let started = Instant::now();
    loop {
        let staging = std::fs::read_dir(dir).ok().is_some_and(|entries| {
            entries
                .filter_map(|e| e.ok())
                .any(|e| e.file_name().to_string_lossy().contains(".amalgam-tmp-"))
        });
        if staging {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no staging directory appeared in {}",
            dir.display()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn stderr_of(child: Child) -> (std::process::ExitStatus, String) {
    let out = child.wait_with_output().unwrap();
    (
        out.status,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn sigint_and_sigterm_remove_the_unfinished_output() {
    for (signal, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("family");
        let child = start_long_synth(&root);
        // The family is staged beside its directory, the models inside that.
        wait_for_staging(tmp.path());
        // SAFETY: signalling our own child.
        assert_eq!(unsafe { libc::kill(child.id() as i32, signal) }, 0);
        let (status, stderr) = stderr_of(child);
        assert_eq!(status.signal(), Some(signal), "{stderr}");
        assert!(
            stderr.contains(&format!(
                "interrupted ({name}): removed the unfinished output"
            )) && stderr.contains(".family.amalgam-tmp-"),
            "{stderr}"
        );
        assert!(
            listing(tmp.path()).is_empty(),
            "{name}: nothing left, not even the directory the run created: {:?}",
            listing(tmp.path())
        );
    }
}

#[test]
fn the_next_run_removes_what_a_killed_run_left() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("family");
    let child = start_long_synth(&root);
    wait_for_staging(tmp.path());
    let pid = child.id();
    // SAFETY: signalling our own child.
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
    let (status, _) = stderr_of(child);
    assert_eq!(status.signal(), Some(libc::SIGKILL));
    let left = listing(tmp.path());
    assert!(
        left.iter().any(|n| n.starts_with(".family.amalgam-tmp-")),
        "kill -9 leaves its staging: {left:?}"
    );

    let rerun = Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["synth".as_ref(), root.as_os_str()])
        .args(["--finetunes", "0"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&rerun.stderr);
    assert!(rerun.status.success(), "{stderr}");
    assert!(
        stderr.contains("an unfinished output left by process")
            && stderr.contains(&pid.to_string()),
        "the rerun says what it removed: {stderr}"
    );
    assert_eq!(listing(&root), ["base"]);
    assert_eq!(listing(tmp.path()), ["family"]);
}

#[test]
fn of_two_merges_into_one_output_exactly_one_succeeds() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("m"), &["--finetunes", "2"]);
    let recipe = tmp.path().join("ties.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: ties\nbase_model: {0}/m/base\nmodels:\n  - model: {0}/m/finetune-1\n    \
             parameters: {{weight: 1.0, density: 0.5}}\n  - model: {0}/m/finetune-2\n    \
             parameters: {{weight: 1.0, density: 0.5}}\n",
            tmp.path().display()
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    for _ in 0..3 {
        let runs: Vec<Child> = (0..2)
            .map(|_| {
                Command::new(env!("CARGO_BIN_EXE_amalgam"))
                    .args(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()])
                    .arg("-q")
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        let results: Vec<_> = runs.into_iter().map(stderr_of).collect();
        let succeeded = results.iter().filter(|(s, _)| s.success()).count();
        assert_eq!(succeeded, 1, "{results:?}");
        let (_, message) = results.iter().find(|(s, _)| !s.success()).unwrap();
        assert!(
            message.contains("another amalgam process")
                || message.contains("appeared or changed")
                || message.contains("not empty"),
            "{message}"
        );
        inspect_json(&out, false);
        std::fs::remove_dir_all(&out).unwrap();
        assert_eq!(listing(tmp.path()), ["m", "ties.yml"]);
    }
}

#[test]
fn a_file_size_limit_is_an_error_naming_the_file() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("m"), &["--finetunes", "0"]);
    let out = tmp.path().join("out");
    let mut command = Command::new(env!("CARGO_BIN_EXE_amalgam"));
    command.args([
        "convert".as_ref(),
        tmp.path().join("m/base").as_os_str(),
        out.as_os_str(),
    ]);
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
    let result = command.output().unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(
        result.status.code(),
        Some(1),
        "an error, not SIGXFSZ: {stderr}"
    );
    assert!(
        stderr.contains("model.safetensors") && stderr.contains("File too large"),
        "{stderr}"
    );
    assert_eq!(listing(tmp.path()), ["m"]);
}
