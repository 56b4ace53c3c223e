//! What a merge holds in memory and reads: each output tensor's need, the
//! default budget, the peak estimate `--dry-run` prints, and the byte budget
//! the workers wait on.

use std::sync::{Condvar, Mutex};

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_recipe::PlannedTensor;

use crate::executor::MergeJob;

impl MergeJob {
    /// Bytes of input tensor data the plan reads.
    pub fn bytes_to_read(&self) -> u64 {
        self.plan
            .tensors
            .iter()
            .flat_map(|t| &t.inputs)
            .map(|i| {
                let entry = self.sources[i.model]
                    .checkpoint
                    .entry(&i.tensor)
                    .expect("planned");
                entry.byte_range.end - entry.byte_range.start
            })
            .sum()
    }

    /// The memory one output tensor needs while it is computed: its inputs in
    /// the math dtype, the method's working copies (the output among them),
    /// and the cast to the output dtype if it differs.
    pub fn tensor_memory(&self, tensor: &PlannedTensor) -> u64 {
        let numel: u64 = tensor.shape.iter().map(|&d| d as u64).product();
        let (math, out) = (self.math_dtype(tensor), self.output_dtype(tensor));
        let copies = tensor.inputs.len() + self.method.working_copies(tensor.inputs.len(), numel);
        let copies = copies as u64;
        // A cast to a different output dtype is one more copy.
        let cast = if out == math {
            0
        } else {
            (out.bitsize() / 8) as u64
        };
        numel * (copies * (math.bitsize() / 8) as u64 + cast)
    }

    /// The budget used when none is given: room for every thread to hold a
    /// typical tensor, where typical is the largest need once the biggest
    /// tensors holding a tenth of all entries (embeddings, heads) are set
    /// aside; never below the largest single need and never above `cap`.
    /// Those few largest tensors then run apart, so peak memory follows the
    /// thread count and a layer's size, not the model's: a 7B merge stays
    /// near its 1B figure.
    pub fn default_memory_budget(&self, threads: usize, cap: u64) -> u64 {
        let sized: Vec<(u64, u64)> = self
            .plan
            .tensors
            .iter()
            .map(|t| {
                let numel = t.shape.iter().map(|&d| d as u64).product();
                (self.tensor_memory(t), numel)
            })
            .collect();
        typical_budget(sized, threads, cap)
    }

    /// Peak memory with `threads` tensors in flight under `budget`: the
    /// executor starts with the largest tensors, so the peak is the largest
    /// ones running together, as many as fit, plus the process.
    pub fn memory_estimate(&self, threads: usize, budget: u64) -> MemoryEstimate {
        let mut needs: Vec<u64> = self
            .plan
            .tensors
            .iter()
            .map(|t| self.tensor_memory(t))
            .collect();
        needs.sort_unstable_by(|a, b| b.cmp(a));
        let mut peak = needs.first().copied().unwrap_or(0);
        for window in needs.windows(threads.max(1)) {
            let mut together = 0;
            for &need in window {
                if together + need > budget && together > 0 {
                    break;
                }
                together += need;
            }
            peak = peak.max(together);
        }
        MemoryEstimate::new().phase("the largest tensors in flight together", peak)
    }
}

/// [`MergeJob::default_memory_budget`] over each tensor's (need, entries).
fn typical_budget(mut sized: Vec<(u64, u64)>, threads: usize, cap: u64) -> u64 {
    sized.sort_unstable_by(|a, b| b.cmp(a));
    let total: u64 = sized.iter().map(|&(_, numel)| numel).sum();
    let largest = sized.first().map_or(0, |&(need, _)| need);
    let mut set_aside = 0;
    let typical = sized
        .iter()
        .find(|&&(_, numel)| {
            set_aside += numel;
            set_aside * 10 > total
        })
        .map_or(0, |&(need, _)| need);
    (threads.max(1) as u64 * typical).max(largest).min(cap)
}

/// A byte budget shared by the worker threads.
pub(crate) struct Budget {
    limit: u64,
    used: Mutex<u64>,
    freed: Condvar,
}

pub(crate) struct Permit<'a> {
    budget: &'a Budget,
    bytes: u64,
}

impl Budget {
    pub(crate) fn new(limit: u64) -> Self {
        Self {
            limit,
            used: Mutex::new(0),
            freed: Condvar::new(),
        }
    }

    /// Waits until `bytes` fit (or nothing else is running).
    pub(crate) fn acquire(&self, bytes: u64) -> Permit<'_> {
        let mut used = self.used.lock().expect("budget lock");
        while *used > 0 && *used + bytes > self.limit {
            used = self.freed.wait(used).expect("budget lock");
        }
        *used += bytes;
        Permit {
            budget: self,
            bytes,
        }
    }
}

impl Permit<'_> {
    /// Gives back all but `bytes` of this permit.
    pub(crate) fn shrink(&mut self, bytes: u64) {
        if bytes < self.bytes {
            *self.budget.used.lock().expect("budget lock") -= self.bytes - bytes;
            self.bytes = bytes;
            self.budget.freed.notify_all();
        }
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        *self.budget.used.lock().expect("budget lock") -= self.bytes;
        self.budget.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::typical_budget;

    /// Mistral-7B's tensors (entries) at 8 bytes each (base + 2 BF16 and the output).
    fn mistral_7b() -> Vec<(u64, u64)> {
        let (hidden, inter, kv, vocab) = (4096u64, 14336, 1024, 32000);
        let layer = [
            hidden * hidden,
            hidden * kv,
            hidden * kv,
            hidden * hidden,
            hidden * inter,
            hidden * inter,
            inter * hidden,
            hidden,
            hidden,
        ];
        let mut numels = vec![vocab * hidden, vocab * hidden, hidden];
        (0..32).for_each(|_| numels.extend(layer));
        numels.into_iter().map(|n| (8 * n, n)).collect()
    }

    #[test]
    fn the_default_budget_keeps_the_largest_tensors_apart_and_pairs_the_layers() {
        let (embedding, mlp) = (8 * 32000 * 4096, 8 * 4096 * 14336);
        let unlimited = u64::MAX;
        // Two threads: an MLP matrix each fits; the embedding and the head do not.
        let budget = typical_budget(mistral_7b(), 2, unlimited);
        assert_eq!(budget, embedding);
        assert!(2 * mlp <= budget && 2 * embedding > budget);
        // More threads: room for each to hold an MLP matrix.
        assert_eq!(typical_budget(mistral_7b(), 16, unlimited), 16 * mlp);
        // Never above the cap; a model of one tensor: room for it on every thread.
        assert_eq!(typical_budget(mistral_7b(), 16, 3 * mlp), 3 * mlp);
        assert_eq!(typical_budget(vec![(80, 10)], 4, unlimited), 320);
    }
}
