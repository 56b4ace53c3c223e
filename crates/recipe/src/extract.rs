//! Extraction recipes (`kind: extract`): which nested submodel of a
//! MatFormer-style model `amalgam extract` writes — an FFN width per layer
//! (numbers, granularity names, a parameter budget, or a row of Google's
//! slicing table) and the layers to skip.

use crate::yaml::{load, location, Reader};
use crate::{Location, RecipeError};

const KEYS: &[&str] = &[
    "kind",
    "model",
    "ffn_widths",
    "budget",
    "skip_layers",
    "config_csv",
    "slice",
];

/// One layer's FFN width as written.
#[derive(Debug, Clone, PartialEq)]
pub enum Width {
    /// Hidden units kept (the first `n`).
    Units(usize),
    /// A granularity name (`S`, `M`, `L`, `XL`), a fraction of the layer's width.
    Granularity(String),
}

/// A parameter budget for the Mix'n'Match choice.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Budget {
    /// At most this many parameters in the output.
    Parameters(u64),
    /// At most this fraction of the input's parameters.
    Fraction(f64),
}

/// How the widths are chosen.
#[derive(Debug, Clone, PartialEq)]
pub enum WidthChoice {
    /// Every kept layer keeps its whole FFN.
    Full,
    /// One width for every kept layer.
    Uniform(Width, Location),
    /// One width per kept layer, in order.
    PerLayer(Vec<(Width, Location)>),
    Budget(Budget, Location),
    /// A row of a slicing table (Google's `configs.csv` format).
    SlicingTable {
        csv: String,
        slice: String,
        at: Location,
    },
}

/// A parsed, schema-checked extraction recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct ExtractRecipe {
    pub source_name: String,
    /// The recipe text, verbatim (for the model card).
    pub text: String,
    pub model: String,
    pub model_at: Location,
    pub widths: WidthChoice,
    /// Original layer indices to drop, sorted, without repeats.
    pub skip_layers: Vec<(usize, Location)>,
}

impl ExtractRecipe {
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let reader = Reader { source_name };
        let root = load(text, source_name)?;
        let root_at = location(&root);
        if let Ok(entries) = reader.mapping(&root, "the recipe", &[]) {
            if let Some((_, _, at)) = entries.iter().find(|(k, _, _)| k == "merge_method") {
                return Err(reader.error(
                    *at,
                    "this is a merge recipe (`merge_method`); run it with `amalgam merge`",
                ));
            }
        }
        let (mut kind, mut model) = (None, None);
        let (mut widths, mut budget, mut csv, mut slice) = (None, None, None, None);
        let mut skip_layers: Vec<(usize, Location)> = vec![];
        for (key, node, at) in reader.mapping(&root, "the recipe", KEYS)? {
            match key.as_str() {
                "kind" => kind = Some((reader.string(node, "kind")?, location(node))),
                "model" => model = Some((reader.string(node, "model")?, location(node))),
                "ffn_widths" => widths = Some(width_choice(&reader, node)?),
                "budget" => budget = Some((parse_budget(&reader, node)?, location(node))),
                "skip_layers" => {
                    for item in reader.sequence(node, "skip_layers")? {
                        let layer = reader.usize(item, "a skipped layer")?;
                        if skip_layers.iter().any(|(l, _)| *l == layer) {
                            return Err(reader
                                .error(location(item), format!("layer {layer} is listed twice")));
                        }
                        skip_layers.push((layer, location(item)));
                    }
                }
                "config_csv" => csv = Some((reader.string(node, "config_csv")?, at)),
                "slice" => slice = Some((reader.string(node, "slice")?, at)),
                _ => unreachable!("mapping() admits only KEYS"),
            }
        }
        reader.expect_kind(kind, "extract", root_at, "extraction")?;
        let (model, model_at) = model
            .ok_or_else(|| reader.error(root_at, "missing `model` (the checkpoint to slice)"))?;
        let table = match (csv, slice) {
            (Some((csv, at)), Some((slice, _))) => {
                Some(WidthChoice::SlicingTable { csv, slice, at })
            }
            (Some((_, at)), None) => {
                return Err(reader.error(at, "`config_csv` needs `slice` (the row's name)"))
            }
            (None, Some((_, at))) => {
                return Err(reader.error(at, "`slice` needs `config_csv` (the table file)"))
            }
            (None, None) => None,
        };
        let choices: Vec<WidthChoice> = [
            widths,
            budget.map(|(b, at)| WidthChoice::Budget(b, at)),
            table,
        ]
        .into_iter()
        .flatten()
        .collect();
        let widths = match <[WidthChoice; 1]>::try_from(choices) {
            Ok([choice]) => choice,
            Err(choices) if choices.is_empty() => WidthChoice::Full,
            Err(_) => {
                return Err(reader.error(
                    root_at,
                    "give one of `ffn_widths`, `budget` or `config_csv` + `slice`, not several",
                ))
            }
        };
        if matches!(widths, WidthChoice::SlicingTable { .. }) && !skip_layers.is_empty() {
            return Err(reader.error(
                skip_layers[0].1,
                "the slicing table row names the skipped layers; drop `skip_layers`",
            ));
        }
        skip_layers.sort_by_key(|(layer, _)| *layer);
        Ok(ExtractRecipe {
            source_name: source_name.into(),
            text: text.into(),
            model,
            model_at,
            widths,
            skip_layers,
        })
    }
}

