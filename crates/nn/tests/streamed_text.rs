//! `eval --text` reads, tokenizes and scores a document a stretch at a time:
//! the tokens a [`DocumentEncoder`] gives are exactly the tokens of the whole
//! document, for the published tokenizers (the pinned files scripts/setup.sh
//! fetches into .cache/tokenizers/) and amalgam's byte tokenizer, however the
//! document is cut into pieces and encodings; what it holds does not grow with
//! the document; [`TextFile`] hands on a file's documents in bounded pieces.

/// Whether this binary may call the Python oracles (no: everyday tier).
const ORACLE_TIER: bool = false;

mod common;

use std::path::{Path, PathBuf};

use amalgam_nn::text::{Chunking, DocumentEncoder, TextFile, TextTokenizer, Token, PIECE_BYTES};
use amalgam_nn::tokenizer;
use common::root;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;

/// The byte tokenizer's files in `dir`.
fn byte_tokenizer(dir: &Path) -> PathBuf {
    let dir = dir.join("bytes");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, contents) in tokenizer::files() {
        std::fs::write(dir.join(name), contents).unwrap();
    }
    dir
}

fn published(name: &str) -> PathBuf {
    let dir = root().join(".cache/tokenizers").join(name);
    assert!(
        dir.join("tokenizer.json").exists(),
        "{} is missing: run scripts/setup.sh",
        dir.display()
    );
    dir
}

/// Documents that tokenizers cut in unusual places: every corpus domain
/// (prose, code, legal text, three languages, three programming languages),
/// long runs of blanks, no line breaks at all, characters of several bytes
/// (split into several tokens by byte fallback), literal special tokens.
fn documents() -> Vec<String> {
    let mut corpus = String::new();
    for domain in [
        "prose", "code", "legal", "german", "spanish", "italian", "c", "perl", "cpp",
    ] {
        let text = amalgam_corpus::text(domain).unwrap();
        let chars: Vec<char> = text.chars().collect();
        corpus.extend(&chars[chars.len() / 3..chars.len() / 3 + 12_000]);
    }
    let words: Vec<&str> = corpus.split_whitespace().take(3000).collect();
    vec![
        corpus.clone(),
        format!(
            "  leading blanks\n{}\n\n\n\n{}\t\t\t{}\r\n\r\n{}",
            " ".repeat(3000),
            "\n".repeat(2500),
            " \t".repeat(900),
            &corpus[..20_000]
        ),
        words.join(" "),
        words.concat(),
        "日本語のテキスト、한국어, العربية 🙂👍🏽 e\u{301} ".repeat(400),
        "<s> looks special </s> <|endoftext|> <bos><eos>\n".repeat(300),
        "x".repeat(5000),
        " ".to_owned(),
        String::new(),
    ]
}

/// `text` through a [`DocumentEncoder`], handed over in pieces of random
/// sizes (at character boundaries).
fn streamed(tokenizer: &TextTokenizer, text: &str, chunking: Chunking, seed: u64) -> Vec<Token> {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut encoder = DocumentEncoder::new(tokenizer, chunking);
    let mut tokens = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let mut cut = rng.random_range(1..=rest.len().min(3 * chunking.chunk));
        while !rest.is_char_boundary(cut) {
            cut += 1;
        }
        encoder.push(&rest[..cut], &mut tokens).unwrap();
        rest = &rest[cut..];
    }
    encoder.finish(&mut tokens).unwrap();
    tokens
}

