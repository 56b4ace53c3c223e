//! Google's MatFormer slicing tables (CSV) on hostile text. The first line of
//! the input names the row to look up; the rest is the table.
#![no_main]

use std::path::Path;

use amalgam_elastic::matformer::slicing_table;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let (row, table) = match data.iter().position(|&b| b == b'\n') {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let row = String::from_utf8_lossy(row);
    let _ = slicing_table::parse(table, Path::new("configs.csv"), &row);
});
