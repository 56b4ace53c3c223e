//! Tunable recipes: a merge recipe whose numbers may be search ranges,
//! `weight: {tune: [0.2, 1.5]}` (optionally with the value to try first,
//! `{tune: [0.1, 1], default: 0.5}`). [`SearchSpace::instantiate`] writes the
//! recipe's text with each marker replaced by a number — the rest of the
//! text, comments included, is kept — which is then an ordinary recipe.

use saphyr::{Scalar as YamlScalar, YamlData};

use crate::yaml::{load, location, Node, Reader};
use crate::{Location, RecipeError};

/// One `{tune: [lo, hi]}` marker.
#[derive(Debug, Clone, PartialEq)]
pub struct TuneParam {
    /// Where it sits in the recipe, e.g. `models[1].parameters.density`.
    pub label: String,
    pub at: Location,
    pub low: f64,
    pub high: f64,
    /// The value tried first, if the marker gives one.
    pub default: Option<f64>,
    /// The marker's bytes in the recipe text.
    span: std::ops::Range<usize>,
}

/// A recipe's text and its tune markers, in text order.
#[derive(Debug, Clone)]
pub struct SearchSpace {
    text: String,
    pub params: Vec<TuneParam>,
}

impl SearchSpace {
    /// Finds the markers of a recipe text, in every stage of a multi-stage
    /// one (labelled `STAGE: …` there). Markers must be flow mappings
    /// (`{tune: [lo, hi]}`) with finite `lo < hi`.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let reader = Reader { source_name };
        let documents = crate::stages::documents(text);
        if documents.is_empty() {
            load(text, source_name)?; // the error an empty recipe is
        }
        let several = documents.len() > 1;
        let mut params = vec![];
        for (first_line, document) in documents {
            // Earlier lines padded out, so positions are the file's.
            let padding = first_line;
            let padded = format!("{}{document}", "\n".repeat(padding));
            let root = load(&padded, source_name)?;
            let stage = match several {
                true => stage_name(&root).map(|name| format!("{name}: ")),
                false => None,
            };
            let mut found = vec![];
            find_markers(&reader, &padded, &root, String::new(), &mut found)?;
            // The document's bytes start this far into `text`.
            let from = document.as_ptr() as usize - text.as_ptr() as usize;
            for mut param in found {
                param.span = param.span.start - padding + from..param.span.end - padding + from;
                param.label = format!("{}{}", stage.as_deref().unwrap_or_default(), param.label);
                params.push(param);
            }
        }
        params.sort_by_key(|p| p.span.start);
        Ok(SearchSpace {
            text: text.to_owned(),
            params,
        })
    }

    /// The recipe text with the markers replaced by `values` (one per
    /// parameter, in order), each written so that it reads back exactly.
    pub fn instantiate(&self, values: &[f64]) -> String {
        assert_eq!(values.len(), self.params.len(), "one value per parameter");
        let mut out = String::with_capacity(self.text.len());
        let mut at = 0;
        for (param, value) in self.params.iter().zip(values) {
            out.push_str(&self.text[at..param.span.start]);
            out.push_str(&format!("{value:?}"));
            at = param.span.end;
        }
        out.push_str(&self.text[at..]);
        out
    }
}

