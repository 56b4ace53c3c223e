//! Hub ids in recipes (`org/name`, `org/name@revision`) resolve offline to
//! the snapshot in the local Hugging Face cache, exactly where
//! `huggingface_hub` itself finds it; a model not cached is an error giving
//! the `hf download` command that fetches it.

use crate::common;

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// Lays `model` out in `cache` as huggingface_hub does: blobs, a snapshot of
/// links into them, `refs/main` and a tag `refs/v1` naming the commit.
fn cache_model(cache: &Path, repo: &str, model: &Path, commit: &str) -> PathBuf {
    let entry = cache.join(format!("models--{}", repo.replace('/', "--")));
    let snapshot = entry.join("snapshots").join(commit);
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(entry.join("blobs")).unwrap();
    std::fs::create_dir_all(entry.join("refs")).unwrap();
    for (i, file) in std::fs::read_dir(model).unwrap().enumerate() {
        let file = file.unwrap();
        let blob = format!("{i:064x}");
        std::fs::copy(file.path(), entry.join("blobs").join(&blob)).unwrap();
        symlink(
            format!("../../blobs/{blob}"),
            snapshot.join(file.file_name()),
        )
        .unwrap();
    }
    std::fs::write(entry.join("refs/main"), commit).unwrap();
    std::fs::write(entry.join("refs/v1"), commit).unwrap();
    snapshot
}

fn amalgam_with_cache(cache: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .arg("-q")
        .env("HF_HUB_CACHE", cache)
        .output()
        .unwrap()
}

#[test]
fn hub_ids_resolve_in_the_local_cache_as_huggingface_hub_resolves_them() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("m"), &["--finetunes", "1"]);
    let cache = tmp.path().join("hub");
    let commit = "0123456789abcdef0123456789abcdef01234567";
    let base = cache_model(&cache, "org/tiny-base", &tmp.path().join("m/base"), commit);
    cache_model(
        &cache,
        "org/tiny-ft",
        &tmp.path().join("m/finetune-1"),
        commit,
    );

    // huggingface_hub finds the same snapshot, offline.
    let script = "import sys\nfrom huggingface_hub import snapshot_download\n\
                  print(snapshot_download(sys.argv[1], revision=sys.argv[2], cache_dir=sys.argv[3], \
                  local_files_only=True))";
    for revision in ["main", "v1", commit] {
        let theirs = python_ok([
            "-c".as_ref(),
            script.as_ref(),
            "org/tiny-base".as_ref(),
            revision.as_ref(),
            cache.as_os_str(),
        ]);
        assert_eq!(Path::new(theirs.trim()), base, "{revision}");
    }

    let recipe = tmp.path().join("r.yml");
    std::fs::write(
        &recipe,
        format!(
            "merge_method: linear\nmodels:\n  - model: org/tiny-base@v1\n    parameters: {{weight: 1}}\n  \
             - model: org/tiny-ft@{commit}\n    parameters: {{weight: 1}}\n  \
             - model: org/tiny-ft\n    parameters: {{weight: 1}}\n"
        ),
    )
    .unwrap();
    let out = tmp.path().join("out");
    let result = amalgam_with_cache(
        &cache,
        &["merge".as_ref(), recipe.as_os_str(), out.as_os_str()],
    );
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    let card = std::fs::read_to_string(out.join("README.md")).unwrap();
    assert!(
        card.contains(&format!("snapshots/{commit}")),
        "the card records the snapshot"
    );
    let result = amalgam_with_cache(&cache, &["inspect".as_ref(), "org/tiny-base".as_ref()]);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );

    // Not cached, or not at that revision: the command that fetches it.
    for (model, needles) in [
        (
            "org/missing",
            &[
                "r2.yml:3:",
                "is not in the Hugging Face cache",
                "`hf download org/missing`",
            ][..],
        ),
        (
            "org/tiny-base@v2",
            &[
                "is in the Hugging Face cache",
                "not at revision `v2`",
                "`hf download org/tiny-base --revision v2`",
            ][..],
        ),
    ] {
        let bad = tmp.path().join("r2.yml");
        std::fs::write(
            &bad,
            format!("merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1}}\n"),
        )
        .unwrap();
        let result = amalgam_with_cache(
            &cache,
            &[
                "merge".as_ref(),
                bad.as_os_str(),
                tmp.path().join("out2").as_os_str(),
            ],
        );
        let stderr = String::from_utf8_lossy(&result.stderr);
        assert_eq!(result.status.code(), Some(1), "{stderr}");
        for needle in needles {
            assert!(stderr.contains(needle), "missing {needle:?} in {stderr}");
        }
        assert!(!stderr.contains("huggingface-cli"), "{stderr}");
    }
}
