//! The merging study in miniature on the micro zoo's `study` set: experts on
//! domains the base never saw, the multitask model above them, their average
//! above the base on held-in and held-out text; and `amalgam tune`, whose best
//! recipe merged on disk scores on the validation split what the in-memory
//! trial scored, no worse than the defaults, the same for the same seed.

use crate::common;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};

use common::*;
use serde_json::Value;

const HELD_IN: [&str; 4] = ["german", "c", "spanish", "perl"];

/// Mean loss per (model, domain) from `amalgam eval --json`, on at most
/// `windows` windows per domain.
fn losses(models: &[PathBuf], domains: &str, split: &str, windows: &str) -> Vec<Vec<f64>> {
    let mut args: Vec<&OsStr> = vec!["eval".as_ref()];
    args.extend(models.iter().map(|m| m.as_os_str()));
    args.extend(
        [
            "--domains",
            domains,
            "--split",
            split,
            "--seq-len",
            "65",
            "--max-windows",
            windows,
            "--json",
        ]
        .map(OsStr::new),
    );
    let scores: Value = serde_json::from_str(&ok(args)).unwrap();
    scores
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            let domains = m["domains"].as_array().unwrap();
            domains
                .iter()
                .map(|d| d["loss"].as_f64().unwrap())
                .collect()
        })
        .collect()
}

/// The shipped tune recipe with each marker replaced by its default.
fn without_markers(text: &str) -> String {
    text.replace("{tune: [0.1, 1.0], default: 0.5}", "0.5")
        .replace("{tune: [0.2, 2.0], default: 1.0}", "1.0")
}

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[test]
fn micro_study_orders_base_experts_merge_and_multitask() {
    let tmp = tempfile::tempdir().unwrap();
    let (micro, members) = micro_zoo(Some("study"));
    assert_eq!(
        members,
        [
            "base",
            "study-german",
            "study-c",
            "study-spanish",
            "study-perl",
            "multitask-2",
            "multitask-3",
            "multitask-4",
            "base-short",
            "short-study-german",
            "short-study-c",
            "short-study-spanish",
            "short-study-perl",
            "base-long",
            "long-study-german",
            "long-study-c",
            "long-study-spanish",
            "long-study-perl"
        ]
    );
    let average = tmp.path().join("average");
    let recipe = tmp.path().join("average.yml");
    let models: String = HELD_IN
        .iter()
        .map(|d| {
            format!(
                "  - model: {}\n",
                micro.join(format!("study-{d}")).display()
            )
        })
        .collect();
    std::fs::write(
        &recipe,
        format!(
            "merge_method: linear\nparameters: {{weight: 1.0}}\nmodels:\n{models}dtype: float32\n"
        ),
    )
    .unwrap();
    ok(["merge".as_ref(), recipe.as_os_str(), average.as_os_str()]);
    let mut dirs = vec![micro.join("base")];
    dirs.extend(HELD_IN.iter().map(|d| micro.join(format!("study-{d}"))));
    dirs.push(micro.join("multitask-4"));
    dirs.push(average);
    // All of each domain's evaluation split (about 30K bytes; a few windows are noisy).
    let scores = losses(&dirs, "german,c,spanish,perl,italian,cpp", "eval", "1000");
    let (base, multitask, merged) = (&scores[0], &scores[5], &scores[6]);
    let table = format!("{scores:.3?}");
    for (i, domain) in HELD_IN.iter().enumerate() {
        let expert = scores[1 + i][i];
        assert!(
            expert < base[i] - 0.1,
            "{domain}: its expert beats the base, which never saw it: {table}"
        );
        assert!(
            multitask[i] < base[i] - 0.05,
            "{domain}: the multitask model beats the base: {table}"
        );
    }
    let held_in = |s: &[f64]| mean(&s[..4]);
    let held_out = |s: &[f64]| mean(&s[4..]);
    assert!(
        held_in(merged) < held_in(base) - 0.1,
        "the experts' average beats the base on held-in text: {table}"
    );
    assert!(
        held_in(multitask) < held_in(merged) - 0.1,
        "multitask training beats the merge on held-in text: {table}"
    );
    assert!(
        held_out(merged) < held_out(base) - 0.03,
        "the experts' average beats the base on held-out domains: {table}"
    );
    tune_finds_no_worse_recipe_reproducibly(&micro, tmp.path());
}

