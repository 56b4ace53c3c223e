//! Published models' own tokenizers (from the pinned npm packages that
//! scripts/setup.sh fetches into .cache/tokenizers/) encode the corpus of
//! every domain, and non-ASCII text, to exactly the ids transformers'
//! AutoTokenizer gives; amalgam's byte tokenizer is just another tokenizer.json.

use crate::common;

use std::path::Path;

use amalgam_nn::text::TextTokenizer;
use amalgam_nn::tokenizer;
use common::{python_json, root};

/// Pieces of every corpus domain (from several offsets), and text that
/// tokenizers tend to get wrong.
fn texts() -> Vec<String> {
    let mut texts: Vec<String> = [
        "Hello world",
        "  two leading spaces,\ttabs\tand\n\nnewlines\r\n",
        "Ünïcödé — 日本語のテキスト, 한국어, العربية, emoji 🙂👍🏽, e\u{301} combining",
        "def f(x):\n    return x ** 2  # comment",
        "<s> looks special </s> <|endoftext|>",
        "",
        " ",
    ]
    .map(str::to_owned)
    .to_vec();
    for domain in ["prose", "code", "legal"] {
        let corpus = amalgam_corpus::text(domain).unwrap();
        let chars: Vec<char> = corpus.chars().collect();
        for k in 0..12 {
            let start = k * chars.len() / 12;
            texts.push(
                chars[start..(start + 600).min(chars.len())]
                    .iter()
                    .collect(),
            );
        }
    }
    texts
}

fn transformers_ids(dir: &Path, texts: &[String]) -> Vec<Vec<i64>> {
    let list = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(list.path(), serde_json::to_vec(texts).unwrap()).unwrap();
    serde_json::from_value(python_json(
        "tests/oracles/hf_tokenize.py",
        &[dir.as_os_str(), list.path().as_os_str()],
    ))
    .unwrap()
}

#[test]
fn published_tokenizers_encode_as_transformers_does() {
    let texts = texts();
    for name in ["llama3", "qwen3", "gemma3", "llama2"] {
        let dir = root().join(".cache/tokenizers").join(name);
        assert!(
            dir.join("tokenizer.json").exists(),
            "{} is missing: run scripts/setup.sh",
            dir.display()
        );
        let ours = TextTokenizer::load(&dir).unwrap();
        let theirs = transformers_ids(&dir, &texts);
        for (text, expected) in texts.iter().zip(&theirs) {
            assert_eq!(
                &ours.encode(text, true).unwrap(),
                expected,
                "{name}: {text:?}"
            );
        }
        eprintln!(
            "{name}: {} texts, {} tokens, identical",
            texts.len(),
            theirs.iter().map(Vec::len).sum::<usize>()
        );
    }
}

#[test]
fn the_byte_tokenizer_is_a_tokenizer_json_too() {
    let dir = tempfile::tempdir().unwrap();
    for (name, contents) in tokenizer::files() {
        std::fs::write(dir.path().join(name), contents).unwrap();
    }
    let loaded = TextTokenizer::load(dir.path()).unwrap();
    assert_eq!(loaded.vocab_size(), tokenizer::VOCAB_SIZE);
    for text in texts() {
        assert_eq!(
            loaded.encode(&text, false).unwrap(),
            tokenizer::encode(&text),
            "{text:?}"
        );
    }
}

/// `add_bos_token` / `add_eos_token` in tokenizer_config.json, flipped
/// either way: the special tokens are still the ones AutoTokenizer adds
/// (transformers 5 keeps the tokenizer.json's post-processor; amalgam too).
#[test]
fn special_token_flags_follow_transformers() {
    let texts: Vec<String> = ["Hello world", "  two\nlines", ""]
        .map(str::to_owned)
        .to_vec();
    let tmp = tempfile::tempdir().unwrap();
    for name in ["llama3", "qwen3", "gemma3", "llama2"] {
        let source = root().join(".cache/tokenizers").join(name);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(source.join("tokenizer_config.json")).unwrap())
                .unwrap();
        for (flag, value) in [("add_bos_token", false), ("add_eos_token", true)] {
            let dir = tmp.path().join(format!("{name}-{flag}-{value}"));
            std::fs::create_dir(&dir).unwrap();
            std::fs::copy(source.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
            let mut edited = config.clone();
            edited[flag] = value.into();
            std::fs::write(
                dir.join("tokenizer_config.json"),
                serde_json::to_vec(&edited).unwrap(),
            )
            .unwrap();
            let ours = TextTokenizer::load(&dir).unwrap();
            for (text, expected) in texts.iter().zip(transformers_ids(&dir, &texts)) {
                assert_eq!(
                    ours.encode(text, true).unwrap(),
                    expected,
                    "{name} with {flag}: {value}: {text:?}"
                );
            }
        }
    }
}
