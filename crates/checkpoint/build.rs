//! Compiles every family description in `families/*.json` into the crate:
//! writes `$OUT_DIR/families.rs`, a list of `(model_type, text)` sorted by
//! file name, that `family::families()` includes. Adding a family is adding
//! a file; nothing lists them by hand.

use std::path::Path;

fn main() {
    println!("cargo:rerun-if-changed=families");
    let dir = Path::new("families");
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .expect("families/ is readable")
        .map(|entry| entry.expect("families/ lists").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .map(|path| {
            path.file_stem()
                .and_then(|s| s.to_str())
                .expect("a family file is named MODEL_TYPE.json")
                .to_owned()
        })
        .collect();
    names.sort();
    let mut list = String::from("&[\n");
    for name in &names {
        list.push_str(&format!(
            "    ({name:?}, include_str!(concat!(env!(\"CARGO_MANIFEST_DIR\"), {:?}))),\n",
            format!("/families/{name}.json")
        ));
    }
    list.push_str("]\n");
    let out = Path::new(&std::env::var("OUT_DIR").expect("cargo sets OUT_DIR")).join("families.rs");
    std::fs::write(out, list).expect("OUT_DIR is writable");
}
