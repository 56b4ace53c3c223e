//! Tensor data mapped from its shard file rather than copied out of it.
//!
//! A positioned read copies every byte from the page cache into fresh memory
//! (the copy, and the kernel zeroing each new page, cost more than the merge
//! arithmetic on a 2-core machine); a mapping hands the page cache's pages
//! to the tensor as they are. The catch with mappings is a file truncated
//! while mapped: touching the lost pages raises SIGBUS, which would kill the
//! process. So every mapping is registered, and a SIGBUS handler that finds
//! the faulting address in a registered mapping puts a zero page there,
//! marks the mapping as failed and lets the read go on; [`MappedTensor::check`]
//! then turns it into the same error a short positioned read gives. Any
//! other SIGBUS (another address, or one not raised by a memory access) goes
//! to the handler that was there before.
//!
//! The mapping is private and writable: a kernel writing into its input
//! gets copy-on-write pages, never the file. A file rewritten in place
//! without being truncated is not detected (nor is it by positioned reads,
//! though a read takes a snapshot and a mapping may see the new bytes part
//! way through): writers that replace checkpoints by renaming a new file,
//! as amalgam's and Hugging Face's do, leave the mapped file unchanged.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::{Error, Result};

/// A tensor whose data is a private mapping of its bytes in the shard file.
/// The tensor is dropped before the mapping (field order).
pub struct MappedTensor {
    tensor: tch::Tensor,
    mapping: Mapping,
    path: PathBuf,
    name: String,
}

impl MappedTensor {
    /// Maps `len` bytes at `offset` of `file` as a contiguous CPU tensor of
    /// `shape` and `kind`. `None` when the data cannot be mapped as such (its
    /// offset not aligned for the element type, every registry slot in use,
    /// the mapping refused): the caller reads it instead.
    pub(crate) fn map(
        file: &std::fs::File,
        path: &Path,
        name: &str,
        offset: u64,
        len: usize,
        shape: &[i64],
        kind: tch::Kind,
    ) -> Option<Self> {
        if len == 0 || offset % kind.elt_size_in_bytes() as u64 != 0 {
            return None;
        }
        let mapping = Mapping::new(file, offset, len)?;
        // SAFETY: the mapping holds `len` readable bytes aligned for `kind`
        // and outlives the tensor (dropped first, and callers keep no other
        // handle to the data past the mapping: see `contains`).
        let tensor =
            unsafe { tch::Tensor::f_from_blob(mapping.data(), shape, &[], kind, tch::Device::Cpu) }
                .ok()?;
        Some(MappedTensor {
            tensor,
            mapping,
            path: path.to_path_buf(),
            name: name.to_owned(),
        })
    }

    pub fn tensor(&self) -> &tch::Tensor {
        &self.tensor
    }

    /// Whether `t`'s data lies in this mapping: such a tensor must not
    /// outlive it (copy it first).
    pub fn contains(&self, t: &tch::Tensor) -> bool {
        let at = t.data_ptr() as usize;
        let start = self.mapping.data() as usize;
        let len = self.mapping.mapped - self.mapping.lead;
        (start..start + len).contains(&at)
    }

    /// An error if the file lost some of the mapped bytes (truncated) while
    /// they were read: the data read is not the file's. Call it after the
    /// last read of the data (a copy of it included).
    pub fn check(&self) -> Result<()> {
        if SLOTS[self.mapping.slot].failed.load(Ordering::Acquire) {
            return Err(Error::Safetensors {
                path: self.path.clone(),
                tensor: Some(self.name.clone()),
                message: crate::reader::TRUNCATED_WHILE_READ.into(),
            });
        }
        Ok(())
    }
}

/// A registered private mapping of a file range.
struct Mapping {
    /// The mapping's first page.
    base: *mut libc::c_void,
    /// Bytes mapped from `base` (whole pages up to the data's end).
    mapped: usize,
    /// Where the data starts after `base`.
    lead: usize,
    slot: usize,
}

// SAFETY: the mapping is plain memory; the tensor over it is what is shared.
unsafe impl Send for Mapping {}
unsafe impl Sync for Mapping {}

