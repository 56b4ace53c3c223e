//! Work bounded by stated limits, refused at the line or file that asks for
//! more: a tokenizer's added tokens (the `tokenizers` library's matcher is
//! quadratic in a token's length: one 64 KB token took minutes in a union),
//! the tokens a union or a recipe's `tokens:` add, and the prompts a hidden-
//! state MoE gate runs through the base (a 3 MB prompt took minutes and
//! gigabytes).

mod common;

use std::path::{Path, PathBuf};

use amalgam_checkpoint::{ModelCard, ModelDir, MAX_ADDED_TOKEN_BYTES};
use amalgam_merge::executor::MergeJob;
use amalgam_merge::moe::{Moe, MAX_HIDDEN_PROMPT_TOKENS};
use amalgam_recipe::{MoeRecipe, Recipe};
use serde_json::{json, Value};

/// A small Llama over the byte vocabulary, with amalgam's byte tokenizer,
/// saved as `dir/name`.
fn model(dir: &Path, name: &str, seed: u64) -> PathBuf {
    let out = dir.join(name);
    common::structured_model(common::config(false, vec![16, 16]), seed, 1.0)
        .save_with_tokenizer(&out, &ModelCard::default())
        .unwrap();
    out
}

fn tokenizer_json(dir: &Path) -> Value {
    serde_json::from_slice(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap()
}

fn write_json(dir: &Path, value: &Value) {
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(value).unwrap(),
    )
    .unwrap();
}

/// A token that repeats itself: the matcher's worst case.
fn long_token(bytes: usize) -> String {
    "a".repeat(bytes)
}

#[test]
fn a_tokenizer_with_a_long_added_token_is_refused_on_reading() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = model(tmp.path(), "m", 1);
    let mut tokenizer = tokenizer_json(&dir);
    let added = |content: String| {
        json!({"id": 258, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let tokens = tokenizer["added_tokens"].as_array_mut().unwrap();
    tokens.push(added(long_token(MAX_ADDED_TOKEN_BYTES)));
    write_json(&dir, &tokenizer);
    let files = ModelDir::new(&dir).unwrap();
    assert!(files.tokenizer().unwrap().is_some(), "at the limit: read");

    tokenizer["added_tokens"][2] = added(long_token(4 * MAX_ADDED_TOKEN_BYTES));
    write_json(&dir, &tokenizer);
    let message = files.tokenizer().unwrap_err().to_string();
    let file = dir.join("tokenizer.json").display().to_string();
    assert!(
        message.starts_with(&file)
            && message.contains("added token id 258 is 4096 bytes long")
            && message.contains(&format!("at most {MAX_ADDED_TOKEN_BYTES} bytes")),
        "{message}"
    );
}

/// `recipe` over models `a` (the base) and `b` in `dir`.
fn prepare(dir: &Path, tail: &str) -> Result<(), String> {
    let text = format!(
        "merge_method: linear\nbase_model: {a}\nmodels:\n  - model: {a}\n    parameters: \
         {{weight: 0.5}}\n  - model: {b}\n    parameters: {{weight: 0.5}}\n{tail}",
        a = dir.join("a").display(),
        b = dir.join("b").display()
    );
    let recipe = Recipe::parse(&text, "r.yml").map_err(|e| e.to_string())?;
    let method = amalgam_merge::registry::per_tensor("linear").unwrap();
    MergeJob::prepare(recipe, method)
        .map(drop)
        .map_err(|e| e.to_string())
}

#[test]
fn a_union_refuses_to_add_a_long_token() {
    let tmp = tempfile::tempdir().unwrap();
    model(tmp.path(), "a", 1);
    let b = model(tmp.path(), "b", 2);
    assert!(prepare(tmp.path(), "tokenizer_source: union\n").is_ok());
    // Model b's plain token 100 is long; the base has no such token, so a
    // union would add it.
    let mut tokenizer = tokenizer_json(&b);
    let vocab = tokenizer["model"]["vocab"].as_object_mut().unwrap();
    let byte = vocab
        .iter()
        .find(|(_, id)| **id == json!(100))
        .map(|(t, _)| t.clone())
        .unwrap();
    vocab.remove(&byte);
    vocab.insert(long_token(4 * MAX_ADDED_TOKEN_BYTES), json!(100));
    write_json(&b, &tokenizer);
    let message = prepare(tmp.path(), "tokenizer_source: union\n").unwrap_err();
    let file = b.join("tokenizer.json").display().to_string();
    assert!(
        message.starts_with(&file)
            && message.contains("token id 100, 4096 bytes long")
            && message.contains(&format!("at most {MAX_ADDED_TOKEN_BYTES} bytes")),
        "{message}"
    );

    // A recipe's token rule adds its token too: refused at its line.
    // An explicit key (`? KEY`): YAML's implicit keys stop at 1024 characters.
    let rule = |token: &str| {
        format!(
            "tokenizer:\n  source: base\n  tokens:\n    ? {token}\n    : {{source: {{kind: zero}}}}\n"
        )
    };
    assert!(prepare(tmp.path(), &rule("brand_new")).is_ok());
    let message = prepare(tmp.path(), &rule(&long_token(4 * MAX_ADDED_TOKEN_BYTES))).unwrap_err();
    assert!(
        message.starts_with("r.yml:11:7: this token is 4096 bytes long"),
        "{}",
        &message[..message.len().min(300)]
    );
}

#[test]
fn hidden_state_gates_refuse_prompts_beyond_the_token_limit() {
    let tmp = tempfile::tempdir().unwrap();
    let dirs: Vec<PathBuf> = (0..3)
        .map(|i| model(tmp.path(), &format!("m{i}"), i))
        .collect();
    let config = |prompt: &str| {
        format!(
            "base_model: {}\ngate_mode: hidden\nexperts:\n  - source_model: {}\n    \
             positive_prompts: [\"code\"]\n  - source_model: {}\n    positive_prompts:\n      \
             - \"prose\"\n      - \"{prompt}\"\n",
            dirs[0].display(),
            dirs[1].display(),
            dirs[2].display()
        )
    };
    let gates = |prompt: &str| {
        let recipe = MoeRecipe::parse(&config(prompt), "moe.yml").unwrap();
        let moe = Moe::open(&recipe).unwrap();
        moe.gates(0).map(|g| g.size()).map_err(|e| e.to_string())
    };
    assert_eq!(gates("poetry").unwrap(), [2, 2, 24]);
    // The byte tokenizer: one token per byte, after the BOS token.
    let message = gates(&"x".repeat(MAX_HIDDEN_PROMPT_TOKENS)).unwrap_err();
    assert!(
        message.starts_with(&format!(
            "moe.yml:9:9: this prompt is {} tokens with the base's tokenizer",
            MAX_HIDDEN_PROMPT_TOKENS + 1
        )) && message.contains(&format!("at most {MAX_HIDDEN_PROMPT_TOKENS} tokens")),
        "{}",
        &message[..message.len().min(300)]
    );
}
