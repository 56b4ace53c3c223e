//! Typed reading of a YAML tree with positions, so every error can say where.

use saphyr::{LoadableYamlNode, MarkedYaml, Scalar as YamlScalar, YamlData};

use crate::{Location, RecipeError};

/// Reads nodes of one document, attaching the source name to errors.
pub(crate) struct Reader<'a> {
    pub source_name: &'a str,
}

pub(crate) type Node<'i> = MarkedYaml<'i>;

pub(crate) fn location(node: &Node<'_>) -> Location {
    Location {
        line: node.span.start.line(),
        column: node.span.start.col() + 1,
    }
}

pub(crate) fn load<'i>(text: &'i str, source_name: &str) -> Result<Node<'i>, RecipeError> {
    let mut docs = MarkedYaml::load_from_str(text).map_err(|e| RecipeError {
        source_name: source_name.into(),
        at: Location {
            line: e.marker().line(),
            column: e.marker().col() + 1,
        },
        message: format!("invalid YAML: {}", e.info()),
    })?;
    match docs.len() {
        1 => Ok(docs.remove(0)),
        0 => Err(RecipeError {
            source_name: source_name.into(),
            at: Location { line: 1, column: 1 },
            message: "the recipe is empty".into(),
        }),
        n => Err(RecipeError {
            source_name: source_name.into(),
            at: location(&docs[1]),
            message: format!("expected one YAML document, found {n}"),
        }),
    }
}

impl<'a> Reader<'a> {
    pub fn error(&self, at: Location, message: impl Into<String>) -> RecipeError {
        RecipeError {
            source_name: self.source_name.into(),
            at,
            message: message.into(),
        }
    }

    /// The entries of a mapping, refusing keys outside `allowed` with a suggestion.
    pub fn mapping<'n, 'i>(
        &self,
        node: &'n Node<'i>,
        what: &str,
        allowed: &[&str],
    ) -> Result<Vec<(String, &'n Node<'i>, Location)>, RecipeError> {
        let YamlData::Mapping(map) = &node.data else {
            return Err(self.error(
                location(node),
                format!("{what} must be a mapping (key: value)"),
            ));
        };
        let mut entries = vec![];
        for (key, value) in map {
            let name = self.string(key, "a key")?;
            if !allowed.is_empty() && !allowed.contains(&name.as_str()) {
                let hint = suggest(&name, allowed)
                    .map(|s| format!(" (did you mean `{s}`?)"))
                    .unwrap_or_else(|| format!(" (expected one of: {})", allowed.join(", ")));
                return Err(self.error(
                    location(key),
                    format!("unknown key `{name}` in {what}{hint}"),
                ));
            }
            entries.push((name, value, location(key)));
        }
        Ok(entries)
    }

    pub fn sequence<'n, 'i>(
        &self,
        node: &'n Node<'i>,
        what: &str,
    ) -> Result<&'n [Node<'i>], RecipeError> {
        match &node.data {
            YamlData::Sequence(items) => Ok(items),
            _ => Err(self.error(location(node), format!("{what} must be a list"))),
        }
    }

    pub fn string(&self, node: &Node<'_>, what: &str) -> Result<String, RecipeError> {
        match &node.data {
            YamlData::Value(YamlScalar::String(s)) => Ok(s.to_string()),
            YamlData::Value(YamlScalar::Integer(i)) => Ok(i.to_string()),
            YamlData::Value(YamlScalar::FloatingPoint(f)) => Ok(f.to_string()),
            YamlData::Value(YamlScalar::Boolean(b)) => Ok(b.to_string()),
            _ => Err(self.error(location(node), format!("{what} must be a string"))),
        }
    }

    pub fn scalar(&self, node: &Node<'_>) -> Option<crate::Scalar> {
        Some(match &node.data {
            YamlData::Value(YamlScalar::String(s)) => crate::Scalar::Text(s.to_string()),
            YamlData::Value(YamlScalar::Integer(i)) => crate::Scalar::Number(*i as f64),
            YamlData::Value(YamlScalar::FloatingPoint(f)) => crate::Scalar::Number(f.into_inner()),
            YamlData::Value(YamlScalar::Boolean(b)) => crate::Scalar::Bool(*b),
            _ => return None,
        })
    }

    pub fn is_null(node: &Node<'_>) -> bool {
        matches!(node.data, YamlData::Value(YamlScalar::Null))
    }

    /// Checks a recipe's `kind` (read with its location, if present) is
    /// `expected`; `what` names the recipes the command runs.
    pub fn expect_kind(
        &self,
        kind: Option<(String, Location)>,
        expected: &str,
        root_at: Location,
        what: &str,
    ) -> Result<(), RecipeError> {
        match kind {
            Some((kind, _)) if kind == expected => Ok(()),
            Some((kind, at)) => Err(self.error(
                at,
                format!("unknown recipe kind `{kind}` (expected `{expected}`)"),
            )),
            None => Err(self.error(
                root_at,
                format!("missing `kind: {expected}` (this command runs {what} recipes)"),
            )),
        }
    }

    pub fn usize(&self, node: &Node<'_>, what: &str) -> Result<usize, RecipeError> {
        match &node.data {
            YamlData::Value(YamlScalar::Integer(i)) if *i >= 0 => Ok(*i as usize),
            _ => Err(self.error(
                location(node),
                format!("{what} must be a non-negative integer"),
            )),
        }
    }
}

