//! Stitching recipes (`kind: stitch`): which anchors `amalgam stitch` joins
//! into an SN-Net family, and how the stitching layers are initialised.

use crate::calibration::CalibrationBlock;
use crate::yaml::{load, location, Reader};
use crate::{Calibration, Location, RecipeError};

const KEYS: &[&str] = &["kind", "anchors", "calibration", "ridge", "train"];
const TRAIN_KEYS: &[&str] = &[
    "steps",
    "batch",
    "seq_len",
    "lr",
    "anchor_lr_scale",
    "distill",
    "temperature",
    "seed",
];

/// Route training after the least-squares initialisation (SN-Net's: one
/// route sampled per step).
#[derive(Debug, Clone, PartialEq)]
pub struct StitchTraining {
    pub steps: usize,
    pub batch: usize,
    pub seq_len: usize,
    pub lr: f64,
    /// The anchors' learning rate as a fraction of `lr` (0: anchors frozen).
    pub anchor_lr_scale: f64,
    /// Weight of knowledge distillation from the larger anchor in each
    /// step's loss, in [0, 1]: `(1 − distill) · next-token loss + distill ·
    /// T² · KL(teacher ‖ network)` at temperature T (0: no distillation).
    pub distill: f64,
    /// The distillation's softmax temperature T (> 0).
    pub temperature: f64,
    pub seed: u64,
}

/// A parsed, schema-checked stitching recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct StitchRecipe {
    pub source_name: String,
    pub text: String,
    /// Two anchor checkpoints (relative to the working directory).
    pub anchors: Vec<(String, Location)>,
    /// The calibration text (route training reads the same source).
    pub calibration: Calibration,
    /// Ridge of the least squares, relative to the mean diagonal of XᵀX
    /// (the bias unpenalised), as PLeaS's.
    pub ridge: f64,
    pub train: Option<StitchTraining>,
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
            calibration: Calibration::defaults(64, 129, 8, root_at),
            ridge: 1e-4,
            train: None,
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
                    recipe.calibration =
                        CalibrationBlock::read(&reader, node)?.over(recipe.calibration.clone());
                }
                "train" => {
                    let mut train = StitchTraining {
                        steps: 0,
                        batch: 16,
                        seq_len: 129,
                        lr: 1e-3,
                        anchor_lr_scale: 0.0,
                        distill: 0.0,
                        temperature: 1.0,
                        seed: 0,
                    };
                    for (key, value, _) in reader.mapping(node, "train", TRAIN_KEYS)? {
                        let number = || match reader.scalar(value) {
                            Some(crate::Scalar::Number(n)) if n >= 0.0 && n.is_finite() => Ok(n),
                            _ => Err(reader
                                .error(location(value), format!("`{key}` is a finite number ≥ 0"))),
                        };
                        match key.as_str() {
                            "lr" => train.lr = number()?,
                            "anchor_lr_scale" => train.anchor_lr_scale = number()?,
                            "distill" => {
                                train.distill = number()?;
                                if train.distill > 1.0 {
                                    return Err(reader.error(
                                        location(value),
                                        "`distill` is a weight in [0, 1]",
                                    ));
                                }
                            }
                            "temperature" => {
                                train.temperature = number()?;
                                if train.temperature == 0.0 {
                                    return Err(reader
                                        .error(location(value), "`temperature` must be above 0"));
                                }
                            }
                            "steps" => train.steps = reader.usize(value, "steps")?,
                            "batch" => train.batch = reader.usize(value, "batch")?.max(1),
                            "seq_len" => train.seq_len = reader.usize(value, "seq_len")?.max(2),
                            _ => train.seed = reader.usize(value, "seed")? as u64,
                        }
                    }
                    recipe.train = Some(train);
                }
                "ridge" => match reader.scalar(node) {
                    Some(crate::Scalar::Number(r)) if r >= 0.0 && r.is_finite() => recipe.ridge = r,
                    _ => return Err(reader.error(location(node), "`ridge` is a finite number ≥ 0")),
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
            (r.calibration.source.as_str(), r.calibration.batch),
            ("mixture", 8)
        );
        let file = StitchRecipe::parse(
            "kind: stitch\nanchors: [a, b]\ncalibration: {source: c.jsonl, field: body, batch: 2}\n",
            "s.yml",
        )
        .unwrap();
        assert_eq!(
            (
                file.calibration.source.as_str(),
                file.calibration.field.as_str(),
                file.calibration.batch
            ),
            ("c.jsonl", "body", 2)
        );
        assert_eq!(
            (
                file.calibration.source_at.line,
                file.calibration.source_at.column
            ),
            (3, 23)
        );
        assert_eq!(
            r.anchors.iter().map(|a| a.0.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        let c = &r.calibration;
        assert_eq!((c.samples, c.seq_len, c.seed, r.ridge), (8, 33, 0, 0.01));
        assert_eq!(r.train, None);
        let t = StitchRecipe::parse(
            "kind: stitch\nanchors: [a, b]\ntrain: {steps: 5, lr: 0.01}\n",
            "s.yml",
        )
        .unwrap()
        .train
        .unwrap();
        assert_eq!((t.steps, t.lr, t.anchor_lr_scale), (5, 0.01, 0.0));
        assert_eq!((t.distill, t.temperature), (0.0, 1.0));
        let t = StitchRecipe::parse(
            "kind: stitch\nanchors: [a, b]\ntrain: {distill: 0.5, temperature: 2}\n",
            "s.yml",
        )
        .unwrap()
        .train
        .unwrap();
        assert_eq!((t.distill, t.temperature), (0.5, 2.0));
        assert!(
            StitchRecipe::parse("kind: stitch\nanchors: [a, b]\ntrain: {lr: -1}\n", "s.yml")
                .unwrap_err()
                .to_string()
                .contains("s.yml:3:13: `lr` is a finite number")
        );
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
        assert!(
            error("kind: stitch\nanchors: [a, b]\ntrain: {distill: 1.5}\n")
                .contains("s.yml:3:18: `distill` is a weight in [0, 1]")
        );
        assert!(
            error("kind: stitch\nanchors: [a, b]\ntrain: {temperature: 0}\n")
                .contains("s.yml:3:22: `temperature` must be above 0")
        );
    }
}
