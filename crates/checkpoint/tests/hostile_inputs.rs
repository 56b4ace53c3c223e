//! Model directories built to hurt: symlinks to secrets, FIFOs and devices,
//! huge or duplicated JSON, files truncated while they are read. Each is
//! refused with the file named; none crashes, hangs or leaks a file.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use amalgam_checkpoint::synthetic::{generate_family, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, WriteOptions};

/// A tiny single-file checkpoint at `root/base`.
fn checkpoint(root: &Path, shard_bytes: u64) -> PathBuf {
    let options = FamilyOptions {
        shape: LlamaShape::by_name("tiny").unwrap(),
        dtype: Dtype::F32,
        seed: 0,
        finetunes: 0,
        write: WriteOptions {
            max_shard_bytes: shard_bytes,
            ..Default::default()
        },
    };
    generate_family(root, &options, &|_| {}).unwrap().remove(0)
}

fn open_err(dir: &Path) -> String {
    match Checkpoint::open(dir) {
        Ok(_) => panic!("{} opened", dir.display()),
        Err(e) => e.to_string(),
    }
}

fn assert_mentions(message: &str, needles: &[&str]) {
    for needle in needles {
        assert!(message.contains(needle), "missing {needle:?} in: {message}");
    }
}

/// Copies the checkpoint's tokenizer-side files to a new output, as every
/// writer does; the copy must refuse a file that escapes the directory.
fn copy_companions(source: &Path, out: &Path) -> amalgam_checkpoint::Result<PathBuf> {
    let specs = vec![amalgam_checkpoint::TensorSpec::new(
        "x",
        Dtype::F32,
        vec![1],
    )];
    let writer = CheckpointWriter::create(out, specs, &WriteOptions::default())?;
    writer.write_bytes("x", &1f32.to_le_bytes())?;
    let input = Checkpoint::open(source);
    let config = match &input {
        Ok(c) => c.config().clone(),
        // A config the output check accepts, so the copy is what fails.
        Err(_) => amalgam_checkpoint::ModelConfig::from_json(
            serde_json::json!({"model_type": "llama"})
                .as_object()
                .unwrap()
                .clone(),
        ),
    };
    writer.finish(Finish {
        config: &config,
        tokenizer_source: Some(source),
        chat_template: None,
        extra_files: &[],
        card: &ModelCard::default(),
    })
}

#[test]
fn symlinks_out_of_the_directory_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), u64::MAX);
    let secret = tmp.path().join("secret.txt");
    std::fs::write(&secret, "AWS_SECRET_ACCESS_KEY=hunter2").unwrap();

    // A companion file copied to outputs.
    symlink(&secret, dir.join("tokenizer.json")).unwrap();
    assert_mentions(
        &open_err(&dir),
        &["tokenizer.json", "outside the model directory"],
    );
    let out = tmp.path().join("out");
    let err = copy_companions(&dir, &out).unwrap_err().to_string();
    assert_mentions(&err, &["tokenizer.json", "outside the model directory"]);
    assert!(!out.exists(), "nothing written");
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();

    // config.json and a weights file.
    let config = std::fs::read(dir.join("config.json")).unwrap();
    let outside_config = tmp.path().join("config-elsewhere.json");
    std::fs::write(&outside_config, &config).unwrap();
    std::fs::remove_file(dir.join("config.json")).unwrap();
    symlink(&outside_config, dir.join("config.json")).unwrap();
    assert_mentions(
        &open_err(&dir),
        &["config.json", "outside the model directory"],
    );
    std::fs::remove_file(dir.join("config.json")).unwrap();
    std::fs::write(dir.join("config.json"), &config).unwrap();

    let weights = tmp.path().join("elsewhere.safetensors");
    std::fs::rename(dir.join("model.safetensors"), &weights).unwrap();
    symlink(&weights, dir.join("model.safetensors")).unwrap();
    assert_mentions(
        &open_err(&dir),
        &["model.safetensors", "outside the model directory"],
    );

    // A link to another file inside the directory is fine.
    std::fs::remove_file(dir.join("model.safetensors")).unwrap();
    std::fs::rename(&weights, dir.join("weights.bin.real")).unwrap();
    symlink("weights.bin.real", dir.join("model.safetensors")).unwrap();
    Checkpoint::open(&dir).unwrap();
}

#[test]
fn a_cache_snapshot_may_point_into_its_own_blobs_only() {
    let tmp = tempfile::tempdir().unwrap();
    let source = checkpoint(tmp.path(), u64::MAX);
    let entry = tmp.path().join("hub/models--org--tiny");
    let snapshot = entry.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(entry.join("blobs")).unwrap();
    for (i, name) in ["model.safetensors", "config.json", "generation_config.json"]
        .iter()
        .enumerate()
    {
        let blob = entry.join(format!("blobs/{i:064x}"));
        std::fs::copy(source.join(name), &blob).unwrap();
        symlink(format!("../../blobs/{i:064x}"), snapshot.join(name)).unwrap();
    }
    Checkpoint::open(&snapshot).unwrap();
    let out = tmp.path().join("out");
    copy_companions(&snapshot, &out).unwrap();
    assert!(out.join("generation_config.json").is_file());

    // Another cache entry's blobs are outside.
    let other = tmp.path().join("hub/models--org--other/blobs");
    std::fs::create_dir_all(&other).unwrap();
    std::fs::write(other.join("secret"), "{}").unwrap();
    symlink(other.join("secret"), snapshot.join("tokenizer.json")).unwrap();
    assert_mentions(
        &open_err(&snapshot),
        &["tokenizer.json", "outside the model directory"],
    );
}

