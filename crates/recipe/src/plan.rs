//! Resolution of a recipe into a plan: one entry per output tensor with its
//! inputs and fully resolved parameters, following mergekit's rules (models
//! form → one slice with the base appended; gradients over each slice's
//! layers, t = 0 outside the layers; source > slice > top-level precedence).

use std::collections::BTreeMap;

use crate::params::{Scalar, Setting};
use crate::schema::{Params, Recipe};
use crate::{Location, RecipeError};

/// Whether a method needs a base model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BasePolicy {
    Required,
    Optional,
    /// The base, if named, is an ordinary input (linear, karcher, passthrough).
    Ignored,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamKind {
    Number,
    Bool,
    Text,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParamScope {
    /// One value per tensor (`t`, `lambda`, `normalize` …).
    Shared,
    /// One value per input model, the base included.
    PerModel,
    /// One value per input model other than the base (`weight`, `density` …).
    PerNonBase,
}

/// Validates a resolved value; the message says what is wrong.
pub type ParamCheck = fn(&Scalar) -> Result<(), String>;

/// A parameter a merge method understands.
#[derive(Debug, Clone)]
pub struct ParamSpec {
    pub name: &'static str,
    pub kind: ParamKind,
    pub scope: ParamScope,
    /// `None`: required.
    pub default: Option<Scalar>,
    /// Extra validation of a resolved value; the message says what is wrong.
    pub check: Option<ParamCheck>,
    /// Advice on a value that is valid but likely a mistake (outside the
    /// range where the method means something): a warning, not an error.
    pub warn: Option<ParamCheck>,
}

/// What the planner needs to know about a merge method.
#[derive(Debug, Clone)]
pub struct MethodSpec {
    pub name: &'static str,
    pub base: BasePolicy,
    pub params: Vec<ParamSpec>,
    /// Least number of inputs besides the base.
    pub min_models: usize,
    /// Most number of inputs besides the base.
    pub max_models: Option<usize>,
}

/// One tensor of an input model, as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InventoryTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// Where its block index is, for tensors inside the repeated layers.
    pub layer: Option<LayerRef>,
    /// A vocabulary-indexed tensor (input embedding or output head).
    pub vocab: bool,
    /// On the embedding side of the layers (the input embedding, positions):
    /// planned before the layers, from a stack's first slice; everything
    /// else outside the layers comes after them, from the last slice.
    pub before_layers: bool,
    /// Not stored: a tied output head that resolves to the embedding. Usable as
    /// an input; never planned as an output of its own.
    pub tied_alias: bool,
    /// A buffer recomputed at load (RoPE's inverse frequencies, which older
    /// checkpoints store): an output need not carry it.
    pub buffer: bool,
}

/// A layer tensor's block index and the byte range of its digits in the
/// name (`model.layers.12.mlp.up_proj.weight`: 12 at `13..15`), as the
/// checkpoint's reading of names locates it: renumbering replaces the range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerRef {
    pub index: usize,
    pub digits: std::ops::Range<usize>,
}

/// An input model's tensors and layer count.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ModelInventory {
    pub tensors: Vec<InventoryTensor>,
    pub layers: usize,
}

impl ModelInventory {
    fn get(&self, name: &str) -> Option<&InventoryTensor> {
        self.tensors.iter().find(|t| t.name == name)
    }
}

/// A parameter value and the recipe line it came from (`None`: the default).
#[derive(Debug, Clone, PartialEq)]
pub struct Resolved {
    pub value: Scalar,
    pub at: Option<Location>,
}

impl Resolved {
    pub fn number(&self) -> f64 {
        self.value.as_f64().expect("validated as a number")
    }

