//! DARE's random stream: xoshiro256++ seeded as `rand_xoshiro` seeds it, so
//! every draw has the bits that crate's generator gives, but drawn four
//! segments at a time.
//!
//! One generator is a single dependency chain (each step needs the previous
//! state), so it cannot use vector lanes. The generator is linear over GF(2),
//! though: the state `SEGMENT` steps ahead is a fixed 256×256 bit matrix times
//! the current one. A block of `4 · SEGMENT` draws therefore starts four
//! copies at offsets 0, 1, 2 and 3 segments, steps them side by side (one
//! vector of four lanes), and writes each copy's draws to its quarter of the
//! block — the same sequence as one generator drawing the block in order.

use std::sync::OnceLock;

use rand::{RngCore, SeedableRng};
use rand_xoshiro::SplitMix64;

/// Draws per lane in a block.
const SEGMENT: usize = 2048;

/// Draws in a block that runs in four lanes.
pub const BLOCK: usize = 4 * SEGMENT;

/// A xoshiro256++ state.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stream {
    s: [u64; 4],
}

impl Stream {
    /// The state `rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed)` starts from.
    pub fn seed_from_u64(seed: u64) -> Self {
        let mut bytes = [0u8; 32];
        SplitMix64::seed_from_u64(seed).fill_bytes(&mut bytes);
        if bytes == [0; 32] {
            // rand_xoshiro replaces an all-zero seed (a fixed point) this way.
            return Stream::seed_from_u64(0);
        }
        let mut s = [0u64; 4];
        for (word, b) in s.iter_mut().zip(bytes.chunks_exact(8)) {
            *word = u64::from_le_bytes(b.try_into().expect("8 bytes"));
        }
        Stream { s }
    }

    #[inline(always)]
    pub fn next_u64(&mut self) -> u64 {
        let s = &mut self.s;
        let result = s[0].wrapping_add(s[3]).rotate_left(23).wrapping_add(s[0]);
        let t = s[1] << 17;
        s[2] ^= s[0];
        s[3] ^= s[1];
        s[1] ^= s[2];
        s[0] ^= s[3];
        s[2] ^= t;
        s[3] = s[3].rotate_left(45);
        result
    }

    /// Four copies of this stream, 0, 1, 2 and 3 segments ahead.
    fn lane_starts(&self) -> [Stream; 4] {
        let mut start = self.clone();
        [0; 4].map(|_| {
            let lane = start.clone();
            start.s = segment_ahead(&start.s);
            lane
        })
    }

    /// The next `out.len()` draws, in order: a whole block in four lanes,
    /// anything else one by one.
    #[inline(always)]
    pub fn fill(&mut self, out: &mut [u64]) {
        if out.len() != BLOCK {
            out.iter_mut().for_each(|d| *d = self.next_u64());
            return;
        }
        let lanes = self.lane_starts();
        #[cfg(target_arch = "x86_64")]
        if crate::elementwise::has_avx2() {
            // SAFETY: the CPU has AVX2 (checked); `out` holds a block.
            self.s = unsafe { lanes_avx2(&lanes, out) };
            return;
        }
        *self = lanes_portable(lanes, out);
    }
}

/// The four lanes of a block stepped in turn (independent chains, which the
/// CPU overlaps). Returns the last lane, which ends where the block ends.
#[inline(always)]
fn lanes_portable(mut lanes: [Stream; 4], out: &mut [u64]) -> Stream {
    for step in 0..SEGMENT {
        for (lane, stream) in lanes.iter_mut().enumerate() {
            out[lane * SEGMENT + step] = stream.next_u64();
        }
    }
    let [.., last] = lanes;
    last
}