/// The allowed word closest to `word` by edit distance (a swap of two
/// neighbouring letters counts as one edit, so `modles` is one edit from
/// `models`), if it is close enough. Ties go to the word whose length is
/// nearest `word`'s (a swap keeps the length: `models` over `modules`), then
/// to the earlier one in `allowed`.
pub(crate) fn suggest<'s>(word: &str, allowed: &[&'s str]) -> Option<&'s str> {
    let length = word.chars().count();
    allowed
        .iter()
        .map(|a| (edit_distance(word, a), *a))
        .filter(|(d, a)| *d <= 2.max(a.len() / 3))
        .min_by_key(|(d, a)| (*d, a.chars().count().abs_diff(length)))
        .map(|(_, a)| a)
}

/// Edit distance with insertions, deletions, substitutions and swaps of two
/// neighbouring characters (the optimal string alignment distance).
fn edit_distance(a: &str, b: &str) -> usize {
    let (a, b): (Vec<char>, Vec<char>) = (a.chars().collect(), b.chars().collect());
    // Rows i − 2, i − 1 and i of the table over prefixes of `a` and `b`.
    let mut before: Vec<usize> = vec![0; b.len() + 1];
    let mut previous: Vec<usize> = (0..=b.len()).collect();
    let mut row: Vec<usize> = vec![0; b.len() + 1];
    for i in 1..=a.len() {
        row[0] = i;
        for j in 1..=b.len() {
            let substitution = previous[j - 1] + usize::from(a[i - 1] != b[j - 1]);
            row[j] = substitution.min(previous[j] + 1).min(row[j - 1] + 1);
            if i > 1 && j > 1 && a[i - 1] == b[j - 2] && a[i - 2] == b[j - 1] {
                row[j] = row[j].min(before[j - 2] + 1);
            }
        }
        std::mem::swap(&mut before, &mut previous);
        std::mem::swap(&mut previous, &mut row);
    }
    previous[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn suggestions_pick_the_nearest_key() {
        let keys = ["merge_method", "base_model", "models", "parameters"];
        assert_eq!(suggest("merge_methd", &keys), Some("merge_method"));
        assert_eq!(suggest("model", &keys), Some("models"));
        assert_eq!(suggest("zzzzzz", &keys), None);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
    }

    #[test]
    fn a_swap_of_two_letters_is_one_edit_and_suggests_the_swapped_key() {
        assert_eq!(edit_distance("modles", "models"), 1);
        assert_eq!(edit_distance("modles", "modules"), 1);
        assert_eq!(edit_distance("ab", "ba"), 1);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("abc", ""), 3);
        // `modules` is in the recipe's keys before `models` here: the tie
        // goes to the key of the typo's length.
        let keys = ["merge_method", "modules", "models", "slices"];
        assert_eq!(suggest("modles", &keys), Some("models"));
        assert_eq!(suggest("moduels", &keys), Some("modules"));
        assert_eq!(suggest("merge_mehtod", &keys), Some("merge_method"));
        let typo = crate::Recipe::parse("merge_method: linear\nmodles:\n  - model: a\n", "r.yml")
            .unwrap_err()
            .to_string();
        assert_eq!(
            typo,
            "r.yml:2:1: unknown key `modles` in the recipe (did you mean `models`?)"
        );
    }
}
