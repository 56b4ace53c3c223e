//! Shared by the nn tests and benches: the repository root, and its venv's Python.
#![allow(dead_code)] // each test binary uses its own subset

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;

pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Runs `script` (a path under the repository root) with the venv's Python,
/// which must succeed; the JSON it prints.
pub fn python_json<S: AsRef<OsStr>>(script: &str, args: &[S]) -> serde_json::Value {
    oracle_tier_only("runs no Python");
    let out = Command::new(root().join(".venv/bin/python"))
        .arg(root().join(script))
        .args(args)
        .output()
        .expect("the venv's python runs (scripts/setup.sh)");
    assert!(
        out.status.success(),
        "{script}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON")
}

/// Stops a test that would do what only the oracle tier does (`what`).
fn oracle_tier_only(what: &str) {
    if !crate::ORACLE_TIER {
        panic!("the everyday tier {what}: move this test to tests/oracle/");
    }
}
