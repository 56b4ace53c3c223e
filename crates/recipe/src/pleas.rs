//! `merge_method: pleas`: a mergekit-style recipe whose two `models` are
//! merged by permutation alignment and least squares, with the method's own
//! `parameters` (all optional).

use crate::calibration::check_count;
use crate::{Calibration, ModelRef, Recipe, RecipeError, Scalar, Setting};

const PARAMETERS: &[&str] = &[
    "matching",
    "metric",
    "budget",
    "calibration",
    "calibration_field",
    "samples",
    "seq_len",
    "batch",
    "ridge",
    "precision",
    "least_squares",
    "widen",
    "seed",
];

/// How B's units are lined up with A's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PleasMatching {
    /// On calibration features (`metric`: correlation or distance).
    Activation,
    /// Git Re-Basin's weight matching (data-free).
    Weight,
    /// No alignment (naive averaging, a baseline).
    None,
}

/// A validated PLeaS merge.
#[derive(Debug, Clone, PartialEq)]
pub struct PleasRecipe {
    /// Model A (the reference order) and model B.
    pub models: [ModelRef; 2],
    pub matching: PleasMatching,
    /// `correlation` or `distance`.
    pub metric: String,
    /// Parameters as a multiple of one model's, 1 to 2.
    pub budget: f64,
    /// The recipe's `calibration:` block; the older spelling, `calibration`
    /// (the source), `calibration_field`, `samples`, `seq_len` and `batch`
    /// among the parameters, is read too.
    pub calibration: Calibration,
    pub ridge: f64,
    /// `float32` or `float64` normal equations.
    pub precision: String,
    pub least_squares: bool,
    /// `all` (the residual stream and every FFN) or `ffn`: which groups a
    /// budget above 1 widens.
    pub widen: String,
    /// Weight matching's seed (and the calibration's, unless the block sets it).
    pub seed: u64,
}

