//! Direct access to tensor data for the fused element-wise loops (linear and
//! the task-vector family), with libtorch's rounding rules: each operation on
//! a 16-bit float is computed in f32 and rounded to the 16-bit type, sums
//! accumulate in f32 and round once — so a fused loop gives the same bits as
//! the equivalent chain of libtorch kernels, in one pass through the cache.

use std::ops::{Add, Div, Mul, Sub};

use half::{bf16, f16};
use tch::{Device, Kind, Tensor};

/// The arithmetic type a loop computes in: f32, or f64 for f64 tensors.
pub trait Real:
    Copy
    + PartialOrd
    + Add<Output = Self>
    + Sub<Output = Self>
    + Mul<Output = Self>
    + Div<Output = Self>
{
    const ZERO: Self;
    const ONE: Self;
    /// A Python-style scalar as libtorch converts it for a tensor of this type.
    fn from_f64(x: f64) -> Self;
    fn to_f64(self) -> f64;
    fn abs(self) -> Self;
    /// |x| as the f32 the magnitude ranking compares.
    fn magnitude(self) -> f32;
    /// 1 or 0 by conversion, not a branch (masks are random, branches on
    /// them mispredict): multiplying by it is a mask product.
    fn indicator(keep: bool) -> Self;
}

impl Real for f32 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x as f32
    }
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn abs(self) -> Self {
        f32::abs(self)
    }
    fn magnitude(self) -> f32 {
        self.abs()
    }
    fn indicator(keep: bool) -> Self {
        f32::from(u8::from(keep))
    }
}

impl Real for f64 {
    const ZERO: Self = 0.0;
    const ONE: Self = 1.0;
    fn from_f64(x: f64) -> Self {
        x
    }
    fn to_f64(self) -> f64 {
        self
    }
    fn abs(self) -> Self {
        f64::abs(self)
    }
    fn magnitude(self) -> f32 {
        self.abs() as f32
    }
    fn indicator(keep: bool) -> Self {
        f64::from(u8::from(keep))
    }
}

/// A floating-point element type of tensor data.
pub trait Element: Copy + Send + Sync + 'static {
    const KIND: Kind;
    type Math: Real;
    fn widen(self) -> Self::Math;
    fn narrow(x: Self::Math) -> Self;
    /// `x` rounded to this type: the result of one libtorch op in this dtype.
    fn round(x: Self::Math) -> Self::Math {
        Self::narrow(x).widen()
    }
}

macro_rules! native {
    ($t:ty, $kind:expr) => {
        impl Element for $t {
            const KIND: Kind = $kind;
            type Math = $t;
            fn widen(self) -> $t {
                self
            }
            fn narrow(x: $t) -> $t {
                x
            }
        }
    };
}
native!(f32, Kind::Float);
native!(f64, Kind::Double);

impl Element for f16 {
    const KIND: Kind = Kind::Half;
    type Math = f32;
    fn widen(self) -> f32 {
        self.to_f32()
    }
    fn narrow(x: f32) -> f16 {
        f16::from_f32(x)
    }
}

impl Element for bf16 {
    const KIND: Kind = Kind::BFloat16;
    type Math = f32;
    /// A shift, as libtorch widens (`half` branches on NaN, which stops vectorisation).
    #[inline(always)]
    fn widen(self) -> f32 {
        f32::from_bits(u32::from(self.to_bits()) << 16)
    }
    #[inline(always)]
    fn narrow(x: f32) -> bf16 {
        bf16::from_bits((round_bf16(x).to_bits() >> 16) as u16)
    }
    #[inline(always)]
    fn round(x: f32) -> f32 {
        round_bf16(x)
    }
}

/// `x` rounded to the nearest bf16 (ties to even) without branches, which
/// mispredict on data: the rounding runs several times per merged entry.
#[inline(always)]
fn round_bf16(x: f32) -> f32 {
    let bits = x.to_bits();
    let rounded = f32::from_bits(bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) & 0xffff_0000);
    if x.is_nan() {
        f32::NAN
    } else {
        rounded
    }
}

/// Whether this CPU runs the fused loops' AVX2 builds (x86-64 with AVX2 and
/// FMA; detected once). The loops are compiled twice — for the baseline
/// target and with AVX2 (8 f32 lanes, where the baseline has 4) — and each
/// entry point picks one; FMA is enabled only because AVX2 CPUs have it:
/// Rust never fuses a product and a sum, so both builds round alike.
#[cfg(target_arch = "x86_64")]
pub fn has_avx2() -> bool {
    is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma")
}

