//! The docs hold together: the README stays a short entry point, every page
//! the book's summary lists exists, every relative link in the README, the
//! book, CHANGELOG and CONTRIBUTING reaches a file, and user docs cite no
//! tracker numbers (readers cannot see the tracker).

use std::path::{Path, PathBuf};

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The user docs: README, CHANGELOG, CONTRIBUTING and every book page.
fn user_docs() -> Vec<PathBuf> {
    let mut docs: Vec<PathBuf> = ["README.md", "CHANGELOG.md", "CONTRIBUTING.md"]
        .iter()
        .map(|name| root().join(name))
        .collect();
    let mut stack = vec![root().join("docs/src")];
    while let Some(dir) = stack.pop() {
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "md") {
                docs.push(path);
            }
        }
    }
    docs.sort();
    docs
}

/// The targets of a Markdown file's inline links `](target)`, outside code.
fn link_targets(text: &str) -> Vec<String> {
    let mut in_code = false;
    let mut targets = Vec::new();
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_code = !in_code;
            continue;
        }
        if in_code {
            continue;
        }
        let line: String = line.split('`').step_by(2).collect();
        let mut rest = line.as_str();
        while let Some(start) = rest.find("](") {
            let after = &rest[start + 2..];
            let end = after.find(')').unwrap_or(after.len());
            targets.push(after[..end].to_owned());
            rest = &after[end..];
        }
    }
    targets
}

#[test]
fn the_readme_is_short_and_every_link_resolves() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = readme.lines().count();
    assert!(
        lines <= 300,
        "README.md has {lines} lines: move detail into the book"
    );

    let mut broken = Vec::new();
    for doc in user_docs() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for target in link_targets(&text) {
            let file = target.split('#').next().unwrap();
            if file.is_empty() || file.contains("://") || file.starts_with("mailto:") {
                continue;
            }
            if !doc.parent().unwrap().join(file).exists() {
                broken.push(format!("{}: {target}", doc.display()));
            }
        }
    }
    assert!(
        broken.is_empty(),
        "links to missing files:\n{}",
        broken.join("\n")
    );
}

#[test]
fn every_page_the_book_lists_exists_and_every_page_is_listed() {
    let src = root().join("docs/src");
    let summary = std::fs::read_to_string(src.join("SUMMARY.md")).unwrap();
    let listed: Vec<PathBuf> = link_targets(&summary).iter().map(|t| src.join(t)).collect();
    for page in &listed {
        assert!(page.exists(), "SUMMARY.md lists {}", page.display());
    }
    for page in user_docs()
        .into_iter()
        .filter(|p| p.starts_with(&src) && !p.ends_with("SUMMARY.md"))
    {
        assert!(
            listed.contains(&page),
            "{} is not in SUMMARY.md",
            page.display()
        );
    }
}

#[test]
fn user_docs_cite_no_tracker_numbers() {
    let mut found = Vec::new();
    for doc in user_docs() {
        let text = std::fs::read_to_string(&doc).unwrap();
        for (number, line) in text.lines().enumerate() {
            let lower = line.to_lowercase();
            let cites = ["issue ", "issues ", "issue #", "#"].iter().any(|prefix| {
                lower.match_indices(prefix).any(|(at, _)| {
                    let after = &lower[at + prefix.len()..];
                    let digits = after.chars().take_while(char::is_ascii_digit).count();
                    // `#` alone: only "#12"-style references (two digits or more).
                    digits >= if *prefix == "#" { 2 } else { 1 }
                })
            });
            if cites {
                found.push(format!("{}:{}: {line}", doc.display(), number + 1));
            }
        }
    }
    assert!(
        found.is_empty(),
        "tracker numbers in user docs:\n{}",
        found.join("\n")
    );
}
