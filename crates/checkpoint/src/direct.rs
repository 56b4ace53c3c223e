//! Writes that bypass the page cache. Copying a multi-gigabyte output into
//! the page cache (fresh cache pages, the copy, then write-back at fsync)
//! costs more than the device write itself; `O_DIRECT` sends whole aligned
//! blocks from a small aligned buffer straight to the device. Only the
//! whole blocks inside one tensor's bytes go this way: the partial blocks at
//! either end, which neighbouring tensors share, go through the page cache
//! as before, so no block is written both ways.

use std::cell::RefCell;
use std::fs::{File, OpenOptions};
use std::io::ErrorKind;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

/// Offsets, lengths and buffer addresses of direct writes are multiples of
/// this (every common device's logical block size divides it).
const BLOCK: usize = 4096;

/// Bytes copied into the aligned buffer and written per call.
const STAGE: usize = 8 << 20;

/// Tensors whose whole blocks are fewer bytes than this go through the page
/// cache: a direct write waits for the device, which only pays in bulk.
const MIN_DIRECT: usize = 1 << 20;

thread_local! {
    /// One aligned staging buffer per writing thread, reused across writes.
    static STAGING: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// A second handle on a shard file, opened with `O_DIRECT`.
pub struct DirectFile {
    file: File,
    /// Cleared when the filesystem refuses a direct write (then everything
    /// goes through the page cache).
    usable: AtomicBool,
    /// Bytes written directly so far.
    written: AtomicU64,
}

impl DirectFile {
    /// `None` where the filesystem has no direct I/O (tmpfs, some FUSE
    /// filesystems): those files are written through the page cache only.
    pub fn open(path: &Path) -> Option<Self> {
        let file = OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_DIRECT)
            .open(path)
            .ok()?;
        Some(Self {
            file,
            usable: AtomicBool::new(true),
            written: AtomicU64::new(0),
        })
    }

    /// Bytes this handle has written past the page cache.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Writes `bytes` at `offset` of the file: the whole blocks directly,
    /// the rest (and everything, when the filesystem refuses direct writes)
    /// through `cached`, a page-cache handle on the same file.
    pub fn write_all_at(&self, cached: &File, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        // The whole blocks within the range, as offsets into `bytes`.
        let (start, end) = (offset as usize, offset as usize + bytes.len());
        let first = start.next_multiple_of(BLOCK) - start;
        let last = (end / BLOCK * BLOCK).max(start + first) - start;
        if last - first < MIN_DIRECT || !self.usable.load(Ordering::Relaxed) {
            return cached.write_all_at(bytes, offset);
        }
        cached.write_all_at(&bytes[..first], offset)?;
        cached.write_all_at(&bytes[last..], offset + last as u64)?;
        let middle = &bytes[first..last];
        let at = offset + first as u64;
        match self.write_blocks(middle, at) {
            Err(e) if e.kind() == ErrorKind::InvalidInput => {
                // Alignment this filesystem or device does not take.
                self.usable.store(false, Ordering::Relaxed);
                cached.write_all_at(middle, at)
            }
            result => result,
        }
    }

    /// Whole blocks (`bytes.len()` and `offset` multiples of [`BLOCK`]),
    /// staged through this thread's aligned buffer.
    fn write_blocks(&self, bytes: &[u8], offset: u64) -> std::io::Result<()> {
        STAGING.with_borrow_mut(|staging| {
            if staging.len() < STAGE + BLOCK {
                *staging = vec![0; STAGE + BLOCK];
            }
            let skip = staging.as_ptr().align_offset(BLOCK);
            let stage = &mut staging[skip..skip + STAGE];
            for (i, piece) in bytes.chunks(STAGE).enumerate() {
                let stage = &mut stage[..piece.len()];
                stage.copy_from_slice(piece);
                self.file.write_all_at(stage, offset + (i * STAGE) as u64)?;
                self.written
                    .fetch_add(piece.len() as u64, Ordering::Relaxed);
            }
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the filesystem under `dir` takes direct writes at all.
    fn direct_io_works(dir: &Path) -> bool {
        let probe = dir.join("probe");
        std::fs::write(&probe, vec![0u8; 2 * MIN_DIRECT]).unwrap();
        let works = DirectFile::open(&probe).is_some_and(|direct| {
            let cached = OpenOptions::new().write(true).open(&probe).unwrap();
            direct
                .write_all_at(&cached, &vec![1u8; 2 * MIN_DIRECT], 0)
                .is_ok()
                && direct.written() > 0
        });
        std::fs::remove_file(probe).unwrap();
        works
    }

    #[test]
    fn unaligned_ranges_land_byte_for_byte() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("shard");
        let len = 3 * STAGE + 12345;
        std::fs::write(&path, vec![0xeeu8; len]).unwrap();
        let cached = OpenOptions::new().write(true).open(&path).unwrap();
        let Some(direct) = DirectFile::open(&path) else {
            eprintln!(
                "no O_DIRECT on {}: checked only the page cache",
                tmp.path().display()
            );
            return;
        };
        // Pieces at odd offsets and lengths, written out of order: a piece
        // smaller than MIN_DIRECT, one spanning several staging buffers, one
        // ending at the file's unaligned end.
        let pieces = [
            (7, 1000),
            (2 * STAGE + 3, STAGE + 12342),
            (1007, 2 * STAGE - 1004),
        ];
        let mut expected = vec![0xeeu8; len];
        for (n, &(start, count)) in pieces.iter().enumerate().rev() {
            let bytes: Vec<u8> = (0..count).map(|i| (i * 31 + n * 7) as u8).collect();
            direct.write_all_at(&cached, &bytes, start as u64).unwrap();
            expected[start..start + count].copy_from_slice(&bytes);
        }
        cached.sync_all().unwrap();
        assert!(std::fs::read(&path).unwrap() == expected, "bytes differ");
        if direct_io_works(tmp.path()) {
            // Everything but the two small ends of the two large pieces.
            let large = STAGE + 12342 + 2 * STAGE - 1004;
            assert!(direct.written() > (large - 4 * BLOCK) as u64);
        } else {
            eprintln!("direct writes refused under {}", tmp.path().display());
        }
    }
}