#[test]
fn streamed_tokens_are_the_whole_documents_tokens() {
    let tmp = tempfile::tempdir().unwrap();
    let tokenizers = [
        ("bytes", byte_tokenizer(tmp.path())),
        ("llama2", published("llama2")),
        ("llama3", published("llama3")),
        ("qwen3", published("qwen3")),
        ("gemma3", published("gemma3")),
    ];
    let chunkings = [
        // Cuts every few words, agreeing on few tokens: the encodings often
        // disagree and are redone over more text.
        Chunking {
            chunk: 61,
            overlap: 23,
            max_held: 64 << 10,
            agree: 2,
        },
        Chunking {
            chunk: 700,
            overlap: 160,
            max_held: 64 << 10,
            agree: 6,
        },
        Chunking {
            chunk: 9000,
            overlap: 2000,
            max_held: 256 << 10,
            agree: 16,
        },
    ];
    let documents = documents();
    let mut naive_differs = Vec::new();
    for (name, dir) in &tokenizers {
        let tokenizer = TextTokenizer::load(dir).unwrap();
        let mut cuts = 0;
        // Encoding each stretch on its own (after a line break) is not the same.
        let corpus = &documents[0];
        let naive: Vec<i64> = corpus
            .split_inclusive('\n')
            .flat_map(|line| tokenizer.encode(line, false).unwrap())
            .collect();
        if naive != tokenizer.encode(corpus, false).unwrap() {
            naive_differs.push(*name);
        }
        for (d, document) in documents.iter().enumerate() {
            let whole = tokenizer.encode_at(document, 0).unwrap();
            assert_eq!(
                whole.iter().map(|t| t.id).collect::<Vec<_>>(),
                tokenizer.encode(document, false).unwrap()
            );
            for (c, chunking) in chunkings.iter().enumerate() {
                let tokens = streamed(&tokenizer, document, *chunking, (d * 10 + c) as u64);
                if let Some(k) = (0..whole.len().min(tokens.len())).find(|&k| whole[k] != tokens[k])
                {
                    panic!(
                        "{name}, document {d}, chunking {c}: token {k} differs: {:?} streamed, \
                         {:?} whole, at {:?}",
                        &tokens[k..(k + 4).min(tokens.len())],
                        &whole[k..(k + 4).min(whole.len())],
                        &document[whole[k].start.saturating_sub(20)..whole[k].end + 20]
                    );
                }
                assert_eq!(
                    tokens.len(),
                    whole.len(),
                    "{name}, document {d}, chunking {c}"
                );
                cuts += document.len() / chunking.chunk;
            }
        }
        eprintln!("{name}: every document's tokens identical over {cuts} cuts");
    }
    assert_eq!(naive_differs, ["llama2", "llama3", "qwen3", "gemma3"]);
}

/// What an encoder holds stays within a bound set by its chunking, for a
/// document 64 times as long as what it holds; a document whose tokens would
/// need more text held is an error, not unbounded memory.
#[test]
fn an_encoder_holds_a_bounded_stretch_of_a_long_document() {
    let tokenizer = TextTokenizer::load(&published("qwen3")).unwrap();
    let chunking = Chunking {
        chunk: 16 << 10,
        overlap: 2 << 10,
        max_held: 64 << 10,
        agree: 16,
    };
    let prose = amalgam_corpus::text("prose").unwrap();
    let mut encoder = DocumentEncoder::new(&tokenizer, chunking);
    let (mut tokens, mut most, mut count) = (Vec::new(), 0, 0);
    let mut pushed = 0;
    while pushed < 64 * chunking.max_held {
        for line in prose.lines().take(400) {
            encoder.push(line, &mut tokens).unwrap();
            encoder.push("\n", &mut tokens).unwrap();
            pushed += line.len() + 1;
            most = most.max(encoder.held_bytes());
            count += tokens.len();
            tokens.clear();
        }
    }
    encoder.finish(&mut tokens).unwrap();
    assert!(count + tokens.len() > pushed / 8, "{count} tokens");
    let bound = (chunking.max_held + chunking.chunk) * (1 + std::mem::size_of::<Token>());
    assert!(
        most <= bound,
        "held {most} bytes for a {pushed}-byte document (bound {bound})"
    );
    assert!((chunking.memory_bytes() as usize) >= bound);

    // A word longer than may be held, for a tokenizer that makes one token
    // of each word: there is no place to cut it.
    let dir = tempfile::tempdir().unwrap();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": {"<unk>": 0, "a": 1}, "unk_token": "<unk>"},
    });
    std::fs::write(
        dir.path().join("tokenizer.json"),
        serde_json::to_vec(&tokenizer).unwrap(),
    )
    .unwrap();
    let words = TextTokenizer::load(dir.path()).unwrap();
    let strict = Chunking {
        chunk: 1 << 10,
        overlap: 256,
        max_held: 16 << 10,
        agree: 4,
    };
    let mut encoder = DocumentEncoder::new(&words, strict);
    let mut failed = None;
    for _ in 0..100 {
        if let Err(e) = encoder.push(&"x".repeat(1000), &mut tokens) {
            failed = Some(e.to_string());
            break;
        }
        let bound = 2 * (strict.max_held + strict.chunk) * (1 + std::mem::size_of::<Token>());
        assert!(encoder.held_bytes() <= bound);
    }
    let message = failed.expect("an error once 16 KB are held");
    assert!(message.contains("no place to cut"), "{message}");
    // Words of a few hundred bytes are cut between, however few fit an overlap.
    let mut encoder = DocumentEncoder::new(&words, strict);
    let (mut streamed, mut whole) = (Vec::new(), String::new());
    for k in 0..400 {
        let word = format!("{} ", "a".repeat(100 + (k * 37) % 700));
        encoder.push(&word, &mut streamed).unwrap();
        whole.push_str(&word);
    }
    encoder.finish(&mut streamed).unwrap();
    assert_eq!(streamed, words.encode_at(&whole, 0).unwrap());
}

