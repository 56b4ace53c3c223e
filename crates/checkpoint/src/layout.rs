use safetensors::Dtype;

use crate::{Error, Result};

/// mergekit's default shard size: 5 GB.
pub const DEFAULT_SHARD_BYTES: u64 = 5_000_000_000;

/// One output tensor as the writer needs to know it before any data exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: Dtype, shape: Vec<usize>) -> Self {
        Self {
            name: name.into(),
            dtype,
            shape,
        }
    }

    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    pub fn byte_len(&self) -> u64 {
        self.numel() * self.dtype.bitsize() as u64 / 8
    }
}

/// Which shard each tensor goes to: tensors in the given order, a new shard
/// started whenever the next tensor would push the current one past the limit
/// (a tensor larger than the limit gets a shard of its own), as mergekit does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    /// Tensors of each shard, in file order.
    pub shards: Vec<Vec<TensorSpec>>,
}

impl ShardLayout {
    pub fn plan(specs: Vec<TensorSpec>, max_shard_bytes: u64) -> Self {
        let mut shards: Vec<Vec<TensorSpec>> = vec![];
        let mut current_bytes = 0u64;
        for spec in specs {
            let bytes = spec.byte_len();
            match shards.last_mut() {
                Some(shard) if current_bytes + bytes <= max_shard_bytes => {
                    current_bytes += bytes;
                    shard.push(spec);
                }
                Some(shard) if shard.is_empty() => {
                    current_bytes = bytes;
                    shard.push(spec);
                }
                _ => {
                    current_bytes = bytes;
                    shards.push(vec![spec]);
                }
            }
        }
        if shards.is_empty() {
            shards.push(vec![]);
        }
        Self { shards }
    }

    /// `model.safetensors` for a single shard, else `model-0000K-of-0000N.safetensors`.
    pub fn file_name(&self, shard: usize) -> String {
        let n = self.shards.len();
        if n == 1 {
            "model.safetensors".into()
        } else {
            format!("model-{:05}-of-{:05}.safetensors", shard + 1, n)
        }
    }

    pub fn total_bytes(&self) -> u64 {
        self.shards.iter().flatten().map(TensorSpec::byte_len).sum()
    }
}

/// Parses a byte size: a plain number, SI suffixes (`KB`, `MB`, `GB`, `TB`),
/// binary ones (`KiB`, `MiB`, `GiB`) and mergekit's `K`/`M`/`B` (thousand,
/// million, billion — so mergekit's `5B` means 5 GB).
pub fn parse_byte_size(text: &str) -> Result<u64> {
    let err = |message: &str| Error::ByteSize {
        text: text.into(),
        message: message.into(),
    };
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let number: f64 = number.parse().map_err(|_| err("expected a number"))?;
    let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" => 1.0,
        "k" | "kb" => 1e3,
        "m" | "mb" => 1e6,
        "b" | "g" | "gb" => 1e9,
        "t" | "tb" => 1e12,
        "kib" => 1024.0,
        "mib" => 1024.0 * 1024.0,
        "gib" => 1024.0 * 1024.0 * 1024.0,
        _ => return Err(err("unknown unit (use KB, MB, GB, KiB, MiB, GiB or K/M/B)")),
    };
    let bytes = number * scale;
    if !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(err("too large: sizes go up to 18 EB (2^64 bytes)"));
    }
    if bytes < 1.0 {
        return Err(err("must be at least one byte"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, bytes: usize) -> TensorSpec {
        TensorSpec::new(name, Dtype::U8, vec![bytes])
    }

    #[test]
    fn shards_split_before_the_limit_and_oversize_tensors_stand_alone() {
        let layout = ShardLayout::plan(
            vec![
                spec("a", 4),
                spec("b", 4),
                spec("c", 3),
                spec("big", 20),
                spec("d", 1),
            ],
            10,
        );
        let names: Vec<Vec<&str>> = layout
            .shards
            .iter()
            .map(|s| s.iter().map(|t| t.name.as_str()).collect())
            .collect();
        assert_eq!(
            names,
            vec![vec!["a", "b"], vec!["c"], vec!["big"], vec!["d"]]
        );
        assert_eq!(layout.file_name(1), "model-00002-of-00004.safetensors");
        assert_eq!(layout.total_bytes(), 32);
    }

    #[test]
    fn one_shard_is_model_safetensors() {
        let layout = ShardLayout::plan(vec![spec("a", 4)], DEFAULT_SHARD_BYTES);
        assert_eq!(layout.file_name(0), "model.safetensors");
    }

    #[test]
    fn byte_sizes_parse_in_every_spelling() {
        assert_eq!(parse_byte_size("1000").unwrap(), 1000);
        assert_eq!(parse_byte_size("5B").unwrap(), 5_000_000_000);
        assert_eq!(parse_byte_size("1GB").unwrap(), 1_000_000_000);
        assert_eq!(parse_byte_size("2GiB").unwrap(), 2 << 30);
        assert_eq!(parse_byte_size("1.5 MB").unwrap(), 1_500_000);
        assert!(parse_byte_size("lots").is_err());
        assert!(parse_byte_size("0").is_err());
        assert!(parse_byte_size("3 parsecs").is_err());
        let huge = parse_byte_size("99999999999999999999GB")
            .unwrap_err()
            .to_string();
        assert!(huge.contains("too large"), "{huge}");
        let zero = parse_byte_size("0.1").unwrap_err().to_string();
        assert!(zero.contains("at least one byte"), "{zero}");
    }
}
