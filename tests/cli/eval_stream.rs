//! `amalgam eval --text` reads, tokenizes and scores a file a stretch at a
//! time: its scores are exactly those of tokenizing every document whole and
//! scoring all its windows at once (the way eval scored text before, kept
//! here as the oracle), in memory that does not grow with the file; its
//! memory estimate counts the text; a config claiming absurd sizes, and
//! libtorch failing to allocate, are errors (exit status 1), never an abort
//! or a panic. No Python: models come from `amalgam synth`, with amalgam's
//! byte tokenizer (or a word-level one) beside them.

use crate::common;

use std::ffi::OsStr;
use std::io::Read;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use amalgam_nn::eval::{LanguageModel, Window, NOT_SCORED};
use amalgam_nn::text::TextTokenizer;
use amalgam_nn::Decoder;
use common::*;
use serde_json::{json, Value};
use tch::{Kind, Tensor};

/// A one-layer Llama of width 32 and a fine-tune of it, with amalgam's byte
/// tokenizer.
fn tiny_models(dir: &Path) -> (PathBuf, PathBuf) {
    synth(
        &dir.join("f"),
        &[
            "--finetunes",
            "1",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--intermediate",
            "32",
        ],
    );
    let (base, tuned) = (dir.join("f/base"), dir.join("f/finetune-1"));
    for model in [&base, &tuned] {
        for (name, contents) in amalgam_nn::tokenizer::files() {
            std::fs::write(model.join(name), contents).unwrap();
        }
    }
    (base, tuned)
}

/// Lines of corpus prose, shuffled into `bytes` of text.
fn prose(bytes: usize) -> String {
    let corpus = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("crates/corpus/texts/prose.txt"),
    )
    .unwrap();
    let lines: Vec<&str> = corpus.lines().filter(|l| !l.trim().is_empty()).collect();
    let mut text = String::with_capacity(bytes + 4096);
    let mut k = 0usize;
    while text.len() < bytes {
        text.push_str(lines[(k * 7919) % lines.len()]);
        text.push('\n');
        k += 1;
    }
    text
}

/// One document's windows, as eval cut them from the whole document before
/// it streamed (lm-evaluation-harness's rolling log-likelihood).
fn whole_document_windows(doc: &[i64], prefix: i64, max_len: usize, context: usize) -> Vec<Window> {
    let step = max_len + 1 - context.clamp(1, max_len);
    let first = doc.len().min(max_len);
    if first == 0 {
        return Vec::new();
    }
    let mut input = vec![prefix];
    input.extend_from_slice(&doc[..first - 1]);
    let mut windows = vec![Window {
        input,
        targets: doc[..first].to_vec(),
    }];
    let mut predicted = first;
    while predicted < doc.len() {
        let count = (doc.len() - predicted).min(step);
        let end = predicted + count;
        let input = doc[end - 1 - max_len..end - 1].to_vec();
        let mut targets = vec![NOT_SCORED; max_len - count];
        targets.extend_from_slice(&doc[predicted..end]);
        windows.push(Window { input, targets });
        predicted = end;
    }
    windows
}

/// The scores of all `windows` at once, as eval computed them before it
/// streamed: sorted by length, `batch` at a time, summed in that order.
fn all_at_once(
    model: &Decoder,
    reference: &Decoder,
    windows: &[Window],
    batch: usize,
    bytes: usize,
) -> Value {
    let (mut loss_sum, mut correct, mut count) = (0.0, 0i64, 0i64);
    let (mut agreeing, mut kl_sum) = (0i64, 0.0);
    let mut order: Vec<&Window> = windows.iter().collect();
    order.sort_by_key(|w| w.input.len());
    let groups = order
        .chunk_by(|a, b| a.input.len() == b.input.len())
        .flat_map(|same| same.chunks(batch));
    tch::no_grad(|| {
        for group in groups {
            let len = group[0].input.len() as i64;
            let stack = |rows: Vec<&[i64]>| {
                Tensor::from_slice(&rows.concat()).view([group.len() as i64, len])
            };
            let ids = stack(group.iter().map(|w| w.input.as_slice()).collect());
            let targets = stack(group.iter().map(|w| w.targets.as_slice()).collect()).reshape([-1]);
            let scored = targets.ne(NOT_SCORED);
            let vocab = model.vocab_size() as i64;
            let logits = model.logits(&ids).reshape([-1, vocab]);
            loss_sum += logits
                .cross_entropy_loss::<Tensor>(&targets, None, tch::Reduction::Sum, NOT_SCORED, 0.0)
                .double_value(&[]);
            let predicted = logits.argmax(-1, false);
            correct += predicted
                .eq_tensor(&targets)
                .logical_and(&scored)
                .sum(Kind::Int64)
                .int64_value(&[]);
            let theirs = reference.logits(&ids).reshape([-1, vocab]);
            agreeing += predicted
                .eq_tensor(&theirs.argmax(-1, false))
                .logical_and(&scored)
                .sum(Kind::Int64)
                .int64_value(&[]);
            let rows = scored.nonzero().squeeze_dim(1);
            let (p_log, q_log) = (
                theirs.index_select(0, &rows).log_softmax(-1, Kind::Double),
                logits.index_select(0, &rows).log_softmax(-1, Kind::Double),
            );
            kl_sum += (p_log.exp() * (&p_log - q_log))
                .sum(Kind::Double)
                .double_value(&[]);
            count += scored.sum(Kind::Int64).int64_value(&[]);
        }
    });
    let count = count.max(1) as f64;
    let loss = loss_sum / count;
    json!({
        "tokens": count as usize,
        "loss": loss,
        "perplexity": loss.exp(),
        "accuracy": correct as f64 / count,
        "bits_per_byte": loss * count / (bytes as f64 * std::f64::consts::LN_2),
        "agreement": agreeing as f64 / count,
        "kl": kl_sum / count,
    })
}