    pub fn flag(&self) -> bool {
        self.value.as_bool().expect("validated as a bool")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedInput {
    /// Index into [`Plan::models`].
    pub model: usize,
    pub tensor: String,
    pub shape: Vec<usize>,
    pub params: BTreeMap<String, Resolved>,
    /// What is done to the stored tensor before the method sees it.
    pub transform: InputTransform,
}

/// How an input tensor becomes what the method sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputTransform {
    /// As stored (in the math dtype).
    AsStored,
    /// Cut to the output's shape (a larger vocabulary: the base's rows).
    Narrow,
    /// Rows gathered onto the written vocabulary, the missing ones filled
    /// ([`Plan::vocabulary`]).
    AlignRows,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    /// The output shape (inputs of another shape say how they get it:
    /// [`PlannedInput::transform`]).
    pub shape: Vec<usize>,
    /// Rows indexed by the vocabulary (input embedding, output head).
    pub vocabulary: bool,
    pub inputs: Vec<PlannedInput>,
    /// Index into `inputs` of the base model, when it is among them.
    pub base: Option<usize>,
    pub params: BTreeMap<String, Resolved>,
    /// Gradient position (0 outside the layers).
    pub t: f64,
}

/// Every output tensor with its inputs and parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    pub method: String,
    /// Model paths as written in the recipe; inputs refer to them by index.
    pub models: Vec<String>,
    /// The model whose config.json the output starts from (the base, else the first source).
    pub layout_model: usize,
    /// Where tokenizer files are copied from.
    pub tokenizer_model: usize,
    pub tensors: Vec<PlannedTensor>,
    /// Layers in the output.
    pub layers: usize,
    /// Advice on the recipe (`file:line:column: message`), each once.
    pub warnings: Vec<String>,
    /// With `tokenizer_source`: each model's rows of the written vocabulary.
    pub vocabulary: Option<VocabularyAlignment>,
}

/// How the models' vocabulary-indexed rows map onto the vocabulary of the
/// tokenizer written with the output (`tokenizer_source` / `tokenizer:`), as
/// mergekit maps them: a model's own row where it has the token; where it
/// lacks it (or the recipe forces a source), the mean of the `fill` rows.
/// Rows past the tokens (`pad_to_multiple_of`) are each model's mean row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VocabularyAlignment {
    /// Rows of the output, padding included.
    pub size: usize,
    /// Rows that are tokens of the written vocabulary (the first ones).
    pub tokens: usize,
    /// Per model (indexed like [`Plan::models`]): for every token row, the
    /// model's own row of that token, if it has it (and no source is forced).
    pub rows: Vec<Vec<Option<u32>>>,
    /// Per token row: the (model, row) pairs whose mean fills it where a
    /// model has no row of its own (none: zeros).
    pub fill: Vec<Vec<(usize, u32)>>,
}

impl Plan {
    /// Makes every vocabulary tensor `alignment.size` rows long, its inputs
    /// aligned row by row (the executor fills what a model lacks).
    pub fn align_vocabulary(&mut self, alignment: VocabularyAlignment) {
        for tensor in self.tensors.iter_mut().filter(|t| t.vocabulary) {
            tensor.shape[0] = alignment.size;
            for input in &mut tensor.inputs {
                input.transform = InputTransform::AlignRows;
            }
        }
        self.vocabulary = Some(alignment);
    }
}

struct SliceSource<'r> {
    model: usize,
    start: usize,
    end: usize,
    params: &'r Params,
}

struct NormalSlice<'r> {
    sources: Vec<SliceSource<'r>>,
    base: Option<usize>,
    params: Option<&'r Params>,
    at: Location,
}

