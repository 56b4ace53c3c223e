//! `amalgam eval --text`: any text, tokenized with the model's own tokenizer,
//! scored as transformers scores it.

mod common;

use std::path::Path;

use common::*;
use serde_json::Value;

/// A tiny random Llama with Llama 2's real tokenizer (32,000 tokens): the
/// loss, accuracy and token count on a text file match transformers' own
/// tokenizer and forward pass on the same windows.
#[test]
fn any_text_scores_as_transformers_scores_it() {
    let tmp = tempfile::tempdir().unwrap();
    let model = tmp.path().join("llama2-tiny");
    let tokenizer = Path::new(env!("CARGO_MANIFEST_DIR")).join(".cache/tokenizers/llama2");
    let script = "import sys, shutil, torch\nfrom transformers import LlamaConfig, LlamaForCausalLM\n\
                  torch.manual_seed(0)\n\
                  c = LlamaConfig(vocab_size=32000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, \
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)\n\
                  LlamaForCausalLM(c).save_pretrained(sys.argv[1])\n\
                  for f in ['tokenizer.json', 'tokenizer_config.json']:\n    shutil.copy(sys.argv[2] + '/' + f, sys.argv[1])\n";
    python_code(script, &[&model, &tokenizer]);
    let text = tmp.path().join("text.txt");
    let prose = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/corpus/prose.txt"),
    )
    .unwrap();
    let sample: String = prose.chars().take(6000).collect();
    std::fs::write(&text, format!("  Ünïcödé and 日本語 first.\n{sample}")).unwrap();
    let ours: Value = serde_json::from_str(&ok([
        "eval".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        text.as_os_str(),
        "--seq-len".as_ref(),
        "65".as_ref(),
        "--max-windows".as_ref(),
        "12".as_ref(),
        "--json".as_ref(),
    ]))
    .unwrap();
    let score = &ours[0]["domains"][0];
    let theirs: Value = serde_json::from_str(&oracle_ok(
        "hf_text_loss.py",
        &[
            model.as_os_str(),
            text.as_os_str(),
            "65".as_ref(),
            "12".as_ref(),
        ],
    ))
    .unwrap();
    assert_eq!(score["tokens"], theirs["tokens"], "{score} {theirs}");
    assert_eq!(score["tokens"], 12 * 64);
    assert_eq!(score["domain"], text.display().to_string());
    let (loss, expected) = (
        score["loss"].as_f64().unwrap(),
        theirs["loss"].as_f64().unwrap(),
    );
    assert!(
        (loss - expected).abs() <= 1e-4,
        "loss {loss} against transformers' {expected}"
    );
    assert!(
        (score["accuracy"].as_f64().unwrap() - theirs["accuracy"].as_f64().unwrap()).abs()
            <= 1.0 / 768.0
    );

    // Text shorter than a window, and the corpus's domains, are refused by name.
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "Hi.").unwrap();
    let message = fails([
        "eval".as_ref(),
        model.as_os_str(),
        "--text".as_ref(),
        short.as_os_str(),
    ]);
    assert!(
        message.contains("--seq-len 129 is longer than"),
        "{message}"
    );
}