/// `amalgam eval MODEL --reference REFERENCE --text FILE … --json`: what it prints.
fn eval_json(model: &Path, reference: &Path, file: &Path, extra: &[&str]) -> String {
    let mut args: Vec<&OsStr> = vec![
        "eval".as_ref(),
        model.as_os_str(),
        "--reference".as_ref(),
        reference.as_os_str(),
        "--text".as_ref(),
        file.as_os_str(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(OsStr::new));
    ok(args)
}

/// `printed` (eval's JSON) holds exactly the `expected` scores. Numbers are
/// compared as printed (the shortest text that reads back as the same
/// `f64`): serde_json's parser may read such text one unit in the last
/// place off.
fn assert_scores(printed: &str, expected: &Value) {
    let parsed: Value = serde_json::from_str(printed).unwrap();
    let mut keys: Vec<&String> = parsed[0]["domains"][0]
        .as_object()
        .unwrap()
        .keys()
        .collect();
    keys.retain(|k| *k != "domain");
    keys.sort();
    let mut wanted: Vec<&String> = expected.as_object().unwrap().keys().collect();
    wanted.sort();
    assert_eq!(keys, wanted);
    for (key, value) in expected.as_object().unwrap() {
        assert!(
            printed.contains(&format!("\"{key}\": {value},"))
                || printed.contains(&format!("\"{key}\": {value}\n")),
            "{key}: {value} expected, eval printed {printed}"
        );
    }
}

/// Plain text longer than one stretch of tokenization (64 KB), and JSON lines
/// of documents of many lengths (short ones make windows of many lengths,
/// batched by length): eval's scores, with a reference, are bit for bit those
/// of tokenizing each document whole and scoring all windows at once; with
/// --max-windows, those of the first windows, bits per byte over the bytes
/// they score.
#[test]
fn streamed_scores_are_the_whole_texts_scores_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, tuned) = tiny_models(tmp.path());
    let model = Decoder::load(&base, tch::Device::Cpu).unwrap();
    let reference = Decoder::load(&tuned, tch::Device::Cpu).unwrap();
    let tokenizer = TextTokenizer::load(&base).unwrap();
    let prefix = tokenizer.prefix_token().unwrap();

    let plain = tmp.path().join("plain.txt");
    let text = format!("Ünïcödé — «first»\n{}", prose(70_000));
    std::fs::write(&plain, &text).unwrap();
    let doc = tokenizer.encode(&text, false).unwrap();
    let windows = whole_document_windows(&doc, prefix, 256, 1);
    assert_scores(
        &eval_json(
            &base,
            &tuned,
            &plain,
            &["--seq-len", "257", "--batch", "64"],
        ),
        &all_at_once(&model, &reference, &windows, 64, text.len()),
    );
    let first = &windows[..5];
    let scored: usize = first
        .iter()
        .map(|w| w.targets.iter().filter(|&&t| t != NOT_SCORED).count())
        .sum();
    // Bits per byte over the bytes up to the end of the last token scored.
    let scored_bytes = tokenizer.encode_at(&text, 0).unwrap()[scored - 1].end;
    assert_scores(
        &eval_json(
            &base,
            &tuned,
            &plain,
            &["--seq-len", "257", "--batch", "2", "--max-windows", "5"],
        ),
        &all_at_once(&model, &reference, first, 2, scored_bytes),
    );

    let jsonl = tmp.path().join("docs.jsonl");
    let lines = prose(6_000);
    let documents: Vec<&str> = lines
        .split(['.', '\n'])
        .filter(|d| !d.trim().is_empty())
        .take(60)
        .collect();
    let records: Vec<String> = documents
        .iter()
        .map(|d| json!({"id": 1, "body": d}).to_string())
        .collect();
    std::fs::write(&jsonl, records.join("\n") + "\n\n").unwrap();
    let windows: Vec<Window> = documents
        .iter()
        .flat_map(|d| whole_document_windows(&tokenizer.encode(d, false).unwrap(), prefix, 32, 8))
        .collect();
    assert!(windows.iter().any(|w| w.input.len() < 32));
    let bytes = documents.iter().map(|d| d.len()).sum();
    assert_scores(
        &eval_json(
            &base,
            &tuned,
            &jsonl,
            &[
                "--field",
                "body",
                "--seq-len",
                "33",
                "--stride",
                "8",
                "--batch",
                "3",
            ],
        ),
        &all_at_once(&model, &reference, &windows, 3, bytes),
    );
}

