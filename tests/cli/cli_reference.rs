//! The book's CLI reference (docs/src/reference/cli.md) is the binary's own
//! help, every command and subcommand: this test renders it and fails when the
//! page is stale. `AMALGAM_BLESS=1 cargo test --test cli cli_reference`
//! rewrites the page.

use std::path::Path;

use crate::common::ok;

/// The subcommands a help text lists under `Commands:` or, at the top, under
/// each group's `… commands:` heading (`help` left out).
fn subcommands(help: &str) -> Vec<String> {
    let mut names = vec![];
    let mut listing = false;
    for line in help.lines() {
        if !line.starts_with("  ") {
            listing = line.ends_with("ommands:");
            continue;
        }
        match line.split_whitespace().next() {
            Some(name) if listing && name != "help" => names.push(name.to_owned()),
            _ => {}
        }
    }
    names
}

/// `amalgam PATH… --help` for `path` and, depth first, every subcommand under it.
fn render(path: &mut Vec<String>, page: &mut String) {
    let mut args = path.clone();
    args.push("--help".to_owned());
    let help = ok(&args);
    page.push_str(&format!(
        "\n## `amalgam{}`\n\n```text\n{}\n```\n",
        path.iter().map(|p| format!(" {p}")).collect::<String>(),
        help.trim_end()
    ));
    for sub in subcommands(&help) {
        path.push(sub);
        render(path, page);
        path.pop();
    }
}

#[test]
fn cli_reference_is_the_binarys_help() {
    let mut page = String::from(
        "# Command-line reference\n\n\
         Every command's `--help`, generated from the binary by \
         `tests/cli/cli_reference.rs` (a test fails when this page is stale; \
         `AMALGAM_BLESS=1 cargo test --test cli cli_reference` rewrites it).\n",
    );
    render(&mut Vec::new(), &mut page);
    let file = Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/src/reference/cli.md");
    if std::env::var_os("AMALGAM_BLESS").is_some() {
        std::fs::write(&file, &page).unwrap();
    }
    let committed = std::fs::read_to_string(&file).unwrap_or_default();
    assert!(
        committed == page,
        "{} is stale: run `AMALGAM_BLESS=1 cargo test --test cli cli_reference`",
        file.display()
    );
}
