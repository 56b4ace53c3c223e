//! Limits a user sets on the process are met with errors, not aborts.

use std::process::Command;

/// Under a small address-space limit (`ulimit -v`), amalgam stops with an
/// error naming the limit instead of aborting inside libtorch or the allocator.
#[test]
fn a_small_address_space_limit_is_an_error_not_an_abort() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("m");
    let script = format!(
        "ulimit -v 600000 && exec \"$0\" synth {} --finetunes 1",
        out.display()
    );
    let result = Command::new("sh")
        .args(["-c", &script, env!("CARGO_BIN_EXE_amalgam")])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("address space is limited to 585 MB") && stderr.contains("ulimit -v"),
        "{stderr}"
    );
    assert!(!out.exists());
}
