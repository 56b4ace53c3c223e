//! The floating-point dtypes a recipe or the command line names: one list,
//! with every spelling accepted for each.

use std::fmt;
use std::str::FromStr;

/// A dtype tensors are computed or saved in (`dtype:`/`out_dtype:` in a
/// recipe, `--dtype` on the command line).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FloatDtype {
    Float32,
    Float16,
    BFloat16,
}

impl FloatDtype {
    /// Every float dtype, in the order messages list them.
    pub const ALL: [FloatDtype; 3] = [Self::Float32, Self::Float16, Self::BFloat16];

    /// PyTorch's name: what `config.json`'s `torch_dtype` and mergekit write.
    pub const fn name(self) -> &'static str {
        self.spellings()[0]
    }

    /// Every spelling accepted, PyTorch's name first, then the short forms
    /// (compared without regard to case, with or without mergekit's
    /// `torch.` prefix).
    pub const fn spellings(self) -> &'static [&'static str] {
        match self {
            Self::Float32 => &["float32", "fp32", "f32", "float"],
            Self::Float16 => &["float16", "fp16", "f16", "half"],
            Self::BFloat16 => &["bfloat16", "bf16"],
        }
    }

    /// The dtype `text` names, any spelling.
    pub fn parse(text: &str) -> Option<Self> {
        let lower = text.trim().to_ascii_lowercase();
        let name = lower.strip_prefix("torch.").unwrap_or(&lower);
        Self::ALL
            .into_iter()
            .find(|dtype| dtype.spellings().contains(&name))
    }

    /// The names, for messages: `float32, float16, bfloat16`.
    pub fn names() -> String {
        Self::ALL.map(Self::name).join(", ")
    }

    /// The safetensors dtype of the same name.
    pub const fn safetensors(self) -> safetensors::Dtype {
        match self {
            Self::Float32 => safetensors::Dtype::F32,
            Self::Float16 => safetensors::Dtype::F16,
            Self::BFloat16 => safetensors::Dtype::BF16,
        }
    }

    /// Bits per value.
    pub const fn bits(self) -> usize {
        match self {
            Self::Float32 => 32,
            Self::Float16 | Self::BFloat16 => 16,
        }
    }
}

impl fmt::Display for FloatDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for FloatDtype {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, String> {
        Self::parse(text).ok_or_else(|| {
            let short: Vec<&str> = Self::ALL
                .iter()
                .flat_map(|d| d.spellings()[1..].iter().copied())
                .collect();
            format!(
                "unknown dtype `{text}` (use {}; also {})",
                Self::names(),
                short.join(", ")
            )
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_parses_to_its_dtype() {
        for dtype in FloatDtype::ALL {
            for spelling in dtype.spellings() {
                assert_eq!(FloatDtype::parse(spelling), Some(dtype));
                assert_eq!(FloatDtype::parse(&spelling.to_uppercase()), Some(dtype));
                assert_eq!(FloatDtype::parse(&format!("torch.{spelling}")), Some(dtype));
            }
            assert_eq!(dtype.name().parse::<FloatDtype>(), Ok(dtype));
            assert_eq!(dtype.to_string(), dtype.name());
        }
        assert_eq!(FloatDtype::parse("BF16"), Some(FloatDtype::BFloat16));
        assert_eq!(FloatDtype::parse("float8"), None);
        let error = "int8".parse::<FloatDtype>().unwrap_err();
        assert!(
            error.starts_with("unknown dtype `int8` (use float32, float16, bfloat16; also fp32"),
            "{error}"
        );
    }

    #[test]
    fn bits_match_safetensors() {
        for dtype in FloatDtype::ALL {
            assert_eq!(dtype.bits(), dtype.safetensors().bitsize());
        }
    }
}