/// A run of the binary under an address-space limit: its exit code (`None`
/// when a signal ended it), stdout, stderr and peak resident memory.
struct Run {
    code: Option<i32>,
    stdout: String,
    stderr: String,
    peak_rss: u64,
}

fn run_limited(args: &[&OsStr], address_space: u64) -> Run {
    let mut command = Command::new(env!("CARGO_BIN_EXE_amalgam"));
    command
        .args(args)
        .arg("-q")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: setrlimit is async-signal-safe; the closure allocates nothing.
    unsafe {
        command.pre_exec(move || {
            let limit = libc::rlimit {
                rlim_cur: address_space,
                rlim_max: address_space,
            };
            match libc::setrlimit(libc::RLIMIT_AS, &limit) {
                0 => Ok(()),
                _ => Err(std::io::Error::last_os_error()),
            }
        });
    }
    // Reaped by wait4 below, which gives its resource usage too.
    #[allow(clippy::zombie_processes)]
    let mut child = command.spawn().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let errors = std::thread::spawn(move || {
        let mut text = String::new();
        stderr.read_to_string(&mut text).unwrap();
        text
    });
    let mut stdout = String::new();
    child
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut stdout)
        .unwrap();
    // wait4 rather than Child::wait: the child's own resource usage.
    let (mut status, mut usage) = (0, unsafe { std::mem::zeroed::<libc::rusage>() });
    let pid = child.id() as libc::pid_t;
    // SAFETY: waits for our own child, writing the status and usage given.
    assert_eq!(unsafe { libc::wait4(pid, &mut status, 0, &mut usage) }, pid);
    Run {
        code: libc::WIFEXITED(status).then(|| libc::WEXITSTATUS(status)),
        stdout,
        stderr: errors.join().unwrap(),
        peak_rss: usage.ru_maxrss as u64 * 1024,
    }
}

const GB: u64 = 1 << 30;

/// A model, what a text for it is made of (the `k`th unit), eval's flags.
type Case<'a> = (&'a Path, &'a dyn Fn(usize) -> String, &'a [&'a str]);

/// A word-level tokenizer (words split at whitespace) over `words`, with
/// `<bos>` and `<unk>`.
fn word_tokenizer(dir: &Path, words: &[String]) {
    let mut vocab = serde_json::Map::new();
    vocab.insert("<bos>".into(), 0.into());
    vocab.insert("<unk>".into(), 1.into());
    for (i, word) in words.iter().enumerate() {
        vocab.insert(word.clone(), (i + 2).into());
    }
    let tokenizer = json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": [{"id": 0, "content": "<bos>", "single_word": false, "lstrip": false,
                          "rstrip": false, "normalized": false, "special": true}],
        "normalizer": null, "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": null, "decoder": null,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    });
    std::fs::write(
        dir.join("tokenizer.json"),
        serde_json::to_vec(&tokenizer).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("tokenizer_config.json"),
        r#"{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<bos>"}"#,
    )
    .unwrap();
}

