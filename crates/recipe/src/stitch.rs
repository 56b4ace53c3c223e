//! Stitching recipes (`kind: stitch`): which anchors `amalgam stitch` joins
//! into an SN-Net family, and how the stitching layers are initialised.

use crate::yaml::{load, location, Reader};
use crate::{Location, RecipeError};

const KEYS: &[&str] = &["kind", "anchors", "calibration", "ridge"];
const CALIBRATION_KEYS: &[&str] = &["samples", "seq_len", "seed"];

/// A parsed, schema-checked stitching recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct StitchRecipe {
    pub source_name: String,
    pub text: String,
    /// Two anchor checkpoints (relative to the working directory).
    pub anchors: Vec<(String, Location)>,
    /// Calibration sequences from the corpus' training split.
    pub samples: usize,
    /// Tokens per calibration sequence.
    pub seq_len: usize,
    pub seed: u64,
    /// Added to the least-squares normal equations' diagonal.
    pub ridge: f64,
}

impl StitchRecipe {
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let reader = Reader { source_name };
        let root = load(text, source_name)?;
        let root_at = location(&root);
        let mut recipe = StitchRecipe {
            source_name: source_name.into(),
            text: text.into(),
            anchors: vec![],
            samples: 64,
            seq_len: 129,
            seed: 0,
            ridge: 1e-4,
        };
        let mut kind = None;
        for (key, node, _) in reader.mapping(&root, "the recipe", KEYS)? {
            match key.as_str() {
                "kind" => kind = Some((reader.string(node, "kind")?, location(node))),
                "anchors" => {
                    for item in reader.sequence(node, "anchors")? {
                        recipe
                            .anchors
                            .push((reader.string(item, "an anchor")?, location(item)));
                    }
                    if recipe.anchors.len() != 2 {
                        return Err(reader.error(
                            location(node),
                            format!(
                                "`anchors` lists {} models; stitching joins two",
                                recipe.anchors.len()
                            ),
                        ));
                    }
                }
                "calibration" => {
                    for (key, value, _) in reader.mapping(node, "calibration", CALIBRATION_KEYS)? {
                        let n = reader.usize(value, &key)?;
                        match key.as_str() {
                            "samples" | "seq_len" if n < 2 => {
                                return Err(reader
                                    .error(location(value), format!("`{key}` must be at least 2")))
                            }
                            "samples" => recipe.samples = n,
                            "seq_len" => recipe.seq_len = n,
                            _ => recipe.seed = n as u64,
                        }
                    }
                }
                "ridge" => match reader.scalar(node) {
                    Some(crate::Scalar::Number(r)) if r >= 0.0 => recipe.ridge = r,
                    _ => return Err(reader.error(location(node), "`ridge` is a number ≥ 0")),
                },
                _ => unreachable!("mapping() admits only KEYS"),
            }
        }
        reader.expect_kind(kind, "stitch", root_at, "stitching")?;
        if recipe.anchors.is_empty() {
            return Err(reader.error(root_at, "missing `anchors` (the two models to stitch)"));
        }
        Ok(recipe)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stitch_recipes_parse_and_mistakes_name_their_line() {
        let r = StitchRecipe::parse(
            "kind: stitch\nanchors: [a, b]\ncalibration: {samples: 8, seq_len: 33}\nridge: 0.01\n",
            "s.yml",
        )
        .unwrap();
        assert_eq!(
            r.anchors.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!((r.samples, r.seq_len, r.seed, r.ridge), (8, 33, 0, 0.01));
        let error = |text: &str| StitchRecipe::parse(text, "s.yml").unwrap_err().to_string();
        assert!(
            error("kind: stitch\nanchors: [a]\n").contains("s.yml:2:10: `anchors` lists 1 models")
        );
        assert!(error("anchors: [a, b]\n").contains("missing `kind: stitch`"));
        assert!(error("kind: stitch\nanchors: [a, b]\nridge: -1\n").contains("s.yml:3:8"));
        assert!(
            error("kind: stitch\nanchors: [a, b]\ncalibration: {sample: 3}\n")
                .contains("did you mean `samples`")
        );
        assert!(error("kind: stitch\n").contains("missing `anchors`"));
    }
}
