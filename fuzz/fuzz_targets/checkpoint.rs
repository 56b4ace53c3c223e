//! The checkpoint reader on hostile files. The first byte picks what the rest
//! is: even, a single-file checkpoint's `model.safetensors` (beside a fixed
//! config); odd, a sharded checkpoint's index (beside the tiny model's real
//! shards). Whatever opens must read every tensor back without a crash.
#![no_main]

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use amalgam_checkpoint::{kind_from_dtype, Checkpoint};
use libfuzzer_sys::fuzz_target;

fn dirs() -> &'static (PathBuf, PathBuf) {
    static DIRS: OnceLock<(PathBuf, PathBuf)> = OnceLock::new();
    DIRS.get_or_init(|| {
        let single = common::tiny_model("single", u64::MAX);
        let sharded = common::tiny_model("sharded", 200_000);
        (single, sharded)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, content)) = data.split_first() else {
        return;
    };
    let (single, sharded) = dirs();
    let dir = if mode % 2 == 0 {
        common::put(single, "model.safetensors", content);
        single
    } else {
        common::put(sharded, "model.safetensors.index.json", content);
        sharded
    };
    let Ok(checkpoint) = Checkpoint::open(dir) else {
        return;
    };
    let _ = checkpoint.layers();
    for entry in checkpoint.tensors() {
        let bytes = checkpoint
            .read_bytes(entry)
            .expect("an opened tensor reads");
        assert_eq!(
            bytes.len() as u64,
            entry.byte_range.end - entry.byte_range.start
        );
        if kind_from_dtype(entry.dtype).is_some() && entry.numel() < 1 << 16 {
            let converted = checkpoint.read_as(&entry.name, tch::Kind::Double);
            assert!(converted.is_ok(), "an opened tensor converts");
        }
    }
});