/// Libtorch kernels that round as the fused loops do: math in f32 (f64 for
/// f64 tensors), the result of each step rounded to the tensors' dtype — the
/// element-wise methods on an accelerator.
pub struct Rounding {
    /// The tensors' dtype.
    pub kind: Kind,
    /// The math dtype.
    pub wide: Kind,
}

impl Rounding {
    pub fn new(kind: Kind) -> Self {
        let wide = if kind == Kind::Double {
            Kind::Double
        } else {
            Kind::Float
        };
        Rounding { kind, wide }
    }

    /// `t` (in the math dtype) rounded to the tensors' dtype, as one op in it rounds.
    pub fn round(&self, t: Tensor) -> Tensor {
        if self.kind == self.wide {
            t
        } else {
            t.to_kind(self.kind).to_kind(self.wide)
        }
    }

    /// `x` as the math dtype holds it.
    pub fn scalar(&self, x: f64) -> f64 {
        if self.wide == Kind::Float {
            f64::from(x as f32)
        } else {
            x
        }
    }

    /// `t / x`, divided: CUDA multiplies by the reciprocal of a host scalar
    /// (one bit less exact), so `x` goes to `t`'s device as a 0-dim tensor.
    pub fn divide(&self, t: Tensor, x: f64) -> Tensor {
        let divisor = Tensor::from(self.scalar(x))
            .to_kind(self.wide)
            .to_device(t.device());
        t / divisor
    }
}

/// Calls `$body` with `$t` bound to the element type of the float kind `$kind`.
macro_rules! with_element {
    ($kind:expr, $t:ident => $body:expr) => {
        match $kind {
            tch::Kind::Float => {
                type $t = f32;
                $body
            }
            tch::Kind::Double => {
                type $t = f64;
                $body
            }
            tch::Kind::BFloat16 => {
                type $t = half::bf16;
                $body
            }
            tch::Kind::Half => {
                type $t = half::f16;
                $body
            }
            other => unreachable!("the math dtype is a float type, not {other:?}"),
        }
    };
}
pub(crate) use with_element;

/// `t` flattened, contiguous and on the CPU (a view when it already is).
pub fn flat_cpu(t: &Tensor) -> Tensor {
    t.reshape([-1]).to_device(Device::Cpu).contiguous()
}

/// The data of a contiguous CPU tensor of element type `T`.
pub fn slice<T: Element>(t: &Tensor) -> &[T] {
    check::<T>(t);
    let len = t.numel();
    if len == 0 {
        return &[];
    }
    // SAFETY: a contiguous CPU tensor of `len` elements of `T` (checked), borrowed as long as `t`.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const T, len) }
}

/// The data of a contiguous CPU tensor of element type `T`, writable. The
/// tensor must own its storage (a fresh output), so no other view aliases it.
pub fn slice_mut<T: Element>(t: &mut Tensor) -> &mut [T] {
    check::<T>(t);
    let len = t.numel();
    if len == 0 {
        return &mut [];
    }
    // SAFETY: as in `slice`; the exclusive borrow of a fresh tensor makes this the only access.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut T, len) }
}

fn check<T: Element>(t: &Tensor) {
    assert!(
        t.kind() == T::KIND && t.is_contiguous() && t.device() == Device::Cpu,
        "a contiguous CPU {:?} tensor, not {:?} on {:?}",
        T::KIND,
        t.kind(),
        t.device()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `round` agrees with libtorch's own f32 → 16-bit conversion, ties included.
    #[test]
    fn rounding_matches_libtorch() {
        let values: Vec<f32> = (0..20_000)
            .map(|i| f32::from_bits(0x3f80_0000 + i * 0x1234 + (i % 3)))
            // Exact halfway cases for bf16 (ties to even, both ways), and f16 overflow.
            .chain([0x3f80_8000, 0x3f81_8000].map(f32::from_bits))
            .chain([-2.5e-3, 65504.0, 7e4])
            .collect();
        let tensor = Tensor::from_slice(&values);
        for kind in [Kind::BFloat16, Kind::Half] {
            let expected: Vec<f32> =
                Vec::try_from(tensor.to_kind(kind).to_kind(Kind::Float)).expect("f32 values");
            let ours: Vec<f32> = with_element!(kind, T => values
                .iter()
                .map(|&x| T::round(<T as Element>::Math::from_f64(f64::from(x))).to_f64() as f32)
                .collect());
            assert_eq!(
                ours.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                "{kind:?}"
            );
        }
    }
}