impl Plan {
    /// Resolves `recipe` for `method`. `inventories[i]` describes
    /// `recipe.referenced_models()[i]`.
    pub fn resolve(
        recipe: &Recipe,
        method: &MethodSpec,
        inventories: &[ModelInventory],
    ) -> Result<Self, RecipeError> {
        let referenced = recipe.referenced_models();
        assert_eq!(
            referenced.len(),
            inventories.len(),
            "one inventory per referenced model"
        );
        let models: Vec<String> = referenced.iter().map(|m| m.path.clone()).collect();
        let locations: Vec<Location> = referenced.iter().map(|m| m.at).collect();
        let index = |path: &str| models.iter().position(|m| m == path).expect("referenced");
        let top_base = recipe.base_model.as_ref().map(|b| index(&b.path));

        let slices = normalise(recipe, &index, inventories, top_base)?;
        for slice in &slices {
            check_inputs(recipe, method, slice, &models)?;
        }
        let layout_model = top_base.unwrap_or(slices[0].sources[0].model);
        let tokenizer_model = match recipe.tokenizer.as_ref().map(|t| &t.source) {
            Some(crate::TokenizerSource::Model(m)) => index(&m.path),
            _ => layout_model,
        };
        let planner = Planner {
            recipe,
            method,
            inventories,
            models: &models,
            locations: &locations,
            warnings: Default::default(),
        };
        let layout = &inventories[layout_model];
        let stored = || layout.tensors.iter().filter(|t| !t.tied_alias);

        let mut tensors = vec![];
        let first = &slices[0];
        for tensor in stored().filter(|t| t.layer.is_none() && t.before_layers) {
            tensors.push(planner.tensor(&tensor.name, first, |_| tensor.name.clone(), 0.0)?);
        }
        let layer_suffixes: Vec<&InventoryTensor> = stored()
            .filter(|t| t.layer.as_ref().is_some_and(|l| l.index == 0))
            .collect();
        let mut out_layer = 0;
        for slice in &slices {
            let count = slice.sources[0].end - slice.sources[0].start;
            for offset in 0..count {
                let t = if count > 1 {
                    offset as f64 / (count - 1) as f64
                } else {
                    1.0
                };
                for tensor in &layer_suffixes {
                    let out_name = with_layer(tensor, out_layer);
                    let input_name =
                        |source: &SliceSource<'_>| with_layer(tensor, source.start + offset);
                    tensors.push(planner.tensor(&out_name, slice, input_name, t)?);
                }
                out_layer += 1;
            }
        }
        let last = slices.last().expect("at least one slice");
        // A tied head (an alias in the layout model) is an output when some
        // input stores one of its own; tied inputs then contribute their embedding.
        let stored_somewhere = |t: &&InventoryTensor| {
            !t.tied_alias
                || last.sources.iter().any(|s| {
                    inventories[s.model]
                        .get(&t.name)
                        .is_some_and(|i| !i.tied_alias)
                })
        };
        for tensor in layout
            .tensors
            .iter()
            .filter(stored_somewhere)
            .filter(|t| t.layer.is_none() && !t.before_layers)
        {
            tensors.push(planner.tensor(&tensor.name, last, |_| tensor.name.clone(), 0.0)?);
        }
        planner.check_coverage(&slices, layout_model, &tensors)?;
        let warnings = planner.warnings.into_inner().into_iter().collect();
        Ok(Plan {
            method: method.name.into(),
            models,
            layout_model,
            tokenizer_model,
            tensors,
            layers: out_layer,
            warnings,
            vocabulary: None,
        })
    }
}

/// mergekit's normal form: every recipe becomes a list of slices.
fn normalise<'r>(
    recipe: &'r Recipe,
    index: &dyn Fn(&str) -> usize,
    inventories: &[ModelInventory],
    top_base: Option<usize>,
) -> Result<Vec<NormalSlice<'r>>, RecipeError> {
    static NO_PARAMS: Params = Params(vec![]);
    if !recipe.models.is_empty() {
        let mut sources: Vec<SliceSource<'r>> = recipe
            .models
            .iter()
            .map(|m| {
                let model = index(&m.model.path);
                SliceSource {
                    model,
                    start: 0,
                    end: inventories[model].layers,
                    params: &m.parameters,
                }
            })
            .collect();
        if let Some(base) = top_base {
            if !sources.iter().any(|s| s.model == base) {
                sources.push(SliceSource {
                    model: base,
                    start: 0,
                    end: inventories[base].layers,
                    params: &NO_PARAMS,
                });
            }
        }
        let counts: Vec<usize> = sources.iter().map(|s| s.end).collect();
        if let Some(i) = counts.iter().position(|&c| c != counts[0]) {
            let model = &recipe
                .models
                .get(i)
                .map(|m| m.model.at)
                .unwrap_or(recipe.merge_method_at);
            return Err(recipe.error(*model, format!(
                "models have different layer counts ({} has {}, {} has {}); use `slices:` to say which layers to merge",
                recipe.referenced_models()[sources[0].model].path, counts[0],
                recipe.referenced_models()[sources[i].model].path, counts[i],
            )));
        }
        return Ok(vec![NormalSlice {
            sources,
            base: top_base,
            params: None,
            at: recipe.merge_method_at,
        }]);
    }
    let mut slices = vec![];
    for slice in &recipe.slices {
        let mut sources = vec![];
        for source in &slice.sources {
            let model = index(&source.model.path);
            let (start, end, at) = source.layer_range.expect("checked by the parser");
            let layers = inventories[model].layers;
            if end > layers {
                return Err(recipe.error(at, format!(
                    "layer_range [{start}, {end}] goes beyond model `{}`, which has {layers} layers",
                    source.model.path
                )));
            }
            sources.push(SliceSource {
                model,
                start,
                end,
                params: &source.parameters,
            });
        }
        let lengths: Vec<usize> = sources.iter().map(|s| s.end - s.start).collect();
        if lengths.iter().any(|&l| l != lengths[0]) {
            return Err(recipe.error(
                slice.at,
                format!(
                    "all sources of a slice must span the same number of layers (got {lengths:?})"
                ),
            ));
        }
        let base = slice
            .base_model
            .as_ref()
            .map(|b| index(&b.path))
            .or(top_base);
        slices.push(NormalSlice {
            sources,
            base,
            params: Some(&slice.parameters),
            at: slice.at,
        });
    }
    Ok(slices)
}