/// Tens of MB of text scored in the memory a small file takes (eval held
/// about 190 bytes per byte of text before it streamed: 4.5 GB for these 24
/// MB): read to its end (long words: few tokens to score, all 24 MB
/// tokenized), and its start with --max-windows, which stops reading.
#[test]
fn a_large_text_is_scored_in_bounded_memory() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = tiny_models(tmp.path());
    let words: Vec<String> = (0..300)
        .map(|k| format!("{k}{}", "abcdefghij".repeat(100 + k % 200)))
        .collect();
    let worded = tmp.path().join("worded");
    copy_dir(&base, &worded);
    word_tokenizer(&worded, &words);
    let write = |name: &str, bytes: usize, unit: &dyn Fn(usize) -> String| -> PathBuf {
        let path = tmp.path().join(name);
        let mut text = String::with_capacity(bytes + 4096);
        let mut k = 0;
        while text.len() < bytes {
            text.push_str(&unit(k));
            k += 1;
        }
        std::fs::write(&path, text).unwrap();
        path
    };
    let sentence = prose(1 << 20);
    let prose_unit = |_: usize| sentence.clone();
    let word_unit = |k: usize| {
        let word = &words[(k * 31) % words.len()];
        format!("{word}{}", if k % 8 == 7 { "\n" } else { " " })
    };
    let cases: [Case; 2] = [
        (
            &base,
            &prose_unit,
            &["--max-windows", "4", "--seq-len", "65"],
        ),
        (&worded, &word_unit, &["--seq-len", "33", "--batch", "8"]),
    ];
    for (k, (model, unit, extra)) in cases.into_iter().enumerate() {
        let mut peaks = Vec::new();
        for (size, bytes) in [("small", 1 << 20), ("large", 24 << 20)] {
            let file = write(&format!("{size}-{k}.txt"), bytes, unit);
            let mut args: Vec<&OsStr> = vec![
                "eval".as_ref(),
                model.as_os_str(),
                "--text".as_ref(),
                file.as_os_str(),
                "--json".as_ref(),
            ];
            args.extend(extra.iter().map(OsStr::new));
            let run = run_limited(&args, 4 * GB);
            assert_eq!(run.code, Some(0), "{size} text, case {k}: {}", run.stderr);
            let score: Value = serde_json::from_str(&run.stdout).unwrap();
            let tokens = score[0]["domains"][0]["tokens"].as_u64().unwrap();
            match k {
                0 => assert_eq!(tokens, 4 * 64),
                _ => assert!(tokens > bytes as u64 / 4_000, "{tokens} words"),
            }
            peaks.push(run.peak_rss);
        }
        eprintln!(
            "case {k}: peak RSS {} MB for 1 MB, {} MB for 24 MB",
            peaks[0] >> 20,
            peaks[1] >> 20
        );
        assert!(
            peaks[1] < peaks[0] + (96 << 20),
            "case {k}: peak RSS {} MB for 24 MB of text, {} MB for 1 MB",
            peaks[1] >> 20,
            peaks[0] >> 20
        );
    }
}

/// --max-memory counts what scoring text holds (reading, tokenizing,
/// windows) and the process itself, not only the weights and forward pass.
#[test]
fn the_memory_estimate_counts_the_text() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = tiny_models(tmp.path());
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, prose(2_000)).unwrap();
    let eval = |cap: &str| {
        amalgam([
            "eval".as_ref(),
            base.as_os_str(),
            "--text".as_ref(),
            text.as_os_str(),
            "--max-memory".as_ref(),
            cap.as_ref(),
        ])
    };
    let refused = eval("300MB");
    let message = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(1), "{message}");
    assert!(message.contains("needs about"), "{message}");
    assert!(eval("2GB").status.success());
}