/// The four lanes of a block in AVX2 registers, four steps at a time, each
/// step's outputs transposed so a lane's four draws are stored together.
/// Returns the last lane's final state.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn lanes_avx2(lanes: &[Stream; 4], out: &mut [u64]) -> [u64; 4] {
    use std::arch::x86_64::*;
    assert_eq!(out.len(), BLOCK);
    // Register w holds word w of every lane's state.
    let word = |w: usize| {
        let words = lanes.each_ref().map(|lane| lane.s[w]);
        _mm256_loadu_si256(words.as_ptr().cast())
    };
    let [mut s0, mut s1, mut s2, mut s3] = [0, 1, 2, 3].map(word);
    let rotl = |x, k: i32| match k {
        23 => _mm256_or_si256(_mm256_slli_epi64::<23>(x), _mm256_srli_epi64::<41>(x)),
        _ => _mm256_or_si256(_mm256_slli_epi64::<45>(x), _mm256_srli_epi64::<19>(x)),
    };
    for step in (0..SEGMENT).step_by(4) {
        let mut results = [_mm256_setzero_si256(); 4];
        for r in results.iter_mut() {
            *r = _mm256_add_epi64(rotl(_mm256_add_epi64(s0, s3), 23), s0);
            let t = _mm256_slli_epi64::<17>(s1);
            s2 = _mm256_xor_si256(s2, s0);
            s3 = _mm256_xor_si256(s3, s1);
            s1 = _mm256_xor_si256(s1, s2);
            s0 = _mm256_xor_si256(s0, s3);
            s2 = _mm256_xor_si256(s2, t);
            s3 = rotl(s3, 45);
        }
        let [r0, r1, r2, r3] = results;
        let (t0, t1) = (_mm256_unpacklo_epi64(r0, r1), _mm256_unpackhi_epi64(r0, r1));
        let (t2, t3) = (_mm256_unpacklo_epi64(r2, r3), _mm256_unpackhi_epi64(r2, r3));
        let by_lane = [
            _mm256_permute2x128_si256::<0x20>(t0, t2),
            _mm256_permute2x128_si256::<0x20>(t1, t3),
            _mm256_permute2x128_si256::<0x31>(t0, t2),
            _mm256_permute2x128_si256::<0x31>(t1, t3),
        ];
        for (lane, draws) in by_lane.into_iter().enumerate() {
            let at = &mut out[lane * SEGMENT + step..lane * SEGMENT + step + 4];
            _mm256_storeu_si256(at.as_mut_ptr().cast(), draws);
        }
    }
    let last = |v| _mm256_extract_epi64::<3>(v) as u64;
    [last(s0), last(s1), last(s2), last(s3)]
}

/// The state `SEGMENT` steps after `s`.
fn segment_ahead(s: &[u64; 4]) -> [u64; 4] {
    let columns = jump_columns();
    let mut ahead = [0u64; 4];
    for (w, &word) in s.iter().enumerate() {
        let mut bits = word;
        while bits != 0 {
            let column = &columns[64 * w + bits.trailing_zeros() as usize];
            for (a, c) in ahead.iter_mut().zip(column) {
                *a ^= c;
            }
            bits &= bits - 1;
        }
    }
    ahead
}

/// Column i of the matrix stepping the state `SEGMENT` times: where that many
/// steps take the state with only bit i set (the step is linear over GF(2),
/// so any state's image is the XOR of its set bits' columns).
fn jump_columns() -> &'static [[u64; 4]; 256] {
    static COLUMNS: OnceLock<Box<[[u64; 4]; 256]>> = OnceLock::new();
    COLUMNS.get_or_init(|| {
        let mut columns = Box::new([[0u64; 4]; 256]);
        for (i, column) in columns.iter_mut().enumerate() {
            let mut unit = Stream { s: [0; 4] };
            unit.s[i / 64] = 1 << (i % 64);
            for _ in 0..SEGMENT {
                unit.next_u64();
            }
            *column = unit.s;
        }
        columns
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_xoshiro::Xoshiro256PlusPlus;

    /// Blocks, short fills and single draws interleaved give rand_xoshiro's
    /// sequence, draw for draw.
    #[test]
    fn every_way_of_drawing_gives_rand_xoshiros_sequence() {
        for seed in [0, 1, 7, u64::MAX, 0x9e37_79b9_7f4a_7c15] {
            let mut reference = Xoshiro256PlusPlus::seed_from_u64(seed);
            let mut stream = Stream::seed_from_u64(seed);
            let mut buffer = vec![0u64; BLOCK];
            for len in [BLOCK, 3, BLOCK, BLOCK, 1, BLOCK - 1, BLOCK] {
                stream.fill(&mut buffer[..len]);
                for (i, &draw) in buffer[..len].iter().enumerate() {
                    assert_eq!(draw, reference.next_u64(), "seed {seed}, draw {i} of {len}");
                }
                assert_eq!(stream.next_u64(), reference.next_u64());
            }
        }
    }

    /// Both lane implementations (whichever the CPU runs in `fill`) give a
    /// block of the sequence and the state after it.
    #[test]
    fn both_lane_implementations_give_the_block() {
        let mut reference = Xoshiro256PlusPlus::seed_from_u64(11);
        let mut stream = Stream::seed_from_u64(11);
        let expected: Vec<u64> = (0..BLOCK).map(|_| reference.next_u64()).collect();
        let lanes = stream.lane_starts();
        let mut out = vec![0u64; BLOCK];
        stream = lanes_portable(lanes.clone(), &mut out);
        assert_eq!(out, expected);
        assert_eq!(stream.next_u64(), reference.clone().next_u64());
        #[cfg(target_arch = "x86_64")]
        if crate::elementwise::has_avx2() {
            out.fill(0);
            // SAFETY: AVX2 checked.
            let end = unsafe { lanes_avx2(&lanes, &mut out) };
            assert_eq!(out, expected);
            assert_eq!(Stream { s: end }.next_u64(), reference.next_u64());
        }
    }
}