impl Mapping {
    fn new(file: &std::fs::File, offset: u64, len: usize) -> Option<Self> {
        let page = handler_page_size()?;
        let lead = (offset % page as u64) as usize;
        let mapped = lead + len;
        // SAFETY: a new private mapping of an open file; nothing aliases it yet.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                file.as_raw_fd(),
                (offset - lead as u64) as libc::off_t,
            )
        };
        if base == libc::MAP_FAILED {
            return None;
        }
        let Some(slot) = register(base as usize, mapped) else {
            // SAFETY: mapped just above, never shared.
            unsafe { libc::munmap(base, mapped) };
            return None;
        };
        // Map the cached pages now, in one call, without copying them (a
        // read fault per 64 KiB otherwise); advisory, so errors are ignored.
        // SAFETY: the range is this mapping.
        unsafe { libc::madvise(base, mapped, libc::MADV_POPULATE_READ) };
        Some(Mapping {
            base,
            mapped,
            lead,
            slot,
        })
    }

    fn data(&self) -> *const u8 {
        // SAFETY: `lead` < `mapped`, inside the mapping.
        unsafe { (self.base as *const u8).add(self.lead) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // The slot goes dead before the range is unmapped: a new mapping at
        // the same addresses must not match this slot in the handler.
        let slot = &SLOTS[self.slot];
        slot.start.store(0, Ordering::SeqCst);
        // SAFETY: the mapping made in `new`; the tensor over it is gone.
        unsafe { libc::munmap(self.base, self.mapped) };
        slot.failed.store(false, Ordering::Release);
        slot.used.store(false, Ordering::Release);
    }
}

/// Mapped ranges the SIGBUS handler knows; a fixed table, so the handler
/// reads it without locks or allocation.
struct Slot {
    used: AtomicBool,
    /// The first mapped address; 0 while the slot is not live.
    start: AtomicUsize,
    end: AtomicUsize,
    failed: AtomicBool,
}

const SLOT_COUNT: usize = 256;

static SLOTS: [Slot; SLOT_COUNT] = [const {
    Slot {
        used: AtomicBool::new(false),
        start: AtomicUsize::new(0),
        end: AtomicUsize::new(0),
        failed: AtomicBool::new(false),
    }
}; SLOT_COUNT];

fn register(start: usize, len: usize) -> Option<usize> {
    let slot = SLOTS.iter().position(|s| {
        s.used
            .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    })?;
    SLOTS[slot].failed.store(false, Ordering::Release);
    SLOTS[slot].end.store(start + len, Ordering::Release);
    SLOTS[slot].start.store(start, Ordering::Release);
    Some(slot)
}

/// The page size, once the handler is installed; `None` if it cannot be.
fn handler_page_size() -> Option<usize> {
    static INSTALLED: OnceLock<Option<usize>> = OnceLock::new();
    *INSTALLED.get_or_init(|| {
        // SAFETY: plain libc queries and a sigaction with a valid handler.
        unsafe {
            let page = usize::try_from(libc::sysconf(libc::_SC_PAGESIZE)).ok()?;
            PAGE.store(page, Ordering::Release);
            // The previous action is stored before ours can run.
            if libc::sigaction(libc::SIGBUS, std::ptr::null(), PREVIOUS.as_ptr()) != 0 {
                return None;
            }
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sigbus as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
            libc::sigemptyset(&mut action.sa_mask);
            (libc::sigaction(libc::SIGBUS, &action, std::ptr::null_mut()) == 0).then_some(page)
        }
    })
}

static PAGE: AtomicUsize = AtomicUsize::new(0);

/// The SIGBUS disposition before ours, written once before ours is active.
static PREVIOUS: PreviousAction =
    PreviousAction(std::cell::UnsafeCell::new(unsafe { std::mem::zeroed() }));

struct PreviousAction(std::cell::UnsafeCell<libc::sigaction>);

// SAFETY: written once, by `sigaction`, before the handler can run; read only after.
unsafe impl Sync for PreviousAction {}

impl PreviousAction {
    fn as_ptr(&self) -> *mut libc::sigaction {
        self.0.get()
    }
}

