//! Parameter settings as mergekit writes them: a scalar, a gradient (a list
//! interpolated over the layers of a slice), or a list of `{filter, value}`.

use crate::yaml::{location, Node, Reader};
use crate::RecipeError;

#[derive(Debug, Clone, PartialEq)]
pub enum Scalar {
    Number(f64),
    Bool(bool),
    Text(String),
}

impl Scalar {
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Scalar::Number(n) => Some(*n),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match self {
            Scalar::Bool(b) => Some(*b),
            _ => None,
        }
    }
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Number(n) => write!(f, "{n}"),
            Scalar::Bool(b) => write!(f, "{b}"),
            Scalar::Text(s) => write!(f, "{s:?}"),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Setting {
    Scalar(Scalar),
    /// Values spread evenly over a slice's layers, interpolated linearly.
    Gradient(Vec<Scalar>),
    /// The first entry whose filter is a substring of the tensor name wins.
    Conditional(Vec<Conditional>),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Conditional {
    /// `None` or `"*"` match every tensor.
    pub filter: Option<String>,
    pub value: Setting,
}

impl Setting {
    pub(crate) fn parse(reader: &Reader<'_>, node: &Node<'_>) -> Result<Self, RecipeError> {
        if let Some(scalar) = reader.scalar(node) {
            return Ok(Setting::Scalar(scalar));
        }
        if let Ok(items) = reader.sequence(node, "a parameter") {
            let scalars: Option<Vec<Scalar>> = items.iter().map(|i| reader.scalar(i)).collect();
            if let Some(values) = scalars {
                return Ok(Setting::Gradient(values));
            }
            let conditions = items
                .iter()
                .map(|item| Self::conditional(reader, item))
                .collect::<Result<Vec<_>, _>>()?;
            return Ok(Setting::Conditional(conditions));
        }
        Ok(Setting::Conditional(vec![Self::conditional(reader, node)?]))
    }

    fn conditional(reader: &Reader<'_>, node: &Node<'_>) -> Result<Conditional, RecipeError> {
        let entries = reader.mapping(node, "a filtered parameter", &["filter", "value"])?;
        let mut filter = None;
        let mut value = None;
        for (key, child, _) in entries {
            match key.as_str() {
                "filter" if Reader::is_null(child) => {}
                "filter" => filter = Some(reader.string(child, "filter")?),
                _ => {
                    let setting = Self::parse(reader, child)?;
                    if matches!(setting, Setting::Conditional(_)) {
                        return Err(reader.error(
                            location(child),
                            "a filtered value must be a number, string, bool or a gradient list",
                        ));
                    }
                    value = Some(setting);
                }
            }
        }
        let value = value
            .ok_or_else(|| reader.error(location(node), "a filtered parameter needs a `value`"))?;
        Ok(Conditional { filter, value })
    }

    /// The value for `tensor_name` at gradient position `t` ∈ [0, 1], or `None`
    /// when no filter matches (the lookup then falls to the next level). Text
    /// that looks like a number counts as a number when `numeric` (PyYAML reads
    /// `1e-3` as text; mergekit converts it).
    pub fn evaluate(&self, tensor_name: &str, t: f64, numeric: bool) -> Option<Scalar> {
        let coerce = |s: &Scalar| match s {
            Scalar::Text(text) if numeric => text
                .trim()
                .parse()
                .map(Scalar::Number)
                .unwrap_or_else(|_| s.clone()),
            _ => s.clone(),
        };
        match self {
            Setting::Scalar(s) => Some(coerce(s)),
            Setting::Gradient(values) if values.is_empty() => None,
            Setting::Gradient(values) => {
                let values: Vec<Scalar> = values.iter().map(coerce).collect();
                let numbers: Option<Vec<f64>> = values.iter().map(Scalar::as_f64).collect();
                let scaled = t * (values.len() - 1) as f64;
                let i0 = scaled as usize;
                match numbers {
                    Some(numbers) => {
                        let i1 = (i0 + 1).min(numbers.len() - 1);
                        let frac = scaled - i0 as f64;
                        Some(Scalar::Number(
                            (1.0 - frac) * numbers[i0] + frac * numbers[i1],
                        ))
                    }
                    None => Some(values[i0].clone()),
                }
            }
            Setting::Conditional(conditions) => conditions
                .iter()
                .find(|c| match c.filter.as_deref() {
                    None | Some("*") => true,
                    Some(filter) => tensor_name.contains(filter),
                })
                .and_then(|c| c.value.evaluate(tensor_name, t, numeric)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Scalar::Number as N;

    fn gradient(values: &[f64]) -> Setting {
        Setting::Gradient(values.iter().map(|&v| N(v)).collect())
    }

    #[test]
    fn gradients_interpolate_linearly_over_t() {
        let g = gradient(&[0.0, 0.3, 0.7, 1.0]);
        assert_eq!(g.evaluate("x", 0.0, true), Some(N(0.0)));
        assert_eq!(g.evaluate("x", 1.0, true), Some(N(1.0)));
        let Some(N(v)) = g.evaluate("x", 0.5, true) else {
            panic!()
        };
        assert!((v - 0.5).abs() < 1e-12);
        let Some(N(v)) = gradient(&[1.0, 0.7, 0.1]).evaluate("x", 0.25, true) else {
            panic!()
        };
        assert!((v - 0.85).abs() < 1e-12);
    }

    #[test]
    fn non_numeric_gradients_select() {
        let g = Setting::Gradient(vec![Scalar::Bool(false), Scalar::Bool(true)]);
        assert_eq!(g.evaluate("x", 0.9, true), Some(Scalar::Bool(false)));
        assert_eq!(g.evaluate("x", 1.0, true), Some(Scalar::Bool(true)));
    }

    #[test]
    fn first_matching_filter_wins_and_no_match_is_none() {
        let s = Setting::Conditional(vec![
            Conditional {
                filter: Some("self_attn".into()),
                value: gradient(&[0.0, 1.0]),
            },
            Conditional {
                filter: Some("mlp".into()),
                value: Setting::Scalar(N(0.25)),
            },
        ]);
        assert_eq!(
            s.evaluate("model.layers.1.mlp.up_proj.weight", 0.5, true),
            Some(N(0.25))
        );
        assert_eq!(
            s.evaluate("model.layers.1.self_attn.q_proj.weight", 1.0, true),
            Some(N(1.0))
        );
        assert_eq!(s.evaluate("model.norm.weight", 0.0, true), None);
    }

    #[test]
    fn numeric_text_counts_as_a_number_for_numeric_parameters() {
        let s = Setting::Scalar(Scalar::Text("1e-3".into()));
        assert_eq!(s.evaluate("x", 0.0, true), Some(N(1e-3)));
        assert_eq!(
            s.evaluate("x", 0.0, false),
            Some(Scalar::Text("1e-3".into()))
        );
    }
}
