//! What the fuzz targets share: scratch directories made once per process,
//! and a tiny model written into them.
#![allow(dead_code)] // each target uses its own subset

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use amalgam_checkpoint::synthetic::{generate_family, FamilyOptions, LlamaShape};
use amalgam_checkpoint::{Dtype, WriteOptions};

/// A scratch directory for this process, in memory where possible.
pub fn scratch() -> &'static Path {
    static DIR: OnceLock<tempfile::TempDir> = OnceLock::new();
    DIR.get_or_init(|| {
        let shm = Path::new("/dev/shm");
        let builder = tempfile::Builder::new()
            .prefix("amalgam-fuzz-")
            .tempdir_in(shm);
        builder
            .or_else(|_| tempfile::tempdir())
            .expect("a scratch directory")
    })
    .path()
}

/// A tiny Llama checkpoint (4 layers, hidden 64, F32) under the scratch
/// directory; `shard_bytes` splits it into shards.
pub fn tiny_model(name: &str, shard_bytes: u64) -> PathBuf {
    let root = scratch().join(name);
    let options = FamilyOptions {
        shape: LlamaShape::TINY,
        dtype: Dtype::F32,
        seed: 0,
        finetunes: 0,
        write: WriteOptions {
            max_shard_bytes: shard_bytes,
            ..Default::default()
        },
    };
    generate_family(&root, &options, &|_| {})
        .expect("the tiny model is written")
        .remove(0)
}

/// Writes `bytes` to `dir/name`, replacing what was there.
pub fn put(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(dir.join(name), bytes).expect("scratch files are writable");
}
