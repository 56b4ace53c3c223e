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
    // (The layout OutputDir::commit leaves: a private directory holding a
    // marker, then the old output.)
    let old = tmp.path().join(format!(".out.amalgam-old-{dead}-3"));
    std::fs::create_dir(&old).unwrap();
    std::fs::write(
        old.join("moved-aside-by-amalgam"),
        out.display().to_string(),
    )
    .unwrap();
    std::fs::rename(&out, old.join("previous")).unwrap();
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

#[test]
fn a_symlink_planted_at_the_lock_is_never_followed() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let victim = tmp.path().join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    let lock = tmp.path().join(".out.amalgam-lock");
    std::os::unix::fs::symlink(&victim, &lock).unwrap();
    let err = writer(&out, &WriteOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("symbolic link"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(std::fs::symlink_metadata(&lock).unwrap().is_symlink());
    assert!(!out.exists());

    // A hard link to another file, or a file that holds no pid, is not ours either.
    std::fs::remove_file(&lock).unwrap();
    std::fs::hard_link(&victim, &lock).unwrap();
    let err = writer(&out, &WriteOptions::default())
        .err()
        .expect("refused")
        .to_string();
    assert!(err.contains("not a lock file amalgam wrote"), "{err}");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    std::fs::remove_file(&lock).unwrap();
    std::fs::write(&lock, "not a pid").unwrap();
    assert!(writer(&out, &WriteOptions::default()).is_err());
    assert_eq!(std::fs::read_to_string(&lock).unwrap(), "not a pid");
}

#[test]
fn planted_old_siblings_are_never_restored() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let dead = dead_pid();
    let elsewhere = tmp.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    // A symlink, a regular file, and a directory without amalgam's marker,
    // each named like an output a killed --force run moved aside.
    let link = tmp.path().join(format!(".out.amalgam-old-{dead}-1"));
    std::os::unix::fs::symlink(&elsewhere, &link).unwrap();
    let file = tmp.path().join(format!(".out.amalgam-old-{dead}-2"));
    std::fs::write(&file, "planted").unwrap();
    let unmarked = tmp.path().join(format!(".out.amalgam-old-{dead}-3"));
    std::fs::create_dir(&unmarked).unwrap();
    std::fs::create_dir(unmarked.join("previous")).unwrap();
    // A staging name that is a symlink is not removed through.
    let staging_link = tmp.path().join(format!(".out.amalgam-tmp-{dead}-4"));
    std::os::unix::fs::symlink(&elsewhere, &staging_link).unwrap();
    std::fs::write(elsewhere.join("keep.txt"), "keep").unwrap();

    finish(writer(&out, &WriteOptions::default()).unwrap()).unwrap();
    assert!(
        !std::fs::symlink_metadata(&out).unwrap().is_symlink(),
        "the new output, not a restored link"
    );
    assert!(out.join("model.safetensors").is_file());
    for planted in [&link, &file, &unmarked, &staging_link] {
        assert!(
            std::fs::symlink_metadata(planted).is_ok(),
            "{} left alone",
            planted.display()
        );
    }
    assert_eq!(
        std::fs::read_to_string(elsewhere.join("keep.txt")).unwrap(),
        "keep"
    );
}
