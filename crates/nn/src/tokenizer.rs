//! The byte-level tokenizer every zoo model uses: token ids 0–255 are the
//! bytes of UTF-8 text, 256 is `<bos>` and 257 `<eos>` (written between
//! documents). No merges, so any text round-trips and no vocabulary is
//! trained. It is saved beside each model as a `tokenizers` JSON file (a BPE
//! with an empty merge list over GPT-2's byte-to-character alphabet) that
//! `transformers`' `AutoTokenizer` loads and that encodes text to the same ids.

use serde_json::{json, Map, Value};

pub const BOS: i64 = 256;
pub const EOS: i64 = 257;
pub const VOCAB_SIZE: usize = 258;

pub fn encode(text: &str) -> Vec<i64> {
    text.bytes().map(i64::from).collect()
}

/// The text of byte tokens (special tokens dropped; invalid UTF-8 replaced).
pub fn decode(ids: &[i64]) -> String {
    let bytes: Vec<u8> = ids.iter().filter_map(|&id| u8::try_from(id).ok()).collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// GPT-2's reversible map from bytes to printable characters, which the
/// `ByteLevel` pre-tokenizer applies before the vocabulary lookup.
fn byte_to_char(byte: u8) -> char {
    let printable = |b: u8| matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
    if printable(byte) {
        return char::from(byte);
    }
    let shifted = (0..byte).filter(|&b| !printable(b)).count() as u32;
    char::from_u32(256 + shifted).expect("a valid code point")
}

/// `tokenizer.json` and `tokenizer_config.json` for a model directory.
pub fn files() -> Vec<(&'static str, Vec<u8>)> {
    let vocab: Map<String, Value> = (0..=255u8)
        .map(|b| (byte_to_char(b).to_string(), json!(b)))
        .collect();
    let special = |id: i64, content: &str| {
        json!({"id": id, "content": content, "single_word": false, "lstrip": false,
               "rstrip": false, "normalized": false, "special": true})
    };
    let byte_level = json!({"type": "ByteLevel", "add_prefix_space": false,
                            "trim_offsets": false, "use_regex": false});
    let tokenizer = json!({
        "version": "1.0",
        "truncation": null,
        "padding": null,
        "added_tokens": [special(BOS, "<bos>"), special(EOS, "<eos>")],
        "normalizer": null,
        "pre_tokenizer": byte_level,
        "post_processor": null,
        "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": null,
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": []},
    });
    let config = json!({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<bos>",
        "eos_token": "<eos>",
        "clean_up_tokenization_spaces": false,
        "model_max_length": 1_000_000,
    });
    let generation = json!({"bos_token_id": BOS, "eos_token_id": EOS});
    let pretty = |v: &Value| serde_json::to_vec_pretty(v).expect("JSON serialises");
    vec![
        ("tokenizer.json", pretty(&tokenizer)),
        ("tokenizer_config.json", pretty(&config)),
        ("generation_config.json", pretty(&generation)),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_the_alphabet_is_a_bijection() {
        let text = "def f(x):\n\treturn x ≥ 0 — «ok»";
        assert_eq!(decode(&encode(text)), text);
        let chars: std::collections::BTreeSet<char> = (0..=255u8).map(byte_to_char).collect();
        assert_eq!(chars.len(), 256);
        assert_eq!(byte_to_char(b' '), 'Ġ');
        assert_eq!(byte_to_char(b'\n'), 'Ċ');
    }
}
