//! End to end: `amalgam zoo build --size micro` trains every zoo member, each
//! loads in transformers, a second build reuses them, and `amalgam eval`
//! scores them per domain.

mod common;

use common::*;
use serde_json::Value;

#[test]
fn micro_zoo_builds_loads_in_transformers_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("zoo");
    let listed = ok([
        "zoo".as_ref(),
        "build".as_ref(),
        "--size".as_ref(),
        "micro".as_ref(),
        "--dir".as_ref(),
        dir.as_os_str(),
    ]);
    let members: Vec<&str> = listed
        .lines()
        .map(|l| l.split('\t').next().unwrap())
        .collect();
    assert_eq!(
        members,
        [
            "base",
            "expert-prose",
            "expert-code",
            "expert-legal",
            "init-b",
            "anchor-small"
        ]
    );
    let micro = dir.join("micro");
    let record = |m: &str| std::fs::read(micro.join(m).join("zoo-member.json")).unwrap();
    let before: Vec<Vec<u8>> = members.iter().map(|m| record(m)).collect();

    // Up to date: nothing retrained (records unchanged, not rewritten).
    ok([
        "zoo".as_ref(),
        "build".as_ref(),
        "--size".as_ref(),
        "micro".as_ref(),
        "--dir".as_ref(),
        micro.parent().unwrap().as_os_str(),
    ]);
    let after: Vec<Vec<u8>> = members.iter().map(|m| record(m)).collect();
    assert_eq!(before, after);

    let dirs: Vec<_> = members.iter().map(|m| micro.join(m)).collect();
    let oracle = hf_oracle(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>(), false);
    for d in &dirs {
        let report = &oracle[d.to_str().unwrap()];
        assert!(
            report["parameters"].as_u64().unwrap() > 0,
            "{}: {report}",
            d.display()
        );
    }

    let mut args: Vec<&std::ffi::OsStr> = vec!["eval".as_ref()];
    args.extend(dirs.iter().map(|d| d.as_os_str()));
    args.extend(["--json", "--seq-len", "65", "--max-windows", "16"].map(std::ffi::OsStr::new));
    let scores: Value = serde_json::from_str(&ok(args)).unwrap();
    let loss = |model: &str, domain: &str| -> f64 {
        let entry = scores
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"].as_str().unwrap().ends_with(model))
            .unwrap();
        let score = entry["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["domain"] == domain)
            .unwrap();
        let accuracy = score["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy));
        score["loss"].as_f64().unwrap()
    };
    let uniform = (amalgam_nn::tokenizer::VOCAB_SIZE as f64).ln();
    for domain in ["prose", "code", "legal"] {
        let base = loss("base", domain);
        assert!(
            base < uniform - 1.0,
            "{domain}: the base learned something ({base} vs {uniform})"
        );
        let expert = loss(&format!("expert-{domain}"), domain);
        assert!(
            expert < base,
            "{domain}: its expert ({expert}) beats the base ({base})"
        );
    }
}

#[test]
fn eval_and_zoo_refuse_bad_arguments_by_name() {
    let message = fails(["eval", "/nonexistent/model"]);
    assert!(message.contains("/nonexistent/model"), "{message}");
    assert_eq!(
        message.matches("No such file").count(),
        1,
        "the cause once: {message}"
    );
    let message = fails(["eval", "x", "--domains", "prose,french"]);
    assert!(message.contains("unknown domain \"french\""), "{message}");
    let message = fails(["eval", "x", "--seq-len", "10000000"]);
    assert!(
        message.contains("longer than the prose held-out text"),
        "{message}"
    );
    let message = fails(["zoo", "build", "--size", "huge"]);
    assert!(message.contains("unknown zoo size \"huge\""), "{message}");
}