fn check_inputs(
    recipe: &Recipe,
    method: &MethodSpec,
    slice: &NormalSlice<'_>,
    models: &[String],
) -> Result<(), RecipeError> {
    let base_included = method.base != BasePolicy::Ignored
        && slice
            .base
            .is_some_and(|b| slice.sources.iter().any(|s| s.model == b));
    if method.base == BasePolicy::Required {
        match slice.base {
            None => {
                return Err(recipe.error(
                    recipe.merge_method_at,
                    format!("merge method `{}` needs a `base_model`", method.name),
                ))
            }
            Some(base) if !base_included => {
                return Err(recipe.error(
                    slice.at,
                    format!(
                        "base model `{}` must be one of this slice's sources for `{}`",
                        models[base], method.name
                    ),
                ))
            }
            _ => {}
        }
    }
    let others = slice.sources.len() - usize::from(base_included);
    if others < method.min_models || method.max_models.is_some_and(|max| others > max) {
        let wanted = match method.max_models {
            Some(max) if max == method.min_models => format!("exactly {max}"),
            Some(max) => format!("{} to {max}", method.min_models),
            None => format!("at least {}", method.min_models),
        };
        let besides = if base_included {
            " besides the base"
        } else {
            ""
        };
        return Err(recipe.error(
            slice.at,
            format!(
                "merge method `{}` takes {wanted} models{besides}, got {others}",
                method.name
            ),
        ));
    }
    Ok(())
}

struct Planner<'a> {
    recipe: &'a Recipe,
    method: &'a MethodSpec,
    inventories: &'a [ModelInventory],
    models: &'a [String],
    locations: &'a [Location],
    /// Advice collected while resolving parameters (ordered, deduplicated).
    warnings: std::cell::RefCell<std::collections::BTreeSet<String>>,
}

