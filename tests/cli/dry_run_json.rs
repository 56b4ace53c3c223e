//! Every `merge --dry-run --json` prints one JSON object: a per-tensor
//! method's plan, and a whole-model method's (PLeaS) description, which was
//! printed as text.

use crate::common;

use common::{ok, synth};
use serde_json::Value;

#[test]
fn dry_runs_honour_json_for_every_kind_of_method() {
    let tmp = tempfile::tempdir().unwrap();
    synth(&tmp.path().join("f"), &["--finetunes", "1"]);
    let (a, b) = (tmp.path().join("f/base"), tmp.path().join("f/finetune-1"));
    let out = tmp.path().join("out");
    for (name, body) in [
        ("linear", "parameters:\n  weight: 0.5\n"),
        (
            "pleas",
            "parameters:\n  calibration: random\n  samples: 8\n  seq_len: 16\n  budget: 1.3\n",
        ),
    ] {
        let recipe = tmp.path().join(format!("{name}.yml"));
        std::fs::write(
            &recipe,
            format!(
                "merge_method: {name}\nmodels:\n  - model: {}\n  - model: {}\n{body}",
                a.display(),
                b.display()
            ),
        )
        .unwrap();
        let printed = ok([
            "merge".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--dry-run".as_ref(),
            "--json".as_ref(),
        ]);
        let json: Value = serde_json::from_str(&printed)
            .unwrap_or_else(|e| panic!("{name}: not JSON ({e}): {printed}"));
        assert_eq!(json["method"], name, "{json}");
        assert_eq!(json["models"][1], b.display().to_string(), "{name}: {json}");
        assert!(json["peak_memory_estimate"].as_u64().unwrap() > 0, "{json}");
        assert!(!out.exists(), "{name}: a dry run writes nothing");
    }
}
