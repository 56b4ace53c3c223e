//! The text amalgam's model zoo trains and evaluates on, compiled in so
//! that nothing depends on the working directory: nine domains of real
//! text (`texts/NAME.txt`, documents separated by form feeds; sources,
//! licences and hashes in `texts/PROVENANCE.md`, made by
//! `scripts/make-corpus.py`). `amalgam_nn::data` splits them and turns
//! them into tokens.

/// Every domain's name and whole text, in the corpus's order: the three
/// general domains (the zoo's pretraining mixture), then the six study
/// domains.
pub const TEXTS: [(&str, &str); 9] = [
    ("prose", include_str!("../texts/prose.txt")),
    ("code", include_str!("../texts/code.txt")),
    ("legal", include_str!("../texts/legal.txt")),
    ("german", include_str!("../texts/german.txt")),
    ("spanish", include_str!("../texts/spanish.txt")),
    ("italian", include_str!("../texts/italian.txt")),
    ("c", include_str!("../texts/c.txt")),
    ("perl", include_str!("../texts/perl.txt")),
    ("cpp", include_str!("../texts/cpp.txt")),
];

/// The whole text of the domain `name`.
pub fn text(name: &str) -> Option<&'static str> {
    TEXTS
        .iter()
        .find(|(n, _)| *n == name)
        .map(|(_, text)| *text)
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_domain_holds_documents() {
        for (name, text) in super::TEXTS {
            let documents = text.split('\u{c}').filter(|d| !d.trim().is_empty()).count();
            assert!(documents >= 10, "{name}: {documents} documents");
            assert_eq!(super::text(name), Some(text));
        }
        assert_eq!(super::text("klingon"), None);
    }
}
