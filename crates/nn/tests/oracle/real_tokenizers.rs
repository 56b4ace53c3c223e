//! Published models' own tokenizers (from the pinned npm packages that
//! scripts/setup.sh fetches into .cache/tokenizers/) encode the corpus of
//! every domain, and non-ASCII text, to exactly the ids transformers'
//! AutoTokenizer gives; amalgam's byte tokenizer is just another tokenizer.json.

use crate::common;

use std::path::PathBuf;

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

/// AutoTokenizer's ids for every text in every one of `dirs` (with special
/// tokens added as the tokenizer adds them), from one Python process.
fn transformers_ids(dirs: &[PathBuf], texts: &[String]) -> Vec<Vec<Vec<i64>>> {
    let spec = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(
        spec.path(),
        serde_json::to_vec(&serde_json::json!({ "dirs": dirs, "texts": texts })).unwrap(),
    )
    .unwrap();
    let result = python_json("tests/oracles/hf_tokenize_dirs.py", &[spec.path()]);
    dirs.iter()
        .map(|dir| serde_json::from_value(result[dir.to_str().unwrap()]["with"].clone()).unwrap())
        .collect()
}

#[test]
fn published_tokenizers_encode_as_transformers_does() {
    let texts = texts();
    let names = ["llama3", "qwen3", "gemma3", "llama2"];
    let dirs: Vec<PathBuf> = names
        .iter()
        .map(|name| root().join(".cache/tokenizers").join(name))
        .collect();
    for dir in &dirs {
        assert!(
            dir.join("tokenizer.json").exists(),
            "{} is missing: run scripts/setup.sh",
            dir.display()
        );
    }
    for ((name, dir), theirs) in names.iter().zip(&dirs).zip(transformers_ids(&dirs, &texts)) {
        let ours = TextTokenizer::load(dir).unwrap();
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
    let mut dirs = vec![];
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
            dirs.push(dir);
        }
    }
    for (dir, theirs) in dirs.iter().zip(transformers_ids(&dirs, &texts)) {
        let ours = TextTokenizer::load(dir).unwrap();
        for (text, expected) in texts.iter().zip(theirs) {
            assert_eq!(
                ours.encode(text, true).unwrap(),
                expected,
                "{}: {text:?}",
                dir.file_name().unwrap().to_string_lossy()
            );
        }
    }
}

/// Text tokenizers get wrong: whitespace runs at either end and inside,
/// tabs, CRLF, literal special tokens and `▁`, CJK, emoji with joiners,
/// decomposed accents, right-to-left text, digit runs.
const HOSTILE: &[&str] = &[
    " leading space",
    "  two leading spaces",
    "trailing spaces   ",
    "   ",
    "x",
    "                                 x",
    "tabs\tand\t\ttabs",
    "crlf\r\nlines\r\n\r\n",
    "<s> literal </s> specials <unk> <|endoftext|> <|begin_of_text|> <bos> <|im_start|>",
    "<s>glued</s>",
    "▁literal ▁▁ underline",
    "日本語のテキストと中文和한국어",
    "family 👨‍👩‍👧‍👦 and 🏳️‍🌈 flags 👍🏽",
    "cafe\u{301} nai\u{308}ve A\u{30a}ngstro\u{308}m",
    "العربية עברית mixed with English",
    "12345 and 3.14159 and 1,000,000",
    "def f(x):\n    return x ** 2  # comment",
    "",
];

