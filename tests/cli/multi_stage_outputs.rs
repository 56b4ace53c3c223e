//! Multi-stage recipes write only where they should: stage names are names
//! (never paths out of the intermediate directory), no stage output or final
//! output replaces an input or a directory amalgam did not write as a stage,
//! with or without `--force`; a FIFO where a kept stage would be does not
//! hang the run; empty recipes are errors.

use crate::common;

use std::path::Path;

use common::*;

fn two_stages(dir: &Path, stage: &str, final_models: &str) -> std::path::PathBuf {
    let member = |m: &str| dir.join("family").join(m).display().to_string();
    let recipe = dir.join(format!("multi-{}.yml", stage.len()));
    std::fs::write(
        &recipe,
        format!(
            "name: {stage:?}\nmerge_method: linear\nmodels:\n  - model: {base}\n    \
             parameters: {{weight: 0.5}}\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n---\n\
             merge_method: linear\nmodels:\n{final_models}",
            base = member("base"),
            ft = member("finetune-1"),
        ),
    )
    .unwrap();
    recipe
}

fn stderr(output: &std::process::Output) -> String {
    assert!(!output.status.success(), "should have failed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn stage_names_are_never_paths() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("family"), &["--finetunes", "1"]);
    let outside = tmp.path().join("outside");
    for name in [
        outside.display().to_string(),
        "../escaped".into(),
        "a/b".into(),
    ] {
        let used = format!("  - model: {name:?}\n    parameters: {{weight: 1}}\n");
        let recipe = two_stages(tmp.path(), &name, &used);
        let err = stderr(&merge_run(&recipe, &tmp.path().join("out"), &["--force"]));
        assert!(
            err.contains(":1:7:") && err.contains("not a plain name"),
            "{err}"
        );
    }
    assert!(!outside.exists());
    assert!(!tmp.path().join("escaped").exists());
    assert_eq!(
        listing(tmp.path())
            .iter()
            .filter(|n| n.starts_with('.'))
            .count(),
        0
    );
}

#[test]
fn stages_never_replace_inputs_or_foreign_directories() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("family");
    synth(&family, &["--finetunes", "2"]);
    let digests = |dir: &Path| tensor_digests(&inspect_json(dir, true));
    let ft2 = family.join("finetune-2");
    let before = digests(&ft2);

    // A stage named after an input's directory, kept in that input's parent.
    let used = format!(
        "  - model: finetune-2\n    parameters: {{weight: 0.5}}\n  - model: {}\n    \
         parameters: {{weight: 0.5}}\n",
        family.join("base").display()
    );
    let recipe = two_stages(tmp.path(), "finetune-2", &used);
    let intermediate = ["--intermediate-dir", family.to_str().unwrap(), "--force"];
    let err = stderr(&merge_run(&recipe, &tmp.path().join("out"), &intermediate));
    assert!(err.contains("not a stage output amalgam wrote"), "{err}");
    assert_eq!(digests(&ft2), before, "the input is untouched");

    // An unrelated directory where a stage would be kept.
    let kept = tmp.path().join("kept");
    std::fs::create_dir_all(kept.join("soup")).unwrap();
    std::fs::write(kept.join("soup/notes.txt"), "mine").unwrap();
    let used = "  - model: soup\n    parameters: {weight: 1}\n";
    let recipe = two_stages(tmp.path(), "soup", used);
    let keep = ["--intermediate-dir", kept.to_str().unwrap(), "--force"];
    let err = stderr(&merge_run(&recipe, &tmp.path().join("out"), &keep));
    assert!(err.contains("not a stage output amalgam wrote"), "{err}");
    assert_eq!(
        std::fs::read_to_string(kept.join("soup/notes.txt")).unwrap(),
        "mine"
    );

    // The final output over an input one of the stages reads.
    let err = stderr(&merge_run(
        &recipe,
        &family.join("finetune-1"),
        &["--force"],
    ));
    assert!(
        err.contains("refusing to write a stage output over input"),
        "{err}"
    );
    assert!(family.join("finetune-1/model.safetensors").is_file());

    // A stage output amalgam wrote is reused, and replaced when its recipe changed.
    std::fs::remove_dir_all(kept.join("soup")).unwrap();
    let keep = ["--intermediate-dir", kept.to_str().unwrap()];
    assert!(merge_run(&recipe, &tmp.path().join("a"), &keep)
        .status
        .success());
    assert!(kept.join("soup/.amalgam-stage").is_file());
    let changed = std::fs::read_to_string(&recipe)
        .unwrap()
        .replacen("0.5", "0.25", 1);
    std::fs::write(&recipe, changed).unwrap();
    assert!(merge_run(&recipe, &tmp.path().join("b"), &keep)
        .status
        .success());
    assert_ne!(
        digests(&tmp.path().join("a")),
        digests(&tmp.path().join("b"))
    );

    // A FIFO where the kept stage's recipe would be is refused, not read.
    let config = kept.join("soup/mergekit_config.yml");
    std::fs::remove_file(&config).unwrap();
    let fifo = std::ffi::CString::new(config.to_str().unwrap()).unwrap();
    // SAFETY: a valid path.
    assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
    let err = stderr(&merge_run(&recipe, &tmp.path().join("c"), &keep));
    assert!(err.contains("FIFO"), "{err}");
}

#[test]
fn empty_recipes_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    for (i, text) in ["", "# nothing\n", "---\n---\n", "\n\n...\n"]
        .iter()
        .enumerate()
    {
        let recipe = tmp.path().join(format!("empty-{i}.yml"));
        std::fs::write(&recipe, text).unwrap();
        let out = tmp.path().join("out");
        let err = stderr(&merge_run(&recipe, &out, &[]));
        assert!(
            err.contains(":1:1:") && err.contains("empty"),
            "{text:?}: {err}"
        );
        assert!(!out.exists());
    }
}