impl Planner<'_> {
    /// Every tensor an input contributes (within the layers its slice takes;
    /// outside the layers, from the first slice before them and the last
    /// after them) must feed some planned tensor: one the layout model lacks
    /// would otherwise be silently missing from the output. RoPE's cached
    /// `inv_freq` buffers are recomputed by the model, so optional.
    fn check_coverage(
        &self,
        slices: &[NormalSlice<'_>],
        layout_model: usize,
        tensors: &[PlannedTensor],
    ) -> Result<(), RecipeError> {
        let used: std::collections::HashSet<(usize, &str)> = tensors
            .iter()
            .flat_map(|t| t.inputs.iter().map(|i| (i.model, i.tensor.as_str())))
            .collect();
        for (k, slice) in slices.iter().enumerate() {
            for source in &slice.sources {
                for tensor in &self.inventories[source.model].tensors {
                    let contributed = match &tensor.layer {
                        Some(layer) => (source.start..source.end).contains(&layer.index),
                        None if tensor.before_layers => k == 0,
                        None => k == slices.len() - 1,
                    };
                    let missing = contributed
                        && !tensor.tied_alias
                        && !tensor.buffer
                        && !used.contains(&(source.model, tensor.name.as_str()));
                    if !missing {
                        continue;
                    }
                    let lacking = match tensor.layer {
                        Some(_) => format!(
                            "but the output's layers are built from layer 0 of model `{}`, \
                             which has no `{}`",
                            self.models[layout_model],
                            with_layer(tensor, 0)
                        ),
                        None => format!(
                            "which model `{}` (whose layout the output follows) lacks",
                            self.models[layout_model]
                        ),
                    };
                    return Err(self.recipe.error(
                        self.locations[source.model],
                        format!(
                            "model `{}` has tensor `{}`, {lacking}: the output would silently \
                             leave it out",
                            self.models[source.model], tensor.name
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    fn tensor(
        &self,
        out_name: &str,
        slice: &NormalSlice<'_>,
        input_name: impl Fn(&SliceSource<'_>) -> String,
        t: f64,
    ) -> Result<PlannedTensor, RecipeError> {
        let mut inputs = vec![];
        let mut base = None;
        let mut vocab = false;
        for source in &slice.sources {
            let name = input_name(source);
            let tensor = self.inventories[source.model].get(&name).ok_or_else(|| {
                self.recipe.error(
                    self.locations[source.model],
                    format!(
                        "model `{}` has no tensor `{name}`",
                        self.models[source.model]
                    ),
                )
            })?;
            vocab |= tensor.vocab;
            let is_base =
                self.method.base != BasePolicy::Ignored && slice.base == Some(source.model);
            if is_base {
                base = Some(inputs.len());
            }
            let mut params = BTreeMap::new();
            for spec in &self.method.params {
                let applies = match spec.scope {
                    ParamScope::Shared => false,
                    ParamScope::PerModel => true,
                    ParamScope::PerNonBase => !is_base,
                };
                if applies {
                    let levels = [
                        Some(source.params),
                        slice.params,
                        Some(&self.recipe.parameters),
                    ];
                    let value = self.resolve(spec, &levels, &name, t, Some(source.model))?;
                    params.insert(spec.name.to_owned(), value);
                }
            }
            inputs.push(PlannedInput {
                model: source.model,
                tensor: name,
                shape: tensor.shape.clone(),
                params,
                transform: InputTransform::AsStored,
            });
        }
        let shape = self.output_shape(out_name, &inputs, base, vocab)?;
        for input in inputs.iter_mut().filter(|i| i.shape != shape) {
            input.transform = InputTransform::Narrow;
        }
        let mut params = BTreeMap::new();
        for spec in self
            .method
            .params
            .iter()
            .filter(|s| s.scope == ParamScope::Shared)
        {
            let levels = [slice.params, Some(&self.recipe.parameters)];
            params.insert(
                spec.name.to_owned(),
                self.resolve(spec, &levels, out_name, t, None)?,
            );
        }
        Ok(PlannedTensor {
            name: out_name.into(),
            shape,
            vocabulary: vocab,
            inputs,
            base,
            params,
            t,
        })
    }

    /// All inputs must agree in shape, except vocabulary tensors, which are
    /// cut to the base's shape (or the smallest common one without a base).
    fn output_shape(
        &self,
        out_name: &str,
        inputs: &[PlannedInput],
        base: Option<usize>,
        vocab: bool,
    ) -> Result<Vec<usize>, RecipeError> {
        // Compare with the base where there is one: the odd one out is then the model named.
        let first = &inputs[base.unwrap_or(0)];
        let mismatch = |odd: &PlannedInput, problem: &str| {
            self.recipe.error(
                self.locations[odd.model],
                format!(
                "tensor `{out_name}`: model `{}` has shape {:?} but model `{}` has {:?}{problem}",
                self.models[odd.model], odd.shape, self.models[first.model], first.shape
            ),
            )
        };
        if let Some(odd) = inputs
            .iter()
            .find(|i| i.shape.len() != first.shape.len() || (!vocab && i.shape != first.shape))
        {
            return Err(mismatch(odd, ""));
        }
        if !vocab {
            return Ok(first.shape.clone());
        }
        if self.recipe.tokenizer.is_some() {
            // Rows follow the written tokenizer: set by Plan::align_vocabulary.
            return Ok(first.shape.clone());
        }
        let Some(base) = base else {
            return Ok((0..first.shape.len())
                .map(|d| inputs.iter().map(|i| i.shape[d]).min().unwrap_or(0))
                .collect());
        };
        let shape = inputs[base].shape.clone();
        if let Some(odd) = inputs
            .iter()
            .find(|i| i.shape.iter().zip(&shape).any(|(a, b)| a < b))
        {
            return Err(mismatch(odd, ", smaller than the base's"));
        }
        Ok(shape)
    }

    fn resolve(
        &self,
        spec: &ParamSpec,
        levels: &[Option<&Params>],
        tensor: &str,
        t: f64,
        model: Option<usize>,
    ) -> Result<Resolved, RecipeError> {
        let numeric = spec.kind == ParamKind::Number;
        let found = levels.iter().flatten().find_map(|params| {
            let (setting, at): (&Setting, Location) = params.get(spec.name)?;
            Some((setting.evaluate(tensor, t, numeric)?, at))
        });
        let whose = model
            .map(|m| format!(" for model `{}`", self.models[m]))
            .unwrap_or_default();
        let (value, at) = match (found, &spec.default) {
            (Some((value, at)), _) => (value, Some(at)),
            (None, Some(default)) => (default.clone(), None),
            (None, None) => {
                // Given but without a value here (an empty list, or no filter
                // that matches): the error points at that `name:` line.
                if let Some((setting, at)) = levels
                    .iter()
                    .flatten()
                    .find_map(|params| params.get(spec.name))
                {
                    let why = match setting {
                        Setting::Gradient(values) if values.is_empty() => "is an empty list",
                        Setting::Conditional(entries) if entries.is_empty() => "is an empty list",
                        _ => "gives no value (no entry's filter matches it, or its value is an empty list)",
                    };
                    return Err(self.recipe.error(
                        at,
                        format!(
                            "parameter `{}`{whose} {why} for tensor `{tensor}`, and `{}` \
                             requires it: give a value (a number, or a list of at least one)",
                            spec.name, self.method.name
                        ),
                    ));
                }
                let at = model
                    .map(|m| self.locations[m])
                    .unwrap_or(self.recipe.merge_method_at);
                return Err(self.recipe.error(
                    at,
                    format!(
                        "missing parameter `{}`{whose} (tensor `{tensor}`), required by `{}`",
                        spec.name, self.method.name
                    ),
                ));
            }
        };
        let here = at.unwrap_or(self.recipe.merge_method_at);
        let kind_ok = match spec.kind {
            ParamKind::Number => value.as_f64().is_some(),
            ParamKind::Bool => value.as_bool().is_some(),
            ParamKind::Text => matches!(value, Scalar::Text(_)),
        };
        if !kind_ok {
            let kind = match spec.kind {
                ParamKind::Number => "number",
                ParamKind::Bool => "true or false",
                ParamKind::Text => "string",
            };
            return Err(self.recipe.error(
                here,
                format!(
                    "parameter `{}`{whose} must be a {kind}, got {value}",
                    spec.name
                ),
            ));
        }
        if value.as_f64().is_some_and(|n| !n.is_finite()) {
            return Err(self.recipe.error(
                here,
                format!(
                    "parameter `{}`{whose} must be a finite number, got {value}",
                    spec.name
                ),
            ));
        }
        if let Some(check) = spec.check {
            check(&value).map_err(|problem| {
                self.recipe
                    .error(here, format!("parameter `{}`{whose}: {problem}", spec.name))
            })?;
        }
        if let Some(Err(advice)) = spec.warn.map(|warn| warn(&value)) {
            self.warnings.borrow_mut().insert(format!(
                "{}:{here}: parameter `{}`: {advice}",
                self.recipe.source_name, spec.name
            ));
        }
        Ok(Resolved { value, at })
    }
}

/// A tensor's name with its block index replaced by `to`
/// (`model.layers.0.mlp.up_proj.weight` → `model.layers.7.mlp.up_proj.weight`).
fn with_layer(tensor: &InventoryTensor, to: usize) -> String {
    match &tensor.layer {
        Some(layer) => format!(
            "{}{to}{}",
            &tensor.name[..layer.digits.start],
            &tensor.name[layer.digits.end..]
        ),
        None => tensor.name.clone(),
    }
}

#[cfg(test)]
mod tests;
