//! The output protocol: nothing unchecked is replaced, concurrent runs into
//! one output cannot both succeed, failed runs leave nothing (not even the
//! parent directories they created), and leftovers of killed runs are
//! cleaned up by the next run into the same output.

mod common;

use std::path::Path;

use amalgam_checkpoint::{CheckpointWriter, Dtype, TensorSpec, WriteOptions};
use common::{finish, listing};

fn specs() -> Vec<TensorSpec> {
    vec![TensorSpec::new("w", Dtype::F32, vec![2])]
}

fn writer(out: &Path, options: &WriteOptions) -> amalgam_checkpoint::Result<CheckpointWriter> {
    let writer = CheckpointWriter::create(out, specs(), options)?;
    writer.write_bytes("w", &[0u8; 8])?;
    Ok(writer)
}

#[test]
fn a_directory_created_at_the_output_during_the_run_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let running = writer(&out, &WriteOptions::default()).unwrap();
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("someone-elses.txt"), "precious").unwrap();
    let err = finish(running).unwrap_err().to_string();
    assert!(
        err.contains("appeared or changed while amalgam was writing it"),
        "{err}"
    );
    assert_eq!(listing(&out), ["someone-elses.txt"]);
    assert_eq!(listing(tmp.path()), ["out"], "no staging or lock left");
}

#[test]
fn an_empty_output_that_fills_during_the_run_is_not_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    let running = writer(&out, &WriteOptions::default()).unwrap();
    std::fs::write(out.join("new.txt"), "precious").unwrap();
    assert!(finish(running).is_err());
    assert_eq!(listing(&out), ["new.txt"]);
    // Still empty at the end: replaced as checked.
    std::fs::remove_file(out.join("new.txt")).unwrap();
    finish(writer(&out, &WriteOptions::default()).unwrap()).unwrap();
    assert!(out.join("model.safetensors").is_file());
}

#[test]
fn two_runs_into_one_output_cannot_both_write() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let first = writer(&out, &WriteOptions::default()).unwrap();
    let err = writer(&out, &WriteOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("another amalgam process")
            && err.contains(&format!("pid {}", std::process::id())),
        "{err}"
    );
    finish(first).unwrap();
    // The lock went with the run; --force may now replace the output.
    let force = WriteOptions {
        force: true,
        ..Default::default()
    };
    finish(writer(&out, &force).unwrap()).unwrap();
    assert_eq!(listing(tmp.path()), ["out"]);
}

#[test]
fn a_refused_or_failed_run_leaves_no_directory_it_created() {
    let tmp = tempfile::tempdir().unwrap();
    let input = tmp.path().join("input");
    std::fs::create_dir(&input).unwrap();
    let inside = input.join("new/deeper/out");
    let options = WriteOptions {
        inputs: vec![input.clone()],
        ..Default::default()
    };
    let err = writer(&inside, &options).err().unwrap().to_string();
    assert!(
        err.contains("refusing to write over input checkpoint"),
        "{err}"
    );
    assert!(
        listing(&input).is_empty(),
        "nothing created inside the input"
    );

    let nested = tmp.path().join("a/b/out");
    let running = writer(&nested, &WriteOptions::default()).unwrap();
    assert!(tmp.path().join("a/b").is_dir());
    drop(running);
    assert_eq!(
        listing(tmp.path()),
        ["input"],
        "parents it created are gone"
    );
}

/// A pid that ran and exited.
fn dead_pid() -> u32 {
    let mut child = std::process::Command::new("true").spawn().unwrap();
    let pid = child.id();
    child.wait().unwrap();
    pid
}

#[test]
fn leftovers_of_killed_runs_are_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dead = dead_pid();
    let stale = tmp.path().join(format!(".out.amalgam-tmp-{dead}-1"));
    std::fs::create_dir(&stale).unwrap();
    std::fs::write(stale.join("model.safetensors"), vec![0u8; 1000]).unwrap();
    // A live process's staging directory is left alone.
    let live = tmp
        .path()
        .join(format!(".out.amalgam-tmp-{}-2", std::process::id()));
    std::fs::create_dir(&live).unwrap();
    // A stale lock file (its holder died) does not block.
    std::fs::write(tmp.path().join(".out.amalgam-lock"), dead.to_string()).unwrap();
    finish(writer(&out, &WriteOptions::default()).unwrap()).unwrap();
    assert!(!stale.exists());
    assert!(live.exists());
    std::fs::remove_dir(&live).unwrap();
    assert_eq!(listing(tmp.path()), ["out"]);

    // A --force run killed between moving the old output aside and putting
    // the new one in place: the old output comes back.
    let old = tmp.path().join(format!(".out.amalgam-old-{dead}-3"));
    std::fs::rename(&out, &old).unwrap();
    let err = writer(&out, &WriteOptions::default())
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.contains("not empty"),
        "restored, so not replaced: {err}"
    );
    assert!(out.join("model.safetensors").is_file());
    assert_eq!(listing(tmp.path()), ["out"]);
}

#[test]
fn force_replaces_and_removes_the_old_output() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    std::fs::create_dir(&out).unwrap();
    std::fs::write(out.join("old.txt"), "old").unwrap();
    assert!(writer(&out, &WriteOptions::default()).is_err());
    let force = WriteOptions {
        force: true,
        ..Default::default()
    };
    finish(writer(&out, &force).unwrap()).unwrap();
    assert!(!out.join("old.txt").exists());
    assert_eq!(listing(tmp.path()), ["out"]);
}