fn width(reader: &Reader<'_>, node: &crate::yaml::Node<'_>) -> Result<Width, RecipeError> {
    if let Ok(units) = reader.usize(node, "a width") {
        if units == 0 {
            return Err(reader.error(location(node), "a width must be at least 1"));
        }
        return Ok(Width::Units(units));
    }
    match reader.scalar(node) {
        Some(crate::Scalar::Text(name)) => Ok(Width::Granularity(name)),
        _ => Err(reader.error(
            location(node),
            "a width is a number of hidden units or a granularity name (S, M, L, XL)",
        )),
    }
}

fn width_choice(
    reader: &Reader<'_>,
    node: &crate::yaml::Node<'_>,
) -> Result<WidthChoice, RecipeError> {
    match reader.sequence(node, "ffn_widths") {
        Ok(items) => Ok(WidthChoice::PerLayer(
            items
                .iter()
                .map(|item| Ok((width(reader, item)?, location(item))))
                .collect::<Result<_, RecipeError>>()?,
        )),
        Err(_) => Ok(WidthChoice::Uniform(width(reader, node)?, location(node))),
    }
}

fn parse_budget(reader: &Reader<'_>, node: &crate::yaml::Node<'_>) -> Result<Budget, RecipeError> {
    let bad = || {
        reader.error(
            location(node),
            "`budget` is a parameter count (600000, 1.5M, 7B) or a fraction of the model (0.6, 60%)",
        )
    };
    let budget = match reader.scalar(node) {
        Some(crate::Scalar::Number(n)) if n > 0.0 && n <= 1.0 => Budget::Fraction(n),
        Some(crate::Scalar::Number(n)) if n > 1.0 && n.fract() == 0.0 => {
            Budget::Parameters(n as u64)
        }
        Some(crate::Scalar::Text(text)) => {
            let text = text.trim();
            let (digits, scale) = match text.chars().last() {
                Some('%') => (&text[..text.len() - 1], 0.01),
                Some('K' | 'k') => (&text[..text.len() - 1], 1e3),
                Some('M') => (&text[..text.len() - 1], 1e6),
                Some('B') => (&text[..text.len() - 1], 1e9),
                _ => return Err(bad()),
            };
            let value = digits.trim().parse::<f64>().map_err(|_| bad())? * scale;
            match text.ends_with('%') {
                true if value > 0.0 && value <= 1.0 => Budget::Fraction(value),
                false if value >= 1.0 => Budget::Parameters(value.round() as u64),
                _ => return Err(bad()),
            }
        }
        _ => return Err(bad()),
    };
    Ok(budget)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<ExtractRecipe, RecipeError> {
        ExtractRecipe::parse(text, "r.yml")
    }

    #[test]
    fn widths_budgets_and_tables_parse() {
        let r = parse("kind: extract\nmodel: m\nffn_widths: [S, 96, XL]\nskip_layers: [3, 1]\n")
            .unwrap();
        assert_eq!(r.model, "m");
        let WidthChoice::PerLayer(widths) = &r.widths else {
            panic!("{:?}", r.widths)
        };
        let widths: Vec<&Width> = widths.iter().map(|(w, _)| w).collect();
        assert_eq!(
            widths,
            [
                &Width::Granularity("S".into()),
                &Width::Units(96),
                &Width::Granularity("XL".into())
            ]
        );
        assert_eq!(
            r.skip_layers.iter().map(|s| s.0).collect::<Vec<_>>(),
            [1, 3]
        );
        assert!(matches!(
            parse("kind: extract\nmodel: m\nffn_widths: M\n")
                .unwrap()
                .widths,
            WidthChoice::Uniform(Width::Granularity(_), _)
        ));
        assert_eq!(
            parse("kind: extract\nmodel: m\n").unwrap().widths,
            WidthChoice::Full
        );
        for (text, budget) in [
            ("600000", Budget::Parameters(600_000)),
            ("1.5M", Budget::Parameters(1_500_000)),
            ("0.6", Budget::Fraction(0.6)),
            ("60%", Budget::Fraction(0.6)),
        ] {
            let r = parse(&format!("kind: extract\nmodel: m\nbudget: {text}\n")).unwrap();
            let WidthChoice::Budget(got, _) = r.widths else {
                panic!()
            };
            match (got, budget) {
                (Budget::Fraction(a), Budget::Fraction(b)) => assert!((a - b).abs() < 1e-12),
                (a, b) => assert_eq!(a, b),
            }
        }
        assert!(matches!(
            parse("kind: extract\nmodel: m\nconfig_csv: c.csv\nslice: E2B\n")
                .unwrap()
                .widths,
            WidthChoice::SlicingTable { .. }
        ));
    }

    #[test]
    fn mistakes_name_their_line() {
        let error = |text: &str| parse(text).unwrap_err().to_string();
        assert!(error("model: m\n").contains("r.yml:1:1: missing `kind: extract`"));
        assert!(error("kind: extrct\nmodel: m\n").contains("r.yml:1:7: unknown recipe kind"));
        assert!(error("merge_method: ties\nmodels: []\n").contains("amalgam merge"));
        assert!(
            error("kind: extract\nmodel: m\nffn_width: S\n").contains("did you mean `ffn_widths`")
        );
        assert!(error("kind: extract\nmodel: m\nffn_widths: [S, 0]\n")
            .contains("r.yml:3:17: a width must be at least 1"));
        assert!(error("kind: extract\nmodel: m\nbudget: 0\n").contains("r.yml:3:9: `budget`"));
        assert!(error("kind: extract\nmodel: m\nbudget: 2.5\n").contains("`budget`"));
        assert!(
            error("kind: extract\nmodel: m\nbudget: 0.5\nffn_widths: S\n").contains("not several")
        );
        assert!(error("kind: extract\nmodel: m\nskip_layers: [1, 1]\n")
            .contains("r.yml:3:18: layer 1 is listed twice"));
        assert!(error("kind: extract\nmodel: m\nconfig_csv: c.csv\n").contains("needs `slice`"));
        assert!(
            error("kind: extract\nmodel: m\nconfig_csv: c\nslice: s\nskip_layers: [1]\n")
                .contains("drop `skip_layers`")
        );
        assert!(error("kind: extract\nffn_widths: S\n").contains("missing `model`"));
    }
}
