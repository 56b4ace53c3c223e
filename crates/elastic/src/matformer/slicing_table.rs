//! Google's published MatFormer slicing tables (`configs.csv` of the Gemma 3n
//! slicing configs): one row per submodel, with the FFN width of every kept
//! layer (`"[2_048 * 4, 2_048 * 8, …]"`) and the original indices of the
//! skipped layers (`"[20, 21, …]"`, or empty).

use std::path::Path;

use crate::{ElasticError, Result};

const WIDTHS_COLUMN: &str = "FFN Hidden Dims";
const SKIPPED_COLUMN: &str = "Layers Skipped";

/// One row of a slicing table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSlice {
    pub name: String,
    /// One width per kept layer.
    pub widths: Vec<usize>,
    pub skip: Vec<usize>,
}

/// The most bytes of a slicing table read (Google's is a few KB).
const MAX_TABLE_BYTES: u64 = 16 << 20;

/// Reads the row called `slice` from the table at `path` (a regular file).
pub fn read(path: &Path, slice: &str) -> Result<TableSlice> {
    let bytes = amalgam_checkpoint::read_regular(path, MAX_TABLE_BYTES, "a slicing table")
        .map_err(|e| ElasticError::Table {
            path: path.into(),
            message: format!("cannot read the slicing table: {e}"),
        })?;
    parse(&bytes, path, slice)
}

/// The row called `slice` of the table in `bytes` (read from `path`, which
/// errors name).
pub fn parse(bytes: &[u8], path: &Path, slice: &str) -> Result<TableSlice> {
    let error = |message: String| ElasticError::Table {
        path: path.into(),
        message,
    };
    let mut reader = csv::ReaderBuilder::new().flexible(true).from_reader(bytes);
    let headers = reader
        .headers()
        .map_err(|e| error(format!("cannot read the header row: {e}")))?
        .clone();
    let column = |name: &str| {
        headers.iter().position(|h| h.trim() == name).ok_or_else(|| {
            error(format!(
                "no `{name}` column (expected Google's format: name, …, {WIDTHS_COLUMN}, {SKIPPED_COLUMN})"
            ))
        })
    };
    let (name_column, widths_column, skipped_column) = (
        column("name")?,
        column(WIDTHS_COLUMN)?,
        column(SKIPPED_COLUMN)?,
    );
    let mut names = vec![];
    for (row, record) in reader.records().enumerate() {
        let record = record.map_err(|e| error(format!("row {}: {e}", row + 2)))?;
        let name = record.get(name_column).unwrap_or_default().trim();
        if name != slice {
            names.push(name.to_owned());
            continue;
        }
        let at =
            |what: &str, message: String| error(format!("row {} ({what}): {message}", row + 2));
        let widths = list(record.get(widths_column).unwrap_or_default())
            .map_err(|m| at(WIDTHS_COLUMN, m))?;
        let skip = list(record.get(skipped_column).unwrap_or_default())
            .map_err(|m| at(SKIPPED_COLUMN, m))?;
        if widths.is_empty() {
            return Err(at(WIDTHS_COLUMN, "no widths".into()));
        }
        return Ok(TableSlice {
            name: name.into(),
            widths: widths.into_iter().map(|w| w as usize).collect(),
            skip: skip.into_iter().map(|l| l as usize).collect(),
        });
    }
    Err(error(format!(
        "no row named {slice:?}; the table has: {}",
        names
            .iter()
            .map(|n| format!("{n:?}"))
            .collect::<Vec<_>>()
            .join(", ")
    )))
}

/// A bracketed list of integer products (`[2_048 * 4, 16384]`); empty text is
/// an empty list.
fn list(text: &str) -> std::result::Result<Vec<u64>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(vec![]);
    }
    let inner = text
        .strip_prefix('[')
        .and_then(|t| t.strip_suffix(']'))
        .ok_or_else(|| format!("expected a [bracketed, list], got {text:?}"))?;
    if inner.trim().is_empty() {
        return Ok(vec![]);
    }
    inner
        .split(',')
        .map(|item| {
            let not_a_product = || format!("{:?} is not an integer product", item.trim());
            item.split('*').try_fold(1u64, |product, factor| {
                let factor: u64 = factor
                    .trim()
                    .replace('_', "")
                    .parse()
                    .map_err(|_| not_a_product())?;
                product
                    .checked_mul(factor)
                    .ok_or_else(|| format!("{:?} is too large", item.trim()))
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_read_in_googles_format() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("configs.csv");
        std::fs::write(
            &path,
            "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n\
             Main model,3,1.0,50%,\"[2_048 * 8, 2_048 * 8, 16384]\",\n\
             Config for small,2,0.5,40%,\"[2_048 * 4, 96]\",\"[1]\"\n",
        )
        .unwrap();
        let main = read(&path, "Main model").unwrap();
        assert_eq!(main.widths, [16384, 16384, 16384]);
        assert!(main.skip.is_empty());
        let small = read(&path, "Config for small").unwrap();
        assert_eq!(small.widths, [8192, 96]);
        assert_eq!(small.skip, [1]);
        let missing = read(&path, "E9B").unwrap_err().to_string();
        assert!(
            missing.contains("no row named \"E9B\"") && missing.contains("\"Main model\""),
            "{missing}"
        );
        assert!(list("[2_048 * x]")
            .unwrap_err()
            .contains("not an integer product"));
        assert!(list("20, 21").unwrap_err().contains("bracketed"));
        assert!(list("[99999999999 * 99999999999]")
            .unwrap_err()
            .contains("too large"));
    }
}
