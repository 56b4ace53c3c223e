//! The recipe document: mergekit's merge configuration schema.

use crate::params::Setting;
use crate::tokenizer::{self, TokenizerSource, TokenizerSpec};
use crate::yaml::{load, location, Node, Reader};
use crate::{CalibrationBlock, ChatTemplate, FloatDtype, Location, RecipeError};

const TOP_LEVEL: &[&str] = &[
    "merge_method",
    "base_model",
    "models",
    "slices",
    "modules",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "calibration",
    "name",
];

/// A model as the recipe names it: a local checkpoint directory.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelRef {
    pub path: String,
    pub at: Location,
}

/// Parameters at one level (top, slice, source/model), in recipe order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Params(pub Vec<(String, Setting, Location)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<(&Setting, Location)> {
        self.0
            .iter()
            .find(|(n, _, _)| n == name)
            .map(|(_, s, at)| (s, *at))
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct ModelDef {
    pub model: ModelRef,
    pub parameters: Params,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SourceDef {
    pub model: ModelRef,
    /// `[start, end)` of the model's layers; `None` in the `models:` form (all layers).
    pub layer_range: Option<(usize, usize, Location)>,
    pub parameters: Params,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SliceDef {
    pub sources: Vec<SourceDef>,
    pub base_model: Option<ModelRef>,
    pub parameters: Params,
    pub at: Location,
}

/// A parsed, schema-checked recipe. `models:` recipes are kept as written;
/// [`crate::Plan`] normalises them into one slice the way mergekit does.
#[derive(Debug, Clone, PartialEq)]
pub struct Recipe {
    pub source_name: String,
    pub text: String,
    pub merge_method: String,
    pub merge_method_at: Location,
    pub base_model: Option<ModelRef>,
    pub models: Vec<ModelDef>,
    pub slices: Vec<SliceDef>,
    pub parameters: Params,
    /// The dtype the math runs in (`None`: each input's own).
    pub dtype: Option<(FloatDtype, Location)>,
    /// The dtype the output is saved in (`None`: the math dtype).
    pub out_dtype: Option<(FloatDtype, Location)>,
    /// `tokenizer_source:` or the `tokenizer:` block.
    pub tokenizer: Option<TokenizerSpec>,
    pub chat_template: Option<ChatTemplate>,
    /// The `calibration:` block (with its key's location) of methods that
    /// run the models on text.
    pub calibration: Option<(CalibrationBlock, Location)>,
    /// A stage's name in a multi-stage recipe (see [`crate::Stages`]).
    pub name: Option<(String, Location)>,
}

impl Recipe {
    /// Parses and schema-checks a recipe; `source_name` is used in messages.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let reader = Reader { source_name };
        let root = load(text, source_name)?;
        let mut recipe = Recipe {
            source_name: source_name.into(),
            text: text.into(),
            merge_method: String::new(),
            merge_method_at: location(&root),
            base_model: None,
            models: vec![],
            slices: vec![],
            parameters: Params::default(),
            dtype: None,
            out_dtype: None,
            tokenizer: None,
            chat_template: None,
            calibration: None,
            name: None,
        };
        let mut has_models = None;
        let mut has_slices = None;
        if let Ok(entries) = reader.mapping(&root, "the recipe", &[]) {
            if let Some((_, _, at)) = entries.iter().find(|(k, _, _)| k == "kind") {
                return Err(reader.error(
                    *at,
                    "this recipe has a `kind` (extraction or stitching); run it with `amalgam extract` or `amalgam stitch`",
                ));
            }
        }
        for (key, node, at) in reader.mapping(&root, "the recipe", TOP_LEVEL)? {
            match key.as_str() {
                "name" => recipe.name = Some((reader.string(node, "name")?, location(node))),
                "merge_method" => {
                    recipe.merge_method = reader.string(node, "merge_method")?;
                    recipe.merge_method_at = location(node);
                }
                "base_model" if Reader::is_null(node) => {}
                "base_model" => recipe.base_model = Some(model_ref(&reader, node)?),
                "models" => {
                    has_models = Some(at);
                    for item in reader.sequence(node, "models")? {
                        recipe.models.push(model_def(&reader, item)?);
                    }
                }
                "slices" => {
                    has_slices = Some(at);
                    for item in reader.sequence(node, "slices")? {
                        recipe.slices.push(slice_def(&reader, item)?);
                    }
                }
                "modules" => {
                    return Err(reader.error(at, "`modules:` (multi-module models such as VLMs) is not supported yet; use `models:` or `slices:`"))
                }
                "tokenizer" | "tokenizer_source" if recipe.tokenizer.is_some() => {
                    return Err(reader.error(at, "give either `tokenizer_source:` or `tokenizer:`, not both"))
                }
                "tokenizer" => recipe.tokenizer = Some(tokenizer::spec(&reader, node)?),
                "parameters" => recipe.parameters = params(&reader, node)?,
                "dtype" => recipe.dtype = dtype(&reader, node, "dtype")?,
                "out_dtype" => recipe.out_dtype = dtype(&reader, node, "out_dtype")?,
                "tokenizer_source" if Reader::is_null(node) => {}
                "tokenizer_source" => {
                    recipe.tokenizer = Some(TokenizerSpec {
                        source: tokenizer::source(&reader, node)?,
                        tokens: vec![],
                        pad_to_multiple_of: None,
                        at: location(node),
                    });
                }
                "calibration" => {
                    recipe.calibration = Some((CalibrationBlock::read(&reader, node)?, at))
                }
                "chat_template" if Reader::is_null(node) => {}
                "chat_template" => {
                    let template = reader.string(node, "chat_template")?;
                    recipe.chat_template = Some(
                        ChatTemplate::parse(&template)
                            .map_err(|message| reader.error(location(node), message))?,
                    );
                }
                _ => unreachable!("mapping() admits only TOP_LEVEL keys"),
            }
        }
        if recipe.merge_method.is_empty() {
            return Err(reader.error(location(&root), "missing `merge_method`"));
        }
        if let Some((_, at)) = &recipe.calibration {
            if recipe.merge_method != "pleas" {
                return Err(reader.error(
                    *at,
                    format!(
                        "`calibration:` is read by merges that run the models on text (pleas); `{}` does not",
                        recipe.merge_method
                    ),
                ));
            }
        }
        match (has_models, has_slices) {
            (Some(_), Some(at)) => {
                Err(reader.error(at, "give either `models:` or `slices:`, not both"))
            }
            (None, None) => {
                Err(reader.error(location(&root), "the recipe needs `models:` or `slices:`"))
            }
            (Some(at), None) if recipe.models.is_empty() => {
                Err(reader.error(at, "`models:` is empty"))
            }
            (None, Some(at)) if recipe.slices.is_empty() => {
                Err(reader.error(at, "`slices:` is empty"))
            }
            _ => Ok(recipe),
        }
    }

    /// Every model the recipe names (base first, then in order of appearance), without repeats.
    pub fn referenced_models(&self) -> Vec<&ModelRef> {
        let tokenizer = match &self.tokenizer {
            Some(TokenizerSpec {
                source: TokenizerSource::Model(m),
                ..
            }) => Some(m),
            _ => None,
        };
        let named = self
            .base_model
            .iter()
            .chain(self.models.iter().map(|m| &m.model))
            .chain(self.slices.iter().flat_map(|s| {
                s.base_model
                    .iter()
                    .chain(s.sources.iter().map(|source| &source.model))
            }))
            .chain(tokenizer);
        let mut all: Vec<&ModelRef> = vec![];
        for m in named {
            if !all.iter().any(|seen| seen.path == m.path) {
                all.push(m);
            }
        }
        all
    }

    /// Rewrites the path of every model the recipe names through `rename`
    /// (`None` keeps a path as it is).
    pub fn rename_models(&mut self, rename: impl Fn(&str) -> Option<String>) {
        let tokenizer = match &mut self.tokenizer {
            Some(TokenizerSpec {
                source: TokenizerSource::Model(m),
                ..
            }) => Some(m),
            _ => None,
        };
        let all = self
            .base_model
            .iter_mut()
            .chain(self.models.iter_mut().map(|m| &mut m.model))
            .chain(self.slices.iter_mut().flat_map(|s| {
                s.base_model
                    .iter_mut()
                    .chain(s.sources.iter_mut().map(|source| &mut source.model))
            }))
            .chain(tokenizer);
        for model in all {
            if let Some(path) = rename(&model.path) {
                model.path = path;
            }
        }
    }

    pub fn error(&self, at: Location, message: impl Into<String>) -> RecipeError {
        RecipeError {
            source_name: self.source_name.clone(),
            at,
            message: message.into(),
        }
    }
}

pub(crate) fn model_ref(reader: &Reader<'_>, node: &Node<'_>) -> Result<ModelRef, RecipeError> {
    let path = reader.string(node, "a model")?;
    Ok(ModelRef {
        path,
        at: location(node),
    })
}

fn params(reader: &Reader<'_>, node: &Node<'_>) -> Result<Params, RecipeError> {
    if Reader::is_null(node) {
        return Ok(Params::default());
    }
    let mut out = vec![];
    for (name, value, at) in reader.mapping(node, "parameters", &[])? {
        out.push((name, Setting::parse(reader, value)?, at));
    }
    Ok(Params(out))
}

fn dtype(
    reader: &Reader<'_>,
    node: &Node<'_>,
    key: &str,
) -> Result<Option<(FloatDtype, Location)>, RecipeError> {
    if Reader::is_null(node) {
        return Ok(None);
    }
    let name = reader.string(node, key)?;
    let dtype = FloatDtype::parse(&name).ok_or_else(|| {
        reader.error(
            location(node),
            format!(
                "`{key}: {name}` is not supported (use one of: {})",
                FloatDtype::names()
            ),
        )
    })?;
    Ok(Some((dtype, location(node))))
}

fn model_def(reader: &Reader<'_>, node: &Node<'_>) -> Result<ModelDef, RecipeError> {
    let mut model = None;
    let mut parameters = Params::default();
    for (key, value, _) in reader.mapping(node, "a `models:` entry", &["model", "parameters"])? {
        match key.as_str() {
            "model" => model = Some(model_ref(reader, value)?),
            _ => parameters = params(reader, value)?,
        }
    }
    let model =
        model.ok_or_else(|| reader.error(location(node), "a `models:` entry needs `model`"))?;
    Ok(ModelDef { model, parameters })
}

fn slice_def(reader: &Reader<'_>, node: &Node<'_>) -> Result<SliceDef, RecipeError> {
    let mut slice = SliceDef {
        sources: vec![],
        base_model: None,
        parameters: Params::default(),
        at: location(node),
    };
    let keys = &["sources", "base_model", "parameters", "residual_weight"];
    for (key, value, at) in reader.mapping(node, "a slice", keys)? {
        match key.as_str() {
            "sources" => {
                for item in reader.sequence(value, "sources")? {
                    slice.sources.push(source_def(reader, item)?);
                }
                if slice.sources.is_empty() {
                    return Err(reader.error(at, "`sources:` is empty"));
                }
            }
            "base_model" if Reader::is_null(value) => {}
            "base_model" => slice.base_model = Some(model_ref(reader, value)?),
            "parameters" => slice.parameters = params(reader, value)?,
            _ => {} // residual_weight: accepted and unused, as in mergekit
        }
    }
    if slice.sources.is_empty() {
        return Err(reader.error(slice.at, "a slice needs `sources:`"));
    }
    Ok(slice)
}

fn source_def(reader: &Reader<'_>, node: &Node<'_>) -> Result<SourceDef, RecipeError> {
    let mut model = None;
    let mut layer_range = None;
    let mut parameters = Params::default();
    let keys = &["model", "layer_range", "parameters"];
    for (key, value, _) in reader.mapping(node, "a slice source", keys)? {
        match key.as_str() {
            "model" => model = Some(model_ref(reader, value)?),
            "layer_range" => {
                let items = reader.sequence(value, "layer_range")?;
                if items.len() != 2 {
                    return Err(reader.error(location(value), "layer_range must be [start, end]"));
                }
                let (start, end) = (
                    reader.usize(&items[0], "layer_range start")?,
                    reader.usize(&items[1], "layer_range end")?,
                );
                if start >= end {
                    return Err(reader.error(
                        location(value),
                        format!("layer_range [{start}, {end}] is empty"),
                    ));
                }
                layer_range = Some((start, end, location(value)));
            }
            _ => parameters = params(reader, value)?,
        }
    }
    let model =
        model.ok_or_else(|| reader.error(location(node), "a slice source needs `model`"))?;
    if layer_range.is_none() {
        return Err(reader.error(
            location(node),
            format!(
                "slice source `{}` needs `layer_range: [start, end]`",
                model.path
            ),
        ));
    }
    Ok(SourceDef {
        model,
        layer_range,
        parameters,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Scalar, Setting};

    const TIES: &str = "models:
  - model: ./orca
    parameters:
      density: [1, 0.7, 0.1]
      weight: 1.0
  - model: ./platypus
    parameters:
      density: 0.5
      weight:
        - filter: mlp
          value: 0.5
        - value: 0
merge_method: ties
base_model: ./llama
parameters:
  normalize: true
  int8_mask: true
dtype: float16
";

    #[test]
    fn mergekit_ties_example_parses() {
        let r = Recipe::parse(TIES, "ties.yml").unwrap();
        assert_eq!(r.merge_method, "ties");
        assert_eq!(r.base_model.as_ref().unwrap().path, "./llama");
        assert_eq!(r.models.len(), 2);
        assert_eq!(
            r.models[1].model.at,
            Location {
                line: 6,
                column: 12
            }
        );
        let (density, _) = r.models[0].parameters.get("density").unwrap();
        assert_eq!(
            density,
            &Setting::Gradient(vec![
                Scalar::Number(1.0),
                Scalar::Number(0.7),
                Scalar::Number(0.1)
            ])
        );
        assert!(
            matches!(r.models[1].parameters.get("weight").unwrap().0, Setting::Conditional(c) if c.len() == 2)
        );
        assert_eq!(r.dtype.as_ref().unwrap().0, FloatDtype::Float16);
        let paths: Vec<&str> = r
            .referenced_models()
            .iter()
            .map(|m| m.path.as_str())
            .collect();
        assert_eq!(paths, ["./llama", "./orca", "./platypus"]);
    }

    #[test]
    fn dtype_aliases_parse_to_one_dtype() {
        for (written, dtype) in [
            ("bf16", FloatDtype::BFloat16),
            ("torch.bfloat16", FloatDtype::BFloat16),
            ("fp16", FloatDtype::Float16),
            ("f16", FloatDtype::Float16),
            ("fp32", FloatDtype::Float32),
            ("f32", FloatDtype::Float32),
        ] {
            let text = format!(
                "merge_method: linear\nmodels:\n  - model: a\ndtype: {written}\nout_dtype: {written}\n"
            );
            let r = Recipe::parse(&text, "r.yml").unwrap();
            assert_eq!(r.dtype.map(|d| d.0), Some(dtype), "{written}");
            assert_eq!(r.out_dtype.map(|d| d.0), Some(dtype), "{written}");
        }
    }

    #[test]
    fn slices_parse_with_layer_ranges() {
        let text = "slices:\n  - sources:\n    - model: a\n      layer_range: [0, 24]\n  - sources:\n    - model: b\n      layer_range: [20, 40]\nmerge_method: passthrough\n";
        let r = Recipe::parse(text, "p.yml").unwrap();
        assert_eq!(r.slices.len(), 2);
        let (start, end, _) = r.slices[1].sources[0].layer_range.unwrap();
        assert_eq!((start, end), (20, 40));
    }

    fn error(text: &str) -> String {
        Recipe::parse(text, "r.yml").unwrap_err().to_string()
    }

    #[test]
    fn unknown_keys_get_line_column_and_a_suggestion() {
        assert_eq!(
            error("merge_method: linear\nmodel:\n  - model: a\n"),
            "r.yml:2:1: unknown key `model` in the recipe (did you mean `models`?)"
        );
        assert_eq!(
            error("merge_method: linear\nmodels:\n  - model: a\n    paramters: {weight: 1}\n"),
            "r.yml:4:5: unknown key `paramters` in a `models:` entry (did you mean `parameters`?)"
        );
    }

    #[test]
    fn wrong_types_and_shapes_are_located() {
        assert_eq!(
            error("merge_method: linear\nmodels: a\n"),
            "r.yml:2:9: models must be a list"
        );
        assert_eq!(
            error("merge_method: linear\nmodels:\n  - model: a\ndtype: float8\n"),
            "r.yml:4:8: `dtype: float8` is not supported (use one of: float32, float16, bfloat16)"
        );
        assert!(error("models:\n  - model: a\n").contains("missing `merge_method`"));
        assert!(error("kind: extract\nmodel: a\n").contains("amalgam extract"));
        assert!(
            error("merge_method: x\nslices:\n  - sources:\n    - model: a\n")
                .contains("r.yml:4:7: slice source `a` needs `layer_range")
        );
        assert!(error(
            "merge_method: x\nslices:\n  - sources:\n    - model: a\n      layer_range: [3, 3]\n"
        )
        .contains("is empty"));
        assert!(error("merge_method: x\nmodels: [\n").starts_with("r.yml:"));
    }

    #[test]
    fn unsupported_features_say_so() {
        assert!(error("merge_method: linear\nmodules: {}\n").contains("`modules:`"));
    }
}
