//! `amalgam eval --text`: documents of any text, tokenized with the model's
//! own tokenizer and scored whole as lm-evaluation-harness's rolling
//! log-likelihood scores them, equal to transformers' tokenizer and forward
//! pass on the same windows (`tests/oracles/hf_text_loss.py`).

use crate::common;

use std::ffi::OsStr;
use std::path::Path;

use common::*;
use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// amalgam's scores for `file` and the oracle's, for windows of `seq_len`
/// tokens seeing `stride` tokens of context.
fn scores(
    model: &Path,
    file: &Path,
    seq_len: usize,
    stride: usize,
    extra: &[&str],
) -> (Value, Value) {
    let (seq, context) = (seq_len.to_string(), stride.to_string());
    let mut args: Vec<&OsStr> = vec![
        "eval".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        file.as_os_str(),
        "--seq-len".as_ref(),
        seq.as_ref(),
        "--stride".as_ref(),
        context.as_ref(),
        "--batch".as_ref(),
        "4".as_ref(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    let ours: Value = serde_json::from_str(&ok(args)).unwrap();
    let max_len = (seq_len - 1).to_string();
    let mut oracle: Vec<&OsStr> = vec![
        model.as_os_str(),
        file.as_os_str(),
        max_len.as_ref(),
        context.as_ref(),
    ];
    if let Some(field) = extra.iter().skip_while(|a| **a != "--field").nth(1) {
        oracle.push(field.as_ref());
    }
    let theirs: Value = serde_json::from_str(&oracle_ok("hf_text_loss.py", &oracle)).unwrap();
    (ours[0]["domains"][0].clone(), theirs)
}

fn assert_same(ours: &Value, theirs: &Value, what: &str) {
    assert_eq!(ours["tokens"], theirs["tokens"], "{what}: {ours} {theirs}");
    for key in ["loss", "bits_per_byte"] {
        let (a, b) = (ours[key].as_f64().unwrap(), theirs[key].as_f64().unwrap());
        assert!(
            (a - b).abs() <= 1e-4 * b.abs().max(1.0),
            "{what}: {key} {a} against transformers' {b}"
        );
    }
    let tokens = theirs["tokens"].as_f64().unwrap();
    let accuracy = ours["accuracy"].as_f64().unwrap() - theirs["accuracy"].as_f64().unwrap();
    assert!(accuracy.abs() <= 1.0 / tokens, "{what}: {ours} {theirs}");
}

/// A Llama with Llama 2's real tokenizer (SentencePiece-style, BOS as the
/// prefix) and a Qwen3 with Qwen3's (byte-level BPE, no BOS: EOS is the
/// prefix): plain text and JSON lines, disjoint and overlapping windows, all
/// as transformers scores them; bits per byte compare the two tokenizers.
/// `--reference` compares a Qwen3 with a Qwen2 sharing its tokenizer and
/// refuses a Llama whose tokenizer differs.
#[test]
fn any_text_scores_as_transformers_scores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let llama = model_with_tokenizer(tmp.path(), "llama", "llama2", 32000, 0);
    let qwen = model_with_tokenizer(tmp.path(), "qwen3", "qwen3", 151669, 0);
    let prose = std::fs::read_to_string(root().join("crates/corpus/texts/prose.txt")).unwrap();
    let sample: String = prose.chars().take(3000).collect();
    let text = tmp.path().join("text.txt");
    std::fs::write(&text, format!("  Ünïcödé and 日本語 first.\n{sample}")).unwrap();

    let (ours, theirs) = scores(&llama, &text, 65, 1, &[]);
    assert_same(&ours, &theirs, "llama2, disjoint windows");
    assert_eq!(ours["domain"], text.display().to_string());
    assert!(
        theirs["tokens"].as_u64().unwrap() > 3 * 64,
        "several windows"
    );
    let (overlapping, theirs) = scores(&llama, &text, 65, 24, &[]);
    assert_same(&overlapping, &theirs, "llama2, 24 tokens of context");
    assert_eq!(overlapping["tokens"], ours["tokens"], "every token once");

    let jsonl = tmp.path().join("docs.jsonl");
    let lines: Vec<String> = sample
        .split("\n\n")
        .filter(|d| !d.trim().is_empty())
        .take(6)
        .map(|d| serde_json::json!({"id": 1, "body": d}).to_string())
        .collect();
    std::fs::write(&jsonl, lines.join("\n") + "\n\n").unwrap();
    for model in [&llama, &qwen] {
        let (ours, theirs) = scores(model, &jsonl, 33, 1, &["--field", "body"]);
        assert_same(&ours, &theirs, &format!("{}: jsonl", model.display()));
    }

    // Across families sharing a tokenizer, --reference compares predictions.
    let qwen2 = model_with_tokenizer(tmp.path(), "qwen2", "qwen3", 151669, 0);
    let compared: Value = serde_json::from_str(&ok([
        "eval".as_ref(),
        qwen.as_os_str(),
        "--reference".as_ref(),
        qwen2.as_os_str(),
        "--text".as_ref(),
        jsonl.as_os_str(),
        "--field".as_ref(),
        "body".as_ref(),
        "--seq-len".as_ref(),
        "33".as_ref(),
        "--batch".as_ref(),
        "4".as_ref(),
        "--json".as_ref(),
    ]))
    .unwrap();
    let score = &compared[0]["domains"][0];
    let agreement = score["agreement"].as_f64().unwrap();
    assert!((0.0..1.0).contains(&agreement), "{score}");
    assert!(score["kl"].as_f64().unwrap() > 0.0, "{score}");

    // Models that tokenize differently cannot be compared token by token.
    let message = fails([
        "eval".as_ref(),
        qwen.as_os_str(),
        "--reference".as_ref(),
        llama.as_os_str(),
        "--text".as_ref(),
        text.as_os_str(),
    ]);
    assert!(message.contains("splits the text differently"), "{message}");

    // A line without the field is named by file and line.
    let bad = tmp.path().join("bad.jsonl");
    std::fs::write(&bad, "{\"body\": \"x\"}\n{\"text\": \"y\"}\n").unwrap();
    let message = fails([
        "eval".as_ref(),
        llama.as_os_str(),
        "--text".as_ref(),
        bad.as_os_str(),
        "--field".as_ref(),
        "body".as_ref(),
    ]);
    assert!(
        message.contains(&format!("{}:2: no string field \"body\"", bad.display())),
        "{message}"
    );
}