/// `amalgam tune` on the shipped TIES recipe (micro zoo paths).
fn tune_finds_no_worse_recipe_reproducibly(micro: &Path, tmp: &Path) {
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/zoo/ties-tune.yml");
    let text = std::fs::read_to_string(shipped)
        .unwrap()
        .replace("work/zoo/small", micro.to_str().unwrap());
    let recipe = tmp.join("ties-tune.yml");
    std::fs::write(&recipe, &text).unwrap();
    let tune = |out: &Path| {
        ok([
            "tune".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--domains".as_ref(),
            "german,c,spanish,perl".as_ref(),
            "--trials".as_ref(),
            "12".as_ref(),
            "--seq-len".as_ref(),
            "65".as_ref(),
            "--max-windows".as_ref(),
            "32".as_ref(),
            "--seed".as_ref(),
            "3".as_ref(),
        ])
    };
    let (first, second) = (tmp.join("tuned-1"), tmp.join("tuned-2"));
    let printed = tune(&first);
    tune(&second);
    for file in ["best.yml", "trials.md"] {
        assert_eq!(
            std::fs::read(first.join(file)).unwrap(),
            std::fs::read(second.join(file)).unwrap(),
            "{file}: same seed, same result"
        );
    }
    assert_eq!(
        printed,
        std::fs::read_to_string(first.join("trials.md")).unwrap()
    );
    let best_row: Vec<f64> = printed
        .lines()
        .find(|l| l.contains("(best)"))
        .unwrap()
        .split('|')
        .map(str::trim)
        .filter_map(|c| c.parse().ok())
        .collect();
    assert_eq!(best_row.len(), 2 + 4 + 1, "{printed}");
    let best_losses = &best_row[2..6];

    // The defaults as an ordinary recipe, and the best one, merged on disk.
    let defaults = tmp.join("ties-defaults.yml");
    std::fs::write(&defaults, without_markers(&text)).unwrap();
    let merged: Vec<PathBuf> = [("defaults", defaults), ("best", first.join("best.yml"))]
        .into_iter()
        .map(|(name, recipe)| {
            let out = tmp.join(format!("ties-{name}"));
            ok([
                "merge".as_ref(),
                recipe.as_os_str(),
                out.as_os_str(),
                "--seed".as_ref(),
                "3".as_ref(),
            ]);
            out
        })
        .collect();
    let scores = losses(&merged, "german,c,spanish,perl", "validation", "32");
    for (on_disk, in_memory) in scores[1].iter().zip(best_losses) {
        assert!(
            (on_disk - in_memory).abs() < 1e-4,
            "the best merge scores on disk what its trial scored: {scores:?} vs {best_losses:?}"
        );
    }
    assert!(
        mean(&scores[1]) <= mean(&scores[0]),
        "the tuned recipe is no worse than the defaults on validation: {scores:?}"
    );
    tune_refuses_bad_input(&recipe, tmp);
}

fn tune_refuses_bad_input(recipe: &Path, tmp: &Path) {
    let out = tmp.join("refused");
    let run = |recipe: &Path, domains: &str| {
        fails([
            "tune".as_ref(),
            recipe.as_os_str(),
            out.as_os_str(),
            "--domains".as_ref(),
            OsStr::new(domains),
        ])
    };
    let message = run(recipe, "german,prose");
    assert!(
        message.contains("domain prose has no validation split"),
        "{message}"
    );
    let message = fails(["eval", "x", "--domains", "legal", "--split", "validation"]);
    assert!(
        message.contains("domain legal has no validation split"),
        "{message}"
    );
    let text = std::fs::read_to_string(recipe).unwrap();
    let plain = tmp.join("plain.yml");
    std::fs::write(&plain, without_markers(&text)).unwrap();
    let message = run(&plain, "german");
    assert!(message.contains("nothing to tune"), "{message}");
    let inverted = tmp.join("inverted.yml");
    std::fs::write(&inverted, text.replace("[0.1, 1.0]", "[1.0, 0.1]")).unwrap();
    let message = run(&inverted, "german");
    assert!(
        message.contains("inverted.yml:5:") && message.contains("low end must be below"),
        "{message}"
    );
    assert!(!out.exists(), "nothing written on refusal");
}