/// The real tokenizers in model folders of every described family (and of
/// none, and of a model type transformers does not know), named by their
/// own class, by none, by the generic class and by other classes: the
/// pipeline each folder gets (the model type's mapping in the family
/// descriptions, the class named, a byte-level file) encodes the hostile
/// strings to exactly AutoTokenizer's ids, with and without special tokens.
#[test]
fn tokenizers_follow_the_model_type_as_transformers_does() {
    let model_types: Vec<Option<String>> = amalgam_checkpoint::family::families()
        .iter()
        .map(|f| Some(f.model_type.clone()))
        .chain([None, Some("not_a_model_type".into())])
        .collect();
    // (tokenizer, class variants), each an edit of tokenizer_config.json.
    let own = |_: &mut serde_json::Value| {};
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let class =
        |name: &'static str| -> Edit { Box::new(move |c| c["tokenizer_class"] = name.into()) };
    let no_class =
        || -> Edit { Box::new(|c| drop(c.as_object_mut().unwrap().remove("tokenizer_class"))) };
    let variants: Vec<(&str, Vec<(&str, Edit)>)> = vec![
        (
            "llama2",
            vec![
                ("own", Box::new(own)),
                ("none", no_class()),
                ("generic", class("PreTrainedTokenizerFast")),
                ("codellama", class("CodeLlamaTokenizerFast")),
                ("not-legacy", Box::new(|c| c["legacy"] = false.into())),
                (
                    "no-prefix",
                    Box::new(|c| c["add_prefix_space"] = false.into()),
                ),
            ],
        ),
        (
            "llama3",
            vec![
                ("own", Box::new(own)),
                ("llama", class("LlamaTokenizerFast")),
                ("gpt2", class("GPT2Tokenizer")),
                ("neox", class("GPTNeoXTokenizerFast")),
                ("qwen2", class("Qwen2TokenizerFast")),
            ],
        ),
        (
            "qwen3",
            vec![
                ("own", Box::new(own)),
                ("none", no_class()),
                ("generic", class("PreTrainedTokenizerFast")),
            ],
        ),
        ("gemma3", vec![("own", Box::new(own))]),
    ];
    let tmp = tempfile::tempdir().unwrap();
    let mut dirs = vec![];
    for (name, edits) in &variants {
        let source = root().join(".cache/tokenizers").join(name);
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(source.join("tokenizer_config.json")).unwrap())
                .unwrap();
        for (label, edit) in edits {
            // Every model type for a tokenizer's own class; the class
            // variants where the rule can tell them apart.
            let types: Vec<&Option<String>> = match *label {
                "own" => model_types.iter().collect(),
                _ => model_types
                    .iter()
                    .filter(|t| {
                        matches!(
                            t.as_deref(),
                            None | Some("llama" | "mistral" | "qwen2" | "qwen3" | "starcoder2")
                        )
                    })
                    .collect(),
            };
            for model_type in types {
                let dir = tmp.path().join(format!(
                    "{name}-{label}-{}",
                    model_type.as_deref().unwrap_or("no-config")
                ));
                std::fs::create_dir(&dir).unwrap();
                std::fs::copy(source.join("tokenizer.json"), dir.join("tokenizer.json")).unwrap();
                let mut edited = config.clone();
                edit(&mut edited);
                std::fs::write(
                    dir.join("tokenizer_config.json"),
                    serde_json::to_vec(&edited).unwrap(),
                )
                .unwrap();
                if let Some(model_type) = model_type {
                    std::fs::write(
                        dir.join("config.json"),
                        serde_json::json!({ "model_type": model_type }).to_string(),
                    )
                    .unwrap();
                }
                dirs.push(dir);
            }
        }
    }
    let texts: Vec<String> = HOSTILE.iter().map(|t| t.to_string()).collect();
    let spec = tmp.path().join("spec.json");
    std::fs::write(
        &spec,
        serde_json::to_vec(&serde_json::json!({ "dirs": dirs, "texts": texts })).unwrap(),
    )
    .unwrap();
    // transformers in its own process while amalgam encodes here.
    let oracle = std::thread::spawn(move || {
        python_json("tests/oracles/hf_tokenize_dirs.py", &[spec.as_os_str()])
    });
    let ours: Vec<[Vec<Vec<i64>>; 2]> = dirs
        .iter()
        .map(|dir| {
            let tokenizer = TextTokenizer::load(dir).unwrap();
            [true, false].map(|special| {
                texts
                    .iter()
                    .map(|text| tokenizer.encode(text, special).unwrap())
                    .collect()
            })
        })
        .collect();
    let expected = oracle.join().unwrap();
    let mut wrong = vec![];
    let mut compared = 0;
    for (dir, ours) in dirs.iter().zip(&ours) {
        let theirs = &expected[dir.to_str().unwrap()];
        for (encodings, key) in ours.iter().zip(["with", "without"]) {
            let special = key == "with";
            let expected = theirs[key].as_array().unwrap();
            for ((text, ids), encoded) in texts.iter().zip(expected).zip(encodings) {
                let ids: Vec<i64> = serde_json::from_value(ids.clone()).unwrap();
                compared += 1;
                if *encoded != ids {
                    wrong.push(format!(
                        "{} ({}), special tokens {special}: {text:?}",
                        dir.file_name().unwrap().to_string_lossy(),
                        theirs["class"]
                    ));
                }
            }
        }
    }
    assert!(
        wrong.is_empty(),
        "{} of {compared} encodings differ from AutoTokenizer's:\n{}",
        wrong.len(),
        wrong.join("\n")
    );
    eprintln!("{} folders, {compared} encodings, identical", dirs.len());
}

/// Each family description's `tokenizer` is transformers' own mapping for
/// its model type (the class, and whether it replaces the published one).
#[test]
fn family_descriptions_map_tokenizers_as_transformers_does() {
    let families = amalgam_checkpoint::family::families();
    let types: Vec<&str> = families.iter().map(|f| f.model_type.as_str()).collect();
    let theirs = python_json("tests/oracles/hf_tokenizer_mapping.py", &types);
    for family in families {
        let expected = &theirs[&family.model_type];
        let ours = family.tokenizer.as_ref().map(
            |t| serde_json::json!({ "class": t.class, "overrides_config": t.overrides_config }),
        );
        let expected = match expected["class"].is_null() {
            true => None,
            false => Some(expected.clone()),
        };
        assert_eq!(ours, expected, "{}", family.model_type);
    }
}