/// A plain file is one document and a `.jsonl` file one per non-blank line,
/// handed on in pieces of at most `PIECE_BYTES` cut at character boundaries
/// (a character of several bytes across a read included) that make up the
/// documents exactly; broken files are refused by scan, naming the place.
#[test]
fn text_files_are_read_in_bounded_pieces() {
    let tmp = tempfile::tempdir().unwrap();
    // 2.5 pieces of text whose multi-byte characters straddle the reads.
    let unit = "ab€ 🙂\n";
    let text = unit.repeat(5 * PIECE_BYTES / 2 / unit.len() + 3);
    let plain = tmp.path().join("doc.txt");
    std::fs::write(&plain, &text).unwrap();
    let file = TextFile::scan(&plain, "text").unwrap();
    assert_eq!(
        (file.file_bytes, file.document_bytes, file.documents),
        (text.len() as u64, text.len() as u64, 1)
    );
    let mut pieces = Vec::new();
    file.read(&mut |piece| {
        assert!(piece.text.len() <= PIECE_BYTES);
        pieces.push((piece.text.to_owned(), piece.first, piece.last, piece.read));
        Ok(true)
    })
    .unwrap();
    assert!(pieces.len() >= 3);
    assert_eq!(
        pieces.iter().map(|p| p.0.as_str()).collect::<String>(),
        text
    );
    assert!(pieces[0].1 && pieces.iter().skip(1).all(|p| !p.1));
    assert!(pieces.last().unwrap().2 && pieces.iter().rev().skip(1).all(|p| !p.2));
    assert_eq!(pieces.last().unwrap().3, text.len() as u64);

    let jsonl = tmp.path().join("docs.jsonl");
    let long = "ü".repeat(PIECE_BYTES);
    let lines = [
        serde_json::json!({"body": "first", "n": 1}).to_string(),
        "   ".to_owned(),
        serde_json::json!({"body": long}).to_string(),
        serde_json::json!({"body": ""}).to_string(),
    ];
    std::fs::write(&jsonl, lines.join("\r\n") + "\n\n").unwrap();
    let file = TextFile::scan(&jsonl, "body").unwrap();
    assert_eq!(file.documents, 3);
    assert_eq!(file.document_bytes, (5 + long.len()) as u64);
    assert!(file.longest_line as usize > long.len());
    let mut documents: Vec<String> = Vec::new();
    file.read(&mut |piece| {
        assert!(piece.text.len() <= PIECE_BYTES);
        if piece.first {
            documents.push(String::new());
        }
        documents.last_mut().unwrap().push_str(piece.text);
        Ok(true)
    })
    .unwrap();
    assert_eq!(documents, ["first", long.as_str(), ""]);

    for (name, contents, needle) in [
        (
            "bad.jsonl",
            b"{\"body\": \"x\"}\n{\"text\": \"y\"}\n".to_vec(),
            "bad.jsonl:2: no string field \"body\"",
        ),
        (
            "json.jsonl",
            b"{\"body\": \"x\"}\n\nnot json\n".to_vec(),
            "json.jsonl:3: not a JSON line",
        ),
        (
            "utf8.txt",
            [text.as_bytes(), b"\xff tail"].concat(),
            &format!("not UTF-8 text (an invalid byte at offset {})", text.len()),
        ),
    ] {
        let path = tmp.path().join(name);
        std::fs::write(&path, contents).unwrap();
        let message = TextFile::scan(&path, "body").unwrap_err().to_string();
        assert!(message.contains(needle), "{message}");
    }
}