/// A fault in a registered mapping gets a zero page and marks the mapping;
/// any other SIGBUS goes to the previous disposition. Async-signal-safe:
/// atomics, `mmap`, `sigaction` and `raise` only; `errno` is kept.
extern "C" fn on_sigbus(
    signal: libc::c_int,
    info: *mut libc::siginfo_t,
    context: *mut libc::c_void,
) {
    // SAFETY: this thread's errno, restored before returning.
    let errno = unsafe { *libc::__errno_location() };
    if !zero_lost_page(info) {
        // SAFETY: called from the handler with the kernel's arguments.
        unsafe { chain(signal, info, context) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// Whether `info` is a memory access past the end of a registered mapping's
/// file, now backed by a zero page (the mapping marked as failed).
fn zero_lost_page(info: *mut libc::siginfo_t) -> bool {
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers; the
    // address means something for its own BUS_ADRERR only (a SIGBUS sent by
    // `kill` carries a pid there).
    let address = unsafe {
        if (*info).si_code != libc::BUS_ADRERR {
            return false;
        }
        (*info).si_addr() as usize
    };
    let page = PAGE.load(Ordering::Acquire);
    for slot in &SLOTS {
        let start = slot.start.load(Ordering::SeqCst);
        if start == 0 || address < start || address >= slot.end.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: replaces one page of our own registered mapping.
        let zero = unsafe {
            libc::mmap(
                (address & !(page - 1)) as *mut libc::c_void,
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_FIXED | libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if zero != libc::MAP_FAILED {
            slot.failed.store(true, Ordering::Release);
            return true;
        }
    }
    false
}

/// Hands a SIGBUS that is not ours to the disposition before ours.
///
/// # Safety
/// Called from the SIGBUS handler, with the kernel's arguments.
unsafe fn chain(signal: libc::c_int, info: *mut libc::siginfo_t, context: *mut libc::c_void) {
    // SAFETY: the previous action, stored before ours was installed.
    unsafe {
        let previous = &*PREVIOUS.as_ptr();
        if previous.sa_flags & libc::SA_SIGINFO != 0
            && previous.sa_sigaction != libc::SIG_DFL
            && previous.sa_sigaction != libc::SIG_IGN
        {
            let handler: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                std::mem::transmute(previous.sa_sigaction);
            handler(signal, info, context);
        } else {
            // The previous disposition from now on: a faulting access runs
            // again into it, a sent signal is raised again.
            libc::sigaction(libc::SIGBUS, previous, std::ptr::null_mut());
            if (*info).si_code != libc::BUS_ADRERR {
                libc::raise(libc::SIGBUS);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A file truncated under a mapped tensor: reading it neither crashes nor
    /// passes as data; `check` names the file and tensor.
    #[test]
    fn a_file_truncated_under_a_mapping_is_an_error_not_a_crash() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        let values: Vec<f32> = (0..65_536).map(|i| i as f32).collect();
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let mut contents = vec![0u8; 4096];
        contents.extend_from_slice(&bytes);
        std::fs::write(&path, &contents).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map = |file: &std::fs::File| {
            MappedTensor::map(
                file,
                &path,
                "w",
                4096,
                bytes.len(),
                &[65_536],
                tch::Kind::Float,
            )
            .expect("maps")
        };
        let whole = map(&file);
        assert_eq!(Vec::<f32>::try_from(whole.tensor()).unwrap(), values);
        whole.check().unwrap();
        assert!(whole.contains(&whole.tensor().narrow(0, 10, 5)));
        assert!(!whole.contains(&whole.tensor().copy()));

        let cut = map(&file);
        std::fs::OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(4096 + 1000)
            .unwrap();
        let read = Vec::<f32>::try_from(cut.tensor()).unwrap();
        assert_eq!(read[..250], values[..250]);
        assert!(
            read[1024..].iter().all(|&v| v == 0.0),
            "the lost pages read as zeros"
        );
        let error = cut.check().unwrap_err().to_string();
        assert!(
            error.contains("data.bin") && error.contains("truncated"),
            "{error}"
        );
        // The slot is free again, its failure forgotten.
        drop(cut);
        drop(whole);
        std::fs::write(&path, &contents).unwrap();
        let again = map(&std::fs::File::open(&path).unwrap());
        again.check().unwrap();
    }

    /// Unaligned data is not mapped (the caller reads it).
    #[test]
    fn data_not_aligned_for_its_type_is_left_to_reads() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("data.bin");
        std::fs::write(&path, vec![1u8; 8192]).unwrap();
        let file = std::fs::File::open(&path).unwrap();
        let map =
            |offset| MappedTensor::map(&file, &path, "w", offset, 64, &[16], tch::Kind::Float);
        assert!(map(2).is_none());
        assert!(map(4100).is_some());
    }
}
