//! Every `merge --dry-run --json` prints one JSON object: a per-tensor
//! method's plan, and a whole-model method's (PLeaS) description, which was
//! printed as text. Both carry the one memory model's estimate, printed the
//! same way as text, and `--max-memory` refuses with its breakdown.

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
            "calibration: {source: random, samples: 8, seq_len: 16}\nparameters:\n  budget: 1.3\n",
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
        let peak = json["peak_memory_estimate"].as_u64().unwrap();
        assert_eq!(json["memory"]["peak"], peak, "{json}");
        assert_eq!(json["memory"]["held"]["the process"], 250_000_000, "{json}");
        let phases = json["memory"]["phases"].as_object().unwrap();
        assert!(!phases.is_empty(), "{json}");
        let text = ok([
            "merge".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--dry-run".as_ref(),
        ]);
        let line = format!("peak memory ≈ {:.2} GB (", peak as f64 / 1e9);
        assert!(text.contains(&line), "{name}: {text}");
        assert!(text.contains("plus the process 0.25"), "{name}: {text}");
        if name == "pleas" {
            // A cap just under the estimate.
            let cap = format!("{}KB", peak / 1000 - 1);
            let capped = common::amalgam([
                "merge".as_ref(),
                recipe.as_os_str(),
                out.as_os_str(),
                "--max-memory".as_ref(),
                cap.as_ref(),
            ]);
            let flag = format!("--max-memory {cap}");
            let needles = [line.as_str(), "the largest of: ", &flag];
            common::refused_unwritten(&capped, &out, &needles);
        }
        assert!(!out.exists(), "{name}: a dry run writes nothing");
    }
}