/// A config claiming 10¹² layers is refused before anything is made per
/// layer; weights libtorch cannot allocate (a sparse checkpoint of 768 GB,
/// --max-memory set past the estimate) and a forward pass it cannot
/// allocate are errors with libtorch's reason, exit status 1.
#[test]
fn absurd_sizes_and_failed_allocations_are_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = tiny_models(tmp.path());
    let layers = tmp.path().join("layers");
    copy_dir(&base, &layers);
    edit_json(&layers.join("config.json"), |c| {
        c["num_hidden_layers"] = 1_000_000_000_000u64.into()
    });
    let run = run_limited(&["eval".as_ref(), layers.as_os_str()], 16 * GB);
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr
            .contains("`num_hidden_layers` is 1000000000000, more than amalgam runs"),
        "{}",
        run.stderr
    );

    // The checkpoint's embedding and head of 1.5·10⁹ rows, all zeros, sparse.
    let huge = tmp.path().join("huge");
    std::fs::create_dir(&huge).unwrap();
    let source = std::fs::read(base.join("model.safetensors")).unwrap();
    let length = u64::from_le_bytes(source[..8].try_into().unwrap()) as usize;
    let header: serde_json::Map<String, Value> =
        serde_json::from_slice(&source[8..8 + length]).unwrap();
    let vocab = 1_500_000_000u64;
    let (mut entries, mut offset) = (serde_json::Map::new(), 0u64);
    for (name, entry) in header.iter().filter(|(name, _)| *name != "__metadata__") {
        let mut shape: Vec<u64> = serde_json::from_value(entry["shape"].clone()).unwrap();
        if name.ends_with("embed_tokens.weight") || name == "lm_head.weight" {
            shape[0] = vocab;
        }
        let size = 4 * shape.iter().product::<u64>();
        entries.insert(
            name.clone(),
            json!({"dtype": "F32", "shape": shape, "data_offsets": [offset, offset + size]}),
        );
        offset += size;
    }
    let mut text = serde_json::to_vec(&entries).unwrap();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut file = std::fs::File::create(huge.join("model.safetensors")).unwrap();
    std::io::Write::write_all(&mut file, &(text.len() as u64).to_le_bytes()).unwrap();
    std::io::Write::write_all(&mut file, &text).unwrap();
    file.set_len(8 + text.len() as u64 + offset).unwrap();
    std::fs::copy(base.join("config.json"), huge.join("config.json")).unwrap();
    edit_json(&huge.join("config.json"), |c| {
        c["vocab_size"] = vocab.into()
    });
    let run = run_limited(
        &[
            "eval".as_ref(),
            huge.as_os_str(),
            "--batch".as_ref(),
            "1".as_ref(),
            "--seq-len".as_ref(),
            "2".as_ref(),
            "--max-memory".as_ref(),
            "2TB".as_ref(),
        ],
        16 * GB,
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("cannot allocate the model's weights")
            && run.stderr.contains("can't allocate memory")
            && !run.stderr.contains("frame #"),
        "{}",
        run.stderr
    );

    // An FFN of 2¹⁸ wide: 1 MB per token for its gate alone, 8 GB for a
    // batch of 64 windows of 128 tokens, past the 4 GB of address space.
    let wide = tmp.path().join("wide");
    synth(
        &wide,
        &[
            "--finetunes",
            "0",
            "--layers",
            "1",
            "--hidden",
            "32",
            "--intermediate",
            "262144",
        ],
    );
    let wide = wide.join("base");
    for (name, contents) in amalgam_nn::tokenizer::files() {
        std::fs::write(wide.join(name), contents).unwrap();
    }
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, prose(10_000)).unwrap();
    let run = run_limited(
        &[
            "eval".as_ref(),
            wide.as_os_str(),
            "--text".as_ref(),
            text.as_os_str(),
            "--batch".as_ref(),
            "64".as_ref(),
            "--seq-len".as_ref(),
            "129".as_ref(),
            "--max-memory".as_ref(),
            "1TB".as_ref(),
        ],
        4 * GB,
    );
    assert_eq!(run.code, Some(1), "{}", run.stderr);
    assert!(
        run.stderr.contains("can't allocate memory") && !run.stderr.contains("frame #"),
        "{}",
        run.stderr
    );
}

/// Nothing to score is refused by name: a --seq-len longer than a held-out
/// text of the corpus (what `tune` asks too), an empty text file, a `.jsonl`
/// file of blank lines. A text shorter than a window is scored in one
/// shorter window, as lm-evaluation-harness scores it.
#[test]
fn eval_refuses_what_has_no_window() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, _) = tiny_models(tmp.path());
    let message = fails([
        "eval".as_ref(),
        base.as_os_str(),
        "--seq-len".as_ref(),
        "50000".as_ref(),
    ]);
    assert!(
        message.contains("a window of 50000 tokens is longer than the prose held-out text (pass a smaller --seq-len)"),
        "{message}"
    );
    for (name, contents) in [("empty.txt", ""), ("blank.jsonl", "\n  \n\n")] {
        let file = tmp.path().join(name);
        std::fs::write(&file, contents).unwrap();
        let message = fails([
            "eval".as_ref(),
            base.as_os_str(),
            "--text".as_ref(),
            file.as_os_str(),
        ]);
        assert!(
            message.contains(&format!("{}: no text to score", file.display())),
            "{message}"
        );
    }
    let short = tmp.path().join("short.txt");
    std::fs::write(&short, "A few words.").unwrap();
    let scores: Value = serde_json::from_str(&ok([
        "eval".as_ref(),
        base.as_os_str(),
        "--text".as_ref(),
        short.as_os_str(),
        "--json".as_ref(),
    ]))
    .unwrap();
    assert_eq!(scores[0]["domains"][0]["tokens"], 12);
}