#[test]
fn fifos_and_devices_are_refused_without_blocking() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), u64::MAX);
    let started = Instant::now();
    for name in ["config.json", "model.safetensors", "tokenizer.json"] {
        let path = dir.join(name);
        let kept = tmp.path().join("kept");
        let existed = path.exists();
        if existed {
            std::fs::rename(&path, &kept).unwrap();
        }
        let c_path = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c_path.as_ptr(), 0o644) }, 0);
        assert_mentions(&open_err(&dir), &[name, "is a FIFO"]);
        std::fs::remove_file(&path).unwrap();
        if existed {
            std::fs::rename(&kept, &path).unwrap();
        }
    }
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "no blocking open"
    );
    // /dev/zero through a link: outside the directory, and a device.
    let config = dir.join("config.json");
    std::fs::remove_file(&config).unwrap();
    symlink("/dev/zero", &config).unwrap();
    assert_mentions(&open_err(&dir), &["config.json"]);
    let err = amalgam_checkpoint::read_regular(Path::new("/dev/zero"), 1 << 20, "a config")
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["/dev/zero", "is a character device"]);
}

#[test]
fn json_is_read_with_a_cap() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), u64::MAX);
    let config = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("config.json"))
        .unwrap();
    config.set_len(65 << 20).unwrap();
    assert_mentions(&open_err(&dir), &["config.json", "larger than 64 MB"]);
}

#[test]
fn duplicate_keys_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 200_000);
    let index_path = dir.join("model.safetensors.index.json");
    let index = std::fs::read_to_string(&index_path).unwrap();
    // Place one tensor twice, in two different shards: last-wins readers
    // would read it from the second.
    let first_shard = "model-00001-of-";
    assert!(index.contains(first_shard));
    let shard_count = &index[index.find(first_shard).unwrap() + first_shard.len()..][..5];
    let twice = index.replacen(
        "\"weight_map\": {",
        &format!(
            "\"weight_map\": {{\"model.norm.weight\": \"{first_shard}{shard_count}.safetensors\","
        ),
        1,
    );
    std::fs::write(&index_path, twice).unwrap();
    assert_mentions(
        &open_err(&dir),
        &[
            "model.safetensors.index.json",
            "\"model.norm.weight\" appears twice",
        ],
    );
    std::fs::write(&index_path, &index).unwrap();

    // The same name twice in a shard header.
    let single = checkpoint(&tmp.path().join("single"), u64::MAX);
    let path = single.join("model.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let name = "\"model.norm.weight\":";
    let at = header.find(name).unwrap();
    let end = at + header[at..].find('}').unwrap() + 1;
    let entry = &header[at..end];
    let doubled = header.replacen(entry, &format!("{entry},{entry}"), 1);
    let mut text = doubled.trim_end().as_bytes().to_vec();
    text.resize(text.len().next_multiple_of(8), b' ');
    let mut out = (text.len() as u64).to_le_bytes().to_vec();
    out.extend(&text);
    out.extend(&bytes[8 + n..]);
    std::fs::write(&path, out).unwrap();
    assert_mentions(
        &open_err(&single),
        &[
            "model.safetensors",
            "tensor model.norm.weight",
            "listed twice",
        ],
    );

    // And in config.json.
    std::fs::write(
        single.join("config.json"),
        r#"{"model_type": "llama", "num_hidden_layers": 2, "num_hidden_layers": 40}"#,
    )
    .unwrap();
    std::fs::write(&path, &bytes).unwrap();
    assert_mentions(
        &open_err(&single),
        &["config.json", "\"num_hidden_layers\" appears twice"],
    );
}

#[test]
fn an_index_that_places_nothing_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), 200_000);
    std::fs::write(
        dir.join("model.safetensors.index.json"),
        r#"{"metadata": {}, "weight_map": {}}"#,
    )
    .unwrap();
    assert_mentions(
        &open_err(&dir),
        &["model.safetensors.index.json", "weight_map is empty"],
    );
}

#[test]
fn a_file_truncated_while_open_is_an_error_not_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = checkpoint(tmp.path(), u64::MAX);
    let checkpoint = Checkpoint::open(&dir).unwrap();
    let last = checkpoint.tensors().last().unwrap().clone();
    std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join("model.safetensors"))
        .unwrap()
        .set_len(4096)
        .unwrap();
    let err = checkpoint.tensor(&last.name).unwrap_err().to_string();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            &format!("tensor {}", last.name),
            "truncated",
        ],
    );
    let err = checkpoint
        .read_as(&last.name, tch::Kind::Double)
        .unwrap_err()
        .to_string();
    assert_mentions(&err, &["model.safetensors", "truncated"]);
    assert!(checkpoint.read_bytes(&last).is_err());
    // Mapped instead of read: the lost pages raise SIGBUS when touched, which
    // must become the same error, not kill the process.
    let kind = amalgam_checkpoint::kind_from_dtype(last.dtype).unwrap();
    // SAFETY: every tensor over the mapping is dropped before it.
    let mapped = unsafe { checkpoint.map_as(&last.name, kind) }
        .unwrap()
        .expect("stored in its kind, aligned: mapped");
    let sum = mapped
        .tensor()
        .abs()
        .sum(tch::Kind::Double)
        .double_value(&[]);
    assert_eq!(sum, 0.0, "the lost pages read as zeros");
    let err = mapped.check().unwrap_err().to_string();
    assert_mentions(
        &err,
        &[
            "model.safetensors",
            &format!("tensor {}", last.name),
            "truncated",
        ],
    );
}
