//! Mapping between safetensors dtypes, libtorch kinds and the names used in
//! `config.json` and recipes.

use safetensors::Dtype;
use tch::Kind;

/// The libtorch kind for a safetensors dtype, where libtorch has one.
pub fn kind_from_dtype(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::BOOL => Kind::Bool,
        Dtype::U8 => Kind::Uint8,
        Dtype::I8 => Kind::Int8,
        Dtype::I16 => Kind::Int16,
        Dtype::I32 => Kind::Int,
        Dtype::I64 => Kind::Int64,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F32 => Kind::Float,
        Dtype::F64 => Kind::Double,
        Dtype::F8_E5M2 => Kind::Float8e5m2,
        Dtype::F8_E4M3 => Kind::Float8e4m3fn,
        Dtype::F8_E5M2FNUZ => Kind::Float8e5m2fnuz,
        Dtype::F8_E4M3FNUZ => Kind::Float8e4m3fnuz,
        _ => return None,
    })
}

/// The safetensors dtype for a libtorch kind, where safetensors has one.
pub fn dtype_from_kind(kind: Kind) -> Option<Dtype> {
    Some(match kind {
        Kind::Bool => Dtype::BOOL,
        Kind::Uint8 => Dtype::U8,
        Kind::Int8 => Dtype::I8,
        Kind::Int16 => Dtype::I16,
        Kind::Int => Dtype::I32,
        Kind::Int64 => Dtype::I64,
        Kind::Half => Dtype::F16,
        Kind::BFloat16 => Dtype::BF16,
        Kind::Float => Dtype::F32,
        Kind::Double => Dtype::F64,
        Kind::Float8e5m2 => Dtype::F8_E5M2,
        Kind::Float8e4m3fn => Dtype::F8_E4M3,
        Kind::Float8e5m2fnuz => Dtype::F8_E5M2FNUZ,
        Kind::Float8e4m3fnuz => Dtype::F8_E4M3FNUZ,
        _ => return None,
    })
}

/// How many of `bytes` (little-endian values of `dtype`, whole elements)
/// are NaN or ±infinity: an all-ones exponent. 0 for integer dtypes.
pub fn count_nonfinite(dtype: Dtype, bytes: &[u8]) -> u64 {
    // Blocks counted in u32 with branch-free adds: the compiler vectorises
    // them (about 3× faster than counting with a filter); one pass over
    // every output byte, so it matters.
    macro_rules! count {
        ($word:ty, $n:expr, $exponent:expr) => {{
            let exponent: $word = $exponent;
            bytes
                .chunks(1 << 16)
                .map(|block| {
                    block
                        .chunks_exact($n)
                        .map(|element| {
                            let word = <$word>::from_le_bytes(element.try_into().unwrap());
                            u32::from(word & exponent == exponent)
                        })
                        .sum::<u32>() as u64
                })
                .sum()
        }};
    }
    match dtype {
        Dtype::F16 => count!(u16, 2, 0x7c00),
        Dtype::BF16 => count!(u16, 2, 0x7f80),
        Dtype::F32 => count!(u32, 4, 0x7f80_0000),
        Dtype::F64 => count!(u64, 8, 0x7ff0_0000_0000_0000),
        Dtype::F8_E5M2 => count!(u8, 1, 0x7c),
        // E4M3FN has no infinities; only S.1111.111 is NaN.
        Dtype::F8_E4M3 => count!(u8, 1, 0x7f),
        _ => 0,
    }
}

/// The PyTorch name of a dtype, as `config.json`'s `torch_dtype` spells it.
pub fn dtype_name(dtype: Dtype) -> String {
    match dtype {
        Dtype::F32 => "float32".into(),
        Dtype::F16 => "float16".into(),
        Dtype::BF16 => "bfloat16".into(),
        Dtype::F64 => "float64".into(),
        Dtype::BOOL => "bool".into(),
        Dtype::U8 => "uint8".into(),
        Dtype::I8 => "int8".into(),
        Dtype::I16 => "int16".into(),
        Dtype::I32 => "int32".into(),
        Dtype::I64 => "int64".into(),
        other => format!("{other:?}").to_lowercase(),
    }
}

/// The float dtype a PyTorch name ([`dtype_name`]'s) names. What users
/// write, with its short forms, is parsed once, by the recipe crate's
/// `FloatDtype`.
pub fn parse_dtype(text: &str) -> Option<Dtype> {
    [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64]
        .into_iter()
        .find(|&dtype| dtype_name(dtype) == text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonfinite_values_are_counted_in_every_float_dtype() {
        let values = [
            0.0f64,
            1.5,
            -2.0,
            f64::NAN,
            f64::INFINITY,
            f64::NEG_INFINITY,
            65504.0,
        ];
        for kind in [Kind::Half, Kind::BFloat16, Kind::Float, Kind::Double] {
            let t = tch::Tensor::from_slice(&values).to_kind(kind);
            let mut bytes = vec![0u8; t.numel() * kind.elt_size_in_bytes()];
            t.copy_data_u8(&mut bytes, t.numel());
            let dtype = dtype_from_kind(kind).unwrap();
            assert_eq!(count_nonfinite(dtype, &bytes), 3, "{kind:?}");
        }
        // 1e6 overflows F16 to infinity.
        let big = tch::Tensor::from_slice(&[1e6f32]).to_kind(Kind::Half);
        let mut bytes = [0u8; 2];
        big.copy_data_u8(&mut bytes, 1);
        assert_eq!(count_nonfinite(Dtype::F16, &bytes), 1);
        assert_eq!(count_nonfinite(Dtype::I32, &[0xff; 8]), 0);
    }

    #[test]
    fn every_mapped_dtype_round_trips_through_kind() {
        for dtype in [
            Dtype::BOOL,
            Dtype::U8,
            Dtype::I8,
            Dtype::I16,
            Dtype::I32,
            Dtype::I64,
            Dtype::F16,
            Dtype::BF16,
            Dtype::F32,
            Dtype::F64,
            Dtype::F8_E5M2,
            Dtype::F8_E4M3,
        ] {
            let kind = kind_from_dtype(dtype).unwrap();
            assert_eq!(dtype_from_kind(kind), Some(dtype));
            assert_eq!(kind.elt_size_in_bytes() * 8, dtype.bitsize());
        }
        assert_eq!(kind_from_dtype(Dtype::U16), None);
    }

    #[test]
    fn dtype_names_parse_back() {
        for dtype in [Dtype::F32, Dtype::F16, Dtype::BF16, Dtype::F64] {
            assert_eq!(parse_dtype(&dtype_name(dtype)), Some(dtype));
        }
        assert_eq!(parse_dtype("int4"), None);
    }
}