impl PleasRecipe {
    /// Reads a parsed recipe whose `merge_method` is `pleas`.
    pub fn from_recipe(recipe: &Recipe) -> Result<Self, RecipeError> {
        let at = recipe.merge_method_at;
        if let Some(base) = &recipe.base_model {
            return Err(recipe.error(
                base.at,
                "pleas merges two models that need not share a base: remove `base_model`",
            ));
        }
        if let Some(slice) = recipe.slices.first() {
            return Err(recipe.error(slice.at, "pleas takes `models:`, not `slices:`"));
        }
        let [a, b] = recipe.models.as_slice() else {
            return Err(recipe.error(
                at,
                format!(
                    "pleas merges two models; `models` lists {}",
                    recipe.models.len()
                ),
            ));
        };
        for model in [a, b] {
            if let Some((name, _, at)) = model.parameters.0.first() {
                return Err(recipe.error(
                    *at,
                    format!(
                        "per-model parameter `{name}`: pleas takes its parameters at the top level"
                    ),
                ));
            }
        }
        let mut out = PleasRecipe {
            models: [a.model.clone(), b.model.clone()],
            matching: PleasMatching::Activation,
            metric: "correlation".into(),
            budget: 1.0,
            calibration: Calibration::defaults(64, 128, 16, at),
            ridge: 1e-4,
            precision: "float64".into(),
            least_squares: true,
            widen: "all".into(),
            seed: 0,
        };
        let block = recipe.calibration.as_ref().map(|(block, _)| block);
        if let Some(block) = block {
            out.calibration = block.over(out.calibration);
        }
        for (name, setting, at) in &recipe.parameters.0 {
            let at = *at;
            let in_block = match name.as_str() {
                "calibration" => "source",
                "calibration_field" => "field",
                "samples" | "seq_len" | "batch" => name,
                _ => "",
            };
            if let Some((block, block_at)) = &recipe.calibration {
                if !in_block.is_empty() && block.sets(in_block) {
                    return Err(recipe.error(
                        at,
                        format!(
                            "the `calibration:` block (line {}) also sets `{in_block}`: give it once",
                            block_at.line
                        ),
                    ));
                }
            }
            let Setting::Scalar(value) = setting else {
                return Err(
                    recipe.error(at, format!("`{name}` takes one value for the whole model"))
                );
            };
            let number = |low: f64, high: f64| match value {
                Scalar::Number(n) if (low..=high).contains(n) => Ok(*n),
                _ => Err(recipe.error(at, format!("`{name}` is a number from {low} to {high}"))),
            };
            let count = |low: f64| number(low, 1e9).map(|n| n as usize);
            let choice = |options: &[&str]| match value {
                Scalar::Text(t) if options.contains(&t.as_str()) => Ok(t.clone()),
                _ => Err(recipe.error(at, format!("`{name}` is one of: {}", options.join(", ")))),
            };
            match name.as_str() {
                "matching" => {
                    out.matching = match choice(&["activation", "weight", "none"])?.as_str() {
                        "activation" => PleasMatching::Activation,
                        "weight" => PleasMatching::Weight,
                        _ => PleasMatching::None,
                    }
                }
                "metric" => out.metric = choice(&["correlation", "distance"])?,
                "budget" => out.budget = number(1.0, 2.0)?,
                "calibration" => match value {
                    Scalar::Text(t) => {
                        out.calibration.source = t.clone();
                        out.calibration.source_at = at;
                    }
                    _ => return Err(recipe.error(at, "`calibration` names the calibration data")),
                },
                "calibration_field" => match value {
                    Scalar::Text(t) => out.calibration.field = t.clone(),
                    _ => return Err(recipe.error(at, "`calibration_field` names a JSON field")),
                },
                "samples" | "seq_len" | "batch" => {
                    let n = count(0.0)?;
                    check_count(name, n).map_err(|message| recipe.error(at, message))?;
                    out.calibration.set_count(name, n);
                }
                "ridge" => out.ridge = number(0.0, f64::MAX)?,
                "precision" => out.precision = choice(&["float32", "float64"])?,
                "least_squares" => match value {
                    Scalar::Bool(b) => out.least_squares = *b,
                    _ => return Err(recipe.error(at, "`least_squares` is true or false")),
                },
                "widen" => out.widen = choice(&["all", "ffn"])?,
                "seed" => {
                    out.seed = count(0.0)? as u64;
                    if !block.is_some_and(|b| b.sets("seed")) {
                        out.calibration.seed = out.seed;
                    }
                }
                _ => {
                    return Err(recipe.error(
                        at,
                        format!(
                            "unknown pleas parameter `{name}` (known: {})",
                            PARAMETERS.join(", ")
                        ),
                    ))
                }
            }
        }
        if !out.least_squares && out.budget > 1.0 && out.matching == PleasMatching::None {
            return Err(recipe.error(
                at,
                "a budget above 1 keeps the least-alike matched units separate: it needs matching",
            ));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<PleasRecipe, RecipeError> {
        PleasRecipe::from_recipe(&Recipe::parse(text, "p.yml").unwrap())
    }

    #[test]
    fn reads_parameters_and_names_mistakes() {
        let ok = parse(
            "merge_method: pleas\nmodels:\n  - model: a\n  - model: b\nparameters:\n  matching: weight\n  budget: 1.5\n  calibration: random\n  ridge: 0.01\n",
        )
        .unwrap();
        assert_eq!(ok.matching, PleasMatching::Weight);
        assert_eq!((ok.budget, ok.ridge), (1.5, 0.01));
        assert_eq!(ok.calibration.source, "random");
        assert_eq!(ok.models[1].path, "b");
        let error = |text: &str| parse(text).unwrap_err().to_string();
        let models = "merge_method: pleas\nmodels:\n  - model: a\n  - model: b\n";
        let e = error(&format!("{models}parameters:\n  budget: 3\n"));
        assert!(e.contains("p.yml:6:"), "{e}");
        assert!(error(&format!("{models}parameters:\n  matching: magic\n")).contains("one of"));
        assert!(error(&format!("{models}parameters:\n  densty: 1\n"))
            .contains("unknown pleas parameter"));
        assert!(error("merge_method: pleas\nmodels:\n  - model: a\n").contains("two models"));
        assert!(error(&format!("base_model: c\n{models}")).contains("base_model"));
    }

    #[test]
    fn the_calibration_block_and_the_older_parameters_mean_the_same() {
        let models = "merge_method: pleas\nmodels:\n  - model: a\n  - model: b\n";
        let block = parse(&format!(
            "{models}calibration: {{source: notes.jsonl, field: body, samples: 8, seq_len: 16, batch: 4, seed: 3}}\n"
        ))
        .unwrap();
        let flat = parse(&format!(
            "{models}parameters:\n  calibration: notes.jsonl\n  calibration_field: body\n  samples: 8\n  seq_len: 16\n  batch: 4\n  seed: 3\n"
        ))
        .unwrap();
        let strip = |mut c: Calibration| {
            c.source_at = Default::default();
            c
        };
        assert_eq!(strip(block.calibration.clone()), strip(flat.calibration));
        assert_eq!(block.calibration.source_at.line, 5);
        // The block's seed is the calibration's; `parameters: seed` stays weight matching's.
        let both = parse(&format!(
            "{models}calibration: {{seed: 3}}\nparameters:\n  seed: 9\n"
        ))
        .unwrap();
        assert_eq!((both.calibration.seed, both.seed), (3, 9));
        let error = |text: String| parse(&text).unwrap_err().to_string();
        let e = error(format!(
            "{models}calibration: {{samples: 8}}\nparameters:\n  samples: 4\n"
        ));
        assert!(
            e.contains("p.yml:7:") && e.contains("(line 5) also sets `samples`"),
            "{e}"
        );
        let e = error(format!("{models}parameters:\n  seq_len: 1\n"));
        assert!(
            e.contains("p.yml:6:") && e.contains("`seq_len` must be at least 2"),
            "{e}"
        );
        let e = Recipe::parse(
            &format!(
                "merge_method: linear\n{}calibration: {{samples: 8}}\n",
                &models[20..]
            ),
            "p.yml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("p.yml:5:") && e.contains("`linear` does not"),
            "{e}"
        );
    }
}