fn find_markers(
    reader: &Reader<'_>,
    text: &str,
    node: &Node<'_>,
    path: String,
    out: &mut Vec<TuneParam>,
) -> Result<(), RecipeError> {
    match &node.data {
        YamlData::Mapping(map) => {
            let is_marker = map.iter().any(
                |(k, _)| matches!(&k.data, YamlData::Value(YamlScalar::String(s)) if s == "tune"),
            );
            if is_marker {
                out.push(marker(reader, text, node, path)?);
                return Ok(());
            }
            for (key, value) in map {
                let name = reader.string(key, "a key")?;
                let child = if path.is_empty() {
                    name
                } else {
                    format!("{path}.{name}")
                };
                find_markers(reader, text, value, child, out)?;
            }
        }
        YamlData::Sequence(items) => {
            for (i, item) in items.iter().enumerate() {
                find_markers(reader, text, item, format!("{path}[{i}]"), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// A stage's `name`, if its document gives one.
fn stage_name(root: &Node<'_>) -> Option<String> {
    let YamlData::Mapping(map) = &root.data else {
        return None;
    };
    map.iter()
        .find_map(|(key, value)| match (&key.data, &value.data) {
            (YamlData::Value(YamlScalar::String(k)), YamlData::Value(YamlScalar::String(name)))
                if k == "name" =>
            {
                Some(name.to_string())
            }
            _ => None,
        })
}

fn number(reader: &Reader<'_>, node: &Node<'_>, what: &str) -> Result<f64, RecipeError> {
    match reader.scalar(node) {
        Some(crate::Scalar::Number(x)) if x.is_finite() => Ok(x),
        _ => Err(reader.error(location(node), format!("{what} must be a finite number"))),
    }
}

fn marker(
    reader: &Reader<'_>,
    text: &str,
    node: &Node<'_>,
    label: String,
) -> Result<TuneParam, RecipeError> {
    let at = location(node);
    let entries = reader.mapping(node, "a tune marker", &["tune", "default"])?;
    let mut range = None;
    let mut default = None;
    for (key, value, _) in entries {
        if key == "tune" {
            let bounds = reader.sequence(value, "`tune`")?;
            if bounds.len() != 2 {
                return Err(reader.error(
                    location(value),
                    "`tune` must be a range [low, high] of two numbers",
                ));
            }
            let low = number(reader, &bounds[0], "the range's low end")?;
            let high = number(reader, &bounds[1], "the range's high end")?;
            if low >= high {
                return Err(reader.error(
                    location(value),
                    format!("`tune: [{low}, {high}]`: the low end must be below the high end"),
                ));
            }
            range = Some((low, high));
        } else {
            default = Some((number(reader, value, "`default`")?, location(value)));
        }
    }
    let (low, high) = range.expect("a marker has a `tune` key");
    if let Some((value, value_at)) = default {
        if !(low..=high).contains(&value) {
            return Err(reader.error(
                value_at,
                format!("`default: {value}` lies outside the range [{low}, {high}]"),
            ));
        }
    }
    // The marker's text: from its `{` to the matching `}` (markers hold no
    // strings, so braces need no quoting rules).
    let start = text
        .char_indices()
        .nth(node.span.start.index())
        .map_or(text.len(), |(i, _)| i);
    if !text[start..].starts_with('{') {
        return Err(reader.error(
            at,
            "write a tune marker on one line, as a flow mapping: `{tune: [low, high]}`",
        ));
    }
    let mut depth = 0usize;
    let mut end = None;
    for (i, c) in text[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    end = Some(start + i + 1);
                    break;
                }
            }
            _ => {}
        }
    }
    let end = end.ok_or_else(|| reader.error(at, "unclosed tune marker"))?;
    Ok(TuneParam {
        label,
        at,
        low,
        high,
        default: default.map(|(v, _)| v),
        span: start..end,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const RECIPE: &str = "\
# a comment that stays — über
merge_method: ties
base_model: a
models:
  - model: b
    parameters: {weight: {tune: [0, 1.5]}, density: {tune: [0.1, 1], default: 0.5}}
  - model: c
    parameters:
      weight: 1.0
      density: { tune: [0.2, 0.9] }   # spaces inside
parameters:
  lambda: {tune: [0.5, 2]}
dtype: float32
";

    #[test]
    fn markers_are_found_in_text_order_and_replaced_exactly() {
        let space = SearchSpace::parse(RECIPE, "r.yml").unwrap();
        let labels: Vec<&str> = space.params.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "models[0].parameters.weight",
                "models[0].parameters.density",
                "models[1].parameters.density",
                "parameters.lambda"
            ]
        );
        assert_eq!(space.params[1].default, Some(0.5));
        assert_eq!((space.params[3].low, space.params[3].high), (0.5, 2.0));
        assert_eq!(space.params[2].at.line, 10);
        let text = space.instantiate(&[0.25, 0.1 + 0.2, 0.7, 1.0]);
        assert!(text.starts_with("# a comment that stays — über\n"));
        assert!(text.contains("parameters: {weight: 0.25, density: 0.30000000000000004}"));
        assert!(text.contains("density: 0.7   # spaces inside"));
        assert!(text.contains("lambda: 1.0\n"));
        let again = SearchSpace::parse(&text, "r.yml").unwrap();
        assert!(again.params.is_empty());
        let recipe = crate::Recipe::parse(&text, "r.yml").unwrap();
        assert_eq!(recipe.models.len(), 2);
    }

    #[test]
    fn markers_are_found_in_every_stage() {
        let text = "# two stages\nname: soup\nmerge_method: linear\nmodels:\n  - model: a\n    \
                    parameters: {weight: {tune: [0, 1]}}\n---\nmerge_method: linear\nmodels:\n  \
                    - model: soup\n    parameters: {weight: {tune: [0.5, 2], default: 1}}\n";
        let space = SearchSpace::parse(text, "r.yml").unwrap();
        let labels: Vec<&str> = space.params.iter().map(|p| p.label.as_str()).collect();
        assert_eq!(
            labels,
            [
                "soup: models[0].parameters.weight",
                "models[0].parameters.weight"
            ]
        );
        assert_eq!(space.params[1].at.line, 11);
        let instantiated = space.instantiate(&[0.25, 1.5]);
        assert_eq!(
            instantiated,
            text.replace("{tune: [0, 1]}", "0.25")
                .replace("{tune: [0.5, 2], default: 1}", "1.5")
        );
        let stages = crate::Stages::parse(&instantiated, "r.yml").unwrap();
        assert_eq!(stages.run_order.len(), 2);
    }

    #[test]
    fn bad_markers_are_errors_at_their_line() {
        for (text, message, line) in [
            ("a: {tune: [1, 0]}\n", "low end must be below", 1),
            ("a: 1\nb: {tune: [0, 1, 2]}\n", "range [low, high]", 2),
            ("a: {tune: [0, x]}\n", "finite number", 1),
            ("a: {tune: [0, 1], default: 2}\n", "outside the range", 1),
            ("a: {tune: [0, 1], step: 2}\n", "unknown key `step`", 1),
            ("a:\n  tune: [0, 1]\n", "flow mapping", 2),
        ] {
            let error = SearchSpace::parse(text, "r.yml").unwrap_err();
            assert!(error.message.contains(message), "{text}: {error}");
            assert_eq!(error.at.line, line, "{text}: {error}");
        }
    }
}
