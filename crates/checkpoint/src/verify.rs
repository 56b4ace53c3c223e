//! The last check before an output is committed: its `config.json` says what
//! its tensors are. A config that disagrees with the weights (a layer count,
//! a per-layer list, the vocabulary, the FFN width, the attention heads and
//! their size, the model width, which biases exist) or that a loader rejects
//! or computes NaN from (no known `model_type`, a negative epsilon, a
//! malformed `rope_scaling`) loads nowhere, or loads wrong; it is refused,
//! never written.
//!
//! The attention and width checks follow the family's description
//! ([`crate::family::Shapes`]): for every described family, the config keys
//! that size the heads, with transformers' values where they are absent,
//! are compared with the q/k/v, output and q/k-norm tensors of every layer
//! stored under the description's names.

use std::collections::{BTreeMap, HashMap};

use serde_json::Value;

use crate::arch::{is_layer_keyword, layer_count, layer_index, PER_LAYER_CONFIG_FIELDS};
use crate::decoder::{Flag, Projections};
use crate::family::{self, Family, SizeKey};
use crate::{ModelConfig, TensorSpec};

/// Why an output's config does not describe its tensors (or describes no
/// model a loader builds). Each names the config key, and the tensor where
/// one disagrees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigProblem {
    /// A field whose value no loader accepts (or computes NaN from).
    #[error("{message}")]
    Value { key: String, message: String },
    /// A config key that disagrees with a tensor's shape.
    #[error("{message}")]
    Shape {
        key: String,
        tensor: String,
        message: String,
    },
    /// A tensor the config says exists that is missing, or one it says
    /// does not exist that is there (`key`: the config key that says so).
    #[error("{message}")]
    Tensor {
        key: String,
        tensor: String,
        message: String,
    },
}

impl ConfigProblem {
    /// The config key concerned.
    pub fn key(&self) -> &str {
        match self {
            Self::Value { key, .. } | Self::Shape { key, .. } | Self::Tensor { key, .. } => key,
        }
    }

    /// The tensor that disagrees, where one does.
    pub fn tensor(&self) -> Option<&str> {
        match self {
            Self::Value { .. } => None,
            Self::Shape { tensor, .. } | Self::Tensor { tensor, .. } => Some(tensor),
        }
    }
}

fn value(key: impl Into<String>, message: String) -> ConfigProblem {
    ConfigProblem::Value {
        key: key.into(),
        message,
    }
}

fn shape(key: impl Into<String>, tensor: &str, message: String) -> ConfigProblem {
    ConfigProblem::Shape {
        key: key.into(),
        tensor: tensor.into(),
        message,
    }
}

/// What is wrong between `config` and the tensors of `specs`, if anything.
/// A multimodal config of a family without a description (its sizes in a
/// `text_config`, its towers numbering layers of their own) is checked for
/// what it can be: its values, and that some layer stack of the weights has
/// the text config's layer count.
pub fn config_mismatch(config: &ModelConfig, specs: &[TensorSpec]) -> Option<ConfigProblem> {
    if let Some((key, message)) = config.invalid_size_field() {
        return Some(value(key, message));
    }
    if let Some((key, message)) = config.invalid_value() {
        return Some(value(key, message));
    }
    if let Some(problem) = model_type_problem(config) {
        return Some(problem);
    }
    let family = family::of(config);
    // A described family names its text config's key; others are read by
    // transformers' usual one.
    let text_key = match family {
        None => Some("text_config"),
        Some(family) => family.text_config.as_deref(),
    };
    if let Some(key) = text_key.filter(|key| config.get(key).is_some_and(Value::is_object)) {
        return nested_layer_mismatch(config, key, specs);
    }
    let layers = config.layer_count();
    let stored = layer_count(specs.iter().map(|s| s.name.as_str()));
    if let Some(layers) = layers {
        if stored > 0 && stored != layers {
            let key = config.layer_count_key();
            return Some(value(
                key,
                format!("`{key}` is {layers} but the weights hold {stored} layers"),
            ));
        }
        if let Some(problem) = per_layer_lists(config.fields(), layers, "") {
            return Some(problem);
        }
    }
    if let Some(family) = family {
        if let Some(problem) = family_shapes(config, family, specs) {
            return Some(problem);
        }
    }
    if let Some(vocab) = config.get("vocab_size").and_then(Value::as_u64) {
        let embedding = specs
            .iter()
            .find(|s| family::is_embedding(family, &s.name) && s.shape.len() == 2);
        if let Some(embedding) = embedding {
            if embedding.shape[0] as u64 != vocab {
                return Some(shape(
                    "vocab_size",
                    &embedding.name,
                    format!(
                        "`vocab_size` is {vocab} but {} has {} rows",
                        embedding.name, embedding.shape[0]
                    ),
                ));
            }
        }
    }
    let widths = specs.iter().filter_map(|s| {
        let width = family::mlp_width(family, &s.name, &s.shape)?;
        Some((layer_index(&s.name)?, width, &s.name))
    });
    for (layer, width, name) in widths {
        let expected = match config.get("intermediate_size") {
            Some(Value::Array(entries)) => entries.get(layer).and_then(Value::as_u64),
            Some(value) => value.as_u64(),
            None => continue,
        };
        if expected != Some(width as u64) {
            return Some(shape(
                "intermediate_size",
                name,
                format!(
                    "layer {layer}'s FFN is {width} wide ({name}) but `intermediate_size` says {}",
                    expected.map_or("otherwise".to_owned(), |w| w.to_string())
                ),
            ));
        }
    }
    None
}

/// A `model_type` transformers builds: present, a string, one it knows
/// (or a described family). A config that brings its own code (`auto_map`
/// naming an `AutoConfig`) is read by that code instead.
fn model_type_problem(config: &ModelConfig) -> Option<ConfigProblem> {
    let remote_code = config
        .get("auto_map")
        .and_then(|map| map.get("AutoConfig"))
        .is_some_and(Value::is_string);
    let message = match config.get("model_type") {
        _ if remote_code => return None,
        None | Some(Value::Null) => {
            "config.json names no `model_type`: no loader can tell which model to build".into()
        }
        Some(Value::String(name)) if family::known_model_type(name) => return None,
        Some(Value::String(name)) => {
            format!("`model_type` {name:?} is no model type transformers knows")
        }
        Some(other) => format!("`model_type` must be a string, got {other}"),
    };
    Some(value("model_type", message))
}

/// Per-layer lists (`layer_types`, a list `intermediate_size`) of `fields`
/// must have one entry per layer.
fn per_layer_lists(
    fields: &serde_json::Map<String, Value>,
    layers: usize,
    scope: &str,
) -> Option<ConfigProblem> {
    PER_LAYER_CONFIG_FIELDS.iter().find_map(|field| {
        let Some(Value::Array(entries)) = fields.get(*field) else {
            return None;
        };
        (entries.len() != layers).then(|| {
            value(
                format!("{scope}{field}"),
                format!(
                    "`{scope}{field}` has {} entries but the model has {layers} layers",
                    entries.len()
                ),
            )
        })
    })
}

/// A multimodal config (its text model's sizes under `key`): the text
/// config's layer count must be that of some layer stack of the weights (the
/// towers have stacks of their own), its per-layer lists as long.
fn nested_layer_mismatch(
    config: &ModelConfig,
    key: &str,
    specs: &[TensorSpec],
) -> Option<ConfigProblem> {
    let text = config.get(key)?.as_object()?;
    let layers = text.get("num_hidden_layers")?.as_u64()? as usize;
    let scope = format!("{key}.");
    if let Some(problem) = per_layer_lists(text, layers, &scope) {
        return Some(problem);
    }
    let stacks = layer_stacks(specs);
    if stacks.is_empty() || stacks.values().any(|&n| n == layers) {
        return None;
    }
    let (largest, _) = stacks.iter().max_by_key(|(_, &n)| n)?;
    let found: Vec<String> = stacks.iter().map(|(p, n)| format!("{p}: {n}")).collect();
    Some(shape(
        format!("{scope}num_hidden_layers"),
        largest,
        format!(
            "`{scope}num_hidden_layers` is {layers} but no layer stack in the weights has \
             {layers} layers ({})",
            found.join(", ")
        ),
    ))
}

/// Each layer stack of the weights (the name up to `layers`, `h`, `blocks`
/// or `layer`) and its layer count.
fn layer_stacks(specs: &[TensorSpec]) -> BTreeMap<String, usize> {
    let mut stacks = BTreeMap::new();
    for spec in specs {
        let parts: Vec<&str> = spec.name.split('.').collect();
        let found = parts.windows(2).enumerate().find_map(|(i, pair)| {
            let keyword = is_layer_keyword(pair[0]);
            let index = pair[1].parse::<usize>().ok().filter(|_| keyword)?;
            Some((parts[..=i].join("."), index))
        });
        if let Some((prefix, index)) = found {
            let count = stacks.entry(prefix).or_insert(0);
            *count = (*count).max(index + 1);
        }
    }
    stacks
}

/// A size read from `key`: a positive integer, or `None` where the key is
/// absent (or null); anything else is refused.
fn size(config: &ModelConfig, key: &str) -> Result<Option<usize>, ConfigProblem> {
    match config.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => match v.as_u64().filter(|&n| n > 0) {
            Some(n) => Ok(Some(n as usize)),
            None => Err(value(
                key,
                format!("`{key}` must be a positive integer, got {v}"),
            )),
        },
    }
}

/// The attention sizes a family's config gives: heads, key/value heads,
/// head size, with the keys (or how they were derived) for messages.
struct Heads {
    heads: usize,
    heads_key: String,
    kv: usize,
    kv_key: String,
    dim: usize,
    dim_key: String,
}

fn heads(config: &ModelConfig, family: &Family, hidden: usize) -> Result<Heads, ConfigProblem> {
    let shapes = &family.shapes;
    let heads_key = shapes.heads.clone();
    let heads = size(config, &heads_key)?.ok_or_else(|| {
        value(
            &heads_key,
            format!("config.json has no `{heads_key}` but the weights hold attention layers"),
        )
    })?;
    let read = |spec: &Option<SizeKey>| -> Result<Option<(usize, String)>, ConfigProblem> {
        let Some(spec) = spec else { return Ok(None) };
        Ok(match (size(config, &spec.key)?, spec.default) {
            (Some(n), _) => Some((n, format!("`{}`", spec.key))),
            (None, Some(n)) => Some((n, format!("`{}` (absent: {n})", spec.key))),
            (None, None) => None,
        })
    };
    let (kv, kv_key) = read(&shapes.kv_heads)?
        .unwrap_or_else(|| (heads, format!("`{heads_key}` (no key/value head count)")));
    if kv > heads || heads % kv != 0 {
        let key = shapes.kv_heads.as_ref().map_or(&heads_key, |k| &k.key);
        return Err(value(
            key,
            format!(
                "{heads} attention heads (`{heads_key}`) are not a multiple of {kv} key/value \
                 heads ({kv_key})"
            ),
        ));
    }
    let (dim, dim_key) = match read(&shapes.head_dim)? {
        Some(found) => found,
        None if hidden % heads == 0 => (
            hidden / heads,
            format!("head size (`{}` / `{heads_key}`)", shapes.hidden),
        ),
        None => {
            return Err(value(
                &heads_key,
                format!(
                    "`{}` {hidden} is not a multiple of `{heads_key}` {heads}, and this family's \
                     head size is their quotient",
                    shapes.hidden
                ),
            ))
        }
    };
    Ok(Heads {
        heads,
        heads_key,
        kv,
        kv_key,
        dim,
        dim_key,
    })
}

/// The described family's sizes against its tensors: the model width
/// against every vocabulary tensor's columns; the heads, key/value heads
/// and head size against each stored layer's q/k/v, output and q/k-norm
/// tensors; the biases the config says exist against those stored.
fn family_shapes(
    config: &ModelConfig,
    family: &Family,
    specs: &[TensorSpec],
) -> Option<ConfigProblem> {
    let shapes = &family.shapes;
    let hidden_key = shapes.hidden.as_str();
    let hidden = match size(config, hidden_key) {
        Ok(hidden) => hidden,
        Err(problem) => return Some(problem),
    };
    let tensors: HashMap<&str, &TensorSpec> = specs.iter().map(|s| (s.name.as_str(), s)).collect();
    for spec in specs.iter().filter(|s| family.vocabulary.contains(&s.name)) {
        let [rows, columns] = spec.shape[..] else {
            continue;
        };
        match hidden {
            Some(hidden) if hidden == columns => {}
            Some(hidden) => {
                return Some(shape(
                    hidden_key,
                    &spec.name,
                    format!(
                        "`{hidden_key}` is {hidden} but {} is {columns} wide ([{rows}, {columns}])",
                        spec.name
                    ),
                ))
            }
            None => {
                return Some(value(
                    hidden_key,
                    format!(
                        "config.json has no `{hidden_key}` but {} is {columns} wide",
                        spec.name
                    ),
                ))
            }
        }
    }
    let attention = family.attention_tensors()?;
    let stored = layer_count(specs.iter().map(|s| s.name.as_str()));
    // Only layers stored under the description's names are compared (a
    // checkpoint named otherwise is not one the description reads).
    let described = |layer: usize| {
        let prefix = format!("{}.", attention.layers.replace("{i}", &layer.to_string()));
        specs.iter().any(|s| s.name.starts_with(&prefix))
    };
    let layers: Vec<usize> = (0..stored).filter(|&i| described(i)).collect();
    if layers.is_empty() {
        return None;
    }
    let Some(hidden) = hidden else {
        return Some(value(
            hidden_key,
            format!("config.json has no `{hidden_key}` but the weights hold attention layers"),
        ));
    };
    let sizes = match heads(config, family, hidden) {
        Ok(sizes) => sizes,
        Err(problem) => return Some(problem),
    };
    layers.into_iter().find_map(|layer| {
        attention_mismatch(config, family, &attention, &tensors, layer, hidden, &sizes)
    })
}

/// A projection of one layer: its relative name, how many outputs the
/// config gives it, how the config says so, and the key that says it.
struct Projection {
    part: String,
    outputs: usize,
    says: String,
    key: String,
    /// The output projection (`[hidden, heads·head_dim]`), not q/k/v.
    output: bool,
}

/// One layer's attention tensors against the config's sizes.
fn attention_mismatch(
    config: &ModelConfig,
    family: &Family,
    attention: &family::AttentionTensors,
    tensors: &HashMap<&str, &TensorSpec>,
    layer: usize,
    hidden: usize,
    sizes: &Heads,
) -> Option<ConfigProblem> {
    let hidden_key = family.shapes.hidden.as_str();
    let Heads { heads, kv, dim, .. } = *sizes;
    let (q_rows, kv_rows) = (heads * dim, kv * dim);
    let q_says = format!("`{}` {heads} × {} {dim}", sizes.heads_key, sizes.dim_key);
    let kv_says = format!("{} {kv} × {} {dim}", sizes.kv_key, sizes.dim_key);
    let kv_key = family
        .shapes
        .kv_heads
        .as_ref()
        .map_or(&sizes.heads_key, |k| &k.key);
    let projection = |part: &String, outputs, says: &str, key: &str| Projection {
        part: part.clone(),
        outputs,
        says: says.to_owned(),
        key: key.to_owned(),
        output: false,
    };
    let mut projections = match &attention.qkv {
        Projections::Separate([q, k, v]) => vec![
            projection(q, q_rows, &q_says, &sizes.heads_key),
            projection(k, kv_rows, &kv_says, kv_key),
            projection(v, kv_rows, &kv_says, kv_key),
        ],
        Projections::Concatenated(qkv) => {
            let says = format!("{q_says} + 2 × {kv_says}");
            vec![projection(
                qkv,
                q_rows + 2 * kv_rows,
                &says,
                &sizes.heads_key,
            )]
        }
        Projections::InterleavedByHead(qkv) => {
            let says = format!("3 × {q_says}");
            vec![projection(qkv, 3 * q_rows, &says, &sizes.heads_key)]
        }
    };
    projections.push(Projection {
        output: true,
        ..projection(&attention.output, q_rows, &q_says, &sizes.heads_key)
    });
    for p in &projections {
        let stem = attention.layer_tensor(layer, &p.part);
        let name = format!("{stem}.weight");
        let Some(spec) = tensors.get(name.as_str()) else {
            return Some(missing(family, &name));
        };
        // Stored [out, in] (Conv1D: [in, out]); the output projection maps
        // the heads back to the model width.
        let (out_dim, in_dim) = match p.output {
            false => (p.outputs, hidden),
            true => (hidden, p.outputs),
        };
        let (expected, hidden_axis) = match attention.transposed {
            false => ([out_dim, in_dim], usize::from(!p.output)),
            true => ([in_dim, out_dim], usize::from(p.output)),
        };
        if spec.shape != expected {
            let wrong_width = spec.shape.len() != 2 || spec.shape[hidden_axis] != hidden;
            let (key, why) = match wrong_width {
                true => (hidden_key, format!("`{hidden_key}` {hidden}")),
                false => (p.key.as_str(), p.says.clone()),
            };
            return Some(shape(
                key,
                &name,
                format!("{name} is {:?} but {why} make it {expected:?}", spec.shape),
            ));
        }
        let bias = format!("{stem}.bias");
        let (flag, bias_len) = match p.output {
            false => (&attention.qkv_bias, p.outputs),
            true => (&attention.output_bias, hidden),
        };
        match (tensors.get(bias.as_str()), flag.of(config)) {
            (Some(spec), true) if spec.shape != [bias_len] => {
                return Some(shape(
                    &p.key,
                    &bias,
                    format!(
                        "{bias} is {:?} but its weight {name} has {bias_len} outputs",
                        spec.shape
                    ),
                ))
            }
            (None, true) => return Some(missing_bias(family, flag, &bias)),
            (Some(_), false) => return Some(unexpected_bias(family, flag, &bias)),
            _ => {}
        }
    }
    if let Some(norm) = &attention.qk_norm {
        let (q_len, k_len) = match norm.across_heads {
            true => (q_rows, kv_rows),
            false => (dim, dim),
        };
        let dim_key = family
            .shapes
            .head_dim
            .as_ref()
            .map_or(&sizes.heads_key, |k| &k.key);
        for (part, len) in [(&norm.q, q_len), (&norm.k, k_len)] {
            let name = format!("{}.weight", attention.layer_tensor(layer, part));
            let Some(spec) = tensors.get(name.as_str()) else {
                return Some(missing(family, &name));
            };
            if spec.shape != [len] {
                return Some(shape(
                    dim_key,
                    &name,
                    format!(
                        "{name} is {:?} but the config's head size ({} {dim}) makes it [{len}]",
                        spec.shape, sizes.dim_key
                    ),
                ));
            }
        }
    }
    None
}

fn missing(family: &Family, name: &str) -> ConfigProblem {
    ConfigProblem::Tensor {
        key: "model_type".into(),
        tensor: name.into(),
        message: format!(
            "`model_type` {} has {name} but the weights lack it (a loader would initialise it \
             randomly)",
            family.model_type
        ),
    }
}

/// Who says a bias exists: the config key of a configurable flag, else the family.
fn says(family: &Family, flag: &Flag, present: bool) -> (String, String) {
    match flag {
        Flag::Config { config: key, .. } => (key.clone(), format!("`{key}` is {present}")),
        Flag::Fixed(_) => (
            "model_type".into(),
            format!(
                "`model_type` {} {} this bias",
                family.model_type,
                if present { "has" } else { "has no" }
            ),
        ),
    }
}

fn missing_bias(family: &Family, flag: &Flag, bias: &str) -> ConfigProblem {
    let (key, says) = says(family, flag, true);
    ConfigProblem::Tensor {
        key,
        tensor: bias.into(),
        message: format!(
            "{says} but the weights lack {bias} (a loader would initialise it randomly)"
        ),
    }
}

fn unexpected_bias(family: &Family, flag: &Flag, bias: &str) -> ConfigProblem {
    let (key, says) = says(family, flag, false);
    ConfigProblem::Tensor {
        key,
        tensor: bias.into(),
        message: format!("{says} but the weights hold {bias} (a loader would ignore it)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synthetic::LlamaShape;
    use crate::Dtype;
    use serde_json::json;

    fn with(config: &ModelConfig, key: &str, value: Value) -> ModelConfig {
        let mut config = config.clone();
        config.set(key, value);
        config
    }

    #[test]
    fn a_consistent_config_passes_and_each_disagreement_is_named() {
        let shape = LlamaShape::TINY;
        let specs = shape.specs(Dtype::F32);
        let config = shape.config(Dtype::F32);
        assert_eq!(config_mismatch(&config, &specs), None);
        let cases = [
            ("num_hidden_layers", json!(6), "hold 4 layers"),
            (
                "num_hidden_layers",
                json!("4"),
                "must be a positive integer",
            ),
            ("num_hidden_layers", json!(-1), "must be a positive integer"),
            ("hidden_size", json!(4.5), "must be a positive integer"),
            ("layer_types", json!(vec!["full_attention"; 3]), "3 entries"),
            ("vocab_size", json!(512), "384 rows"),
            ("intermediate_size", json!(128), "160 wide"),
            (
                "intermediate_size",
                json!([160, 160, 99, 160]),
                "layer 2's FFN",
            ),
        ];
        for (key, value, needle) in cases {
            let message = config_mismatch(&with(&config, key, value.clone()), &specs)
                .unwrap_or_else(|| panic!("{key}: {value} passed"))
                .to_string();
            assert!(message.contains(needle), "{key}: {message}");
        }
        let per_layer = with(&config, "intermediate_size", json!(vec![160; 4]));
        assert_eq!(config_mismatch(&per_layer, &specs), None);
    }

    fn without(config: &ModelConfig, key: &str) -> ModelConfig {
        let mut fields = config.fields().clone();
        fields.remove(key);
        ModelConfig::from_json(fields)
    }

    fn problem(config: &ModelConfig, specs: &[TensorSpec], what: &str) -> ConfigProblem {
        config_mismatch(config, specs).unwrap_or_else(|| panic!("{what} passed"))
    }

    /// Each hostile value is refused, naming its key (and the tensor that
    /// disagrees, where one does).
    #[test]
    fn hostile_values_are_refused_by_key() {
        let shape = LlamaShape::TINY;
        let specs = shape.specs(Dtype::F32);
        let config = shape.config(Dtype::F32);
        let q = "model.layers.0.self_attn.q_proj.weight";
        let k = "model.layers.0.self_attn.k_proj.weight";
        let cases: Vec<(&str, Value, &str, Option<&str>, &str)> = vec![
            (
                "model_type",
                json!("nonsense"),
                "model_type",
                None,
                "no model type transformers knows",
            ),
            (
                "model_type",
                json!(7),
                "model_type",
                None,
                "must be a string",
            ),
            (
                "model_type",
                Value::Null,
                "model_type",
                None,
                "names no `model_type`",
            ),
            (
                "rms_norm_eps",
                json!(-1e-5),
                "rms_norm_eps",
                None,
                "positive number",
            ),
            (
                "rms_norm_eps",
                json!("1e-5"),
                "rms_norm_eps",
                None,
                "positive number",
            ),
            (
                "rms_norm_eps",
                json!(0),
                "rms_norm_eps",
                None,
                "positive number",
            ),
            (
                "rope_theta",
                json!(-10000.0),
                "rope_theta",
                None,
                "positive number",
            ),
            (
                "partial_rotary_factor",
                json!(1.5),
                "partial_rotary_factor",
                None,
                "(0, 1]",
            ),
            (
                "rope_scaling",
                json!("linear"),
                "rope_scaling",
                None,
                "must be an object",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "bogus", "factor": 2.0}),
                "rope_scaling",
                None,
                "does not build",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "linear"}),
                "rope_scaling",
                None,
                "needs `factor`",
            ),
            (
                "rope_scaling",
                json!({"type": "linear", "factor": -2.0}),
                "rope_scaling",
                None,
                "`factor` must be a positive number",
            ),
            (
                "rope_scaling",
                json!({"type": "dynamic", "factor": "2"}),
                "rope_scaling",
                None,
                "`factor` must be a positive number",
            ),
            (
                "rope_scaling",
                json!({"factor": 2.0}),
                "rope_scaling",
                None,
                "names no `rope_type`",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0}),
                "rope_scaling",
                None,
                "needs `low_freq_factor`",
            ),
            (
                "rope_scaling",
                json!({"rope_type": "longrope", "short_factor": [1.0], "long_factor": []}),
                "rope_scaling",
                None,
                "`long_factor` must be a list",
            ),
            (
                "rope_parameters",
                json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6}, "sliding_attention": {"rope_theta": -1}}),
                "rope_parameters",
                None,
                "`sliding_attention`: `rope_theta`",
            ),
            (
                "text_config",
                json!([]),
                "text_config",
                None,
                "must be an object",
            ),
            (
                "text_config",
                json!({"rms_norm_eps": -1}),
                "text_config.rms_norm_eps",
                None,
                "positive number",
            ),
            (
                "num_attention_heads",
                json!(8),
                "num_attention_heads",
                Some(q),
                "[128, 64]",
            ),
            (
                "head_dim",
                json!(8),
                "num_attention_heads",
                Some(q),
                "`head_dim` 8",
            ),
            (
                "num_key_value_heads",
                json!(4),
                "num_key_value_heads",
                Some(k),
                "`num_key_value_heads` 4",
            ),
            (
                "num_key_value_heads",
                json!(3),
                "num_key_value_heads",
                None,
                "not a multiple of 3",
            ),
            (
                "hidden_size",
                json!(48),
                "hidden_size",
                Some("model.embed_tokens.weight"),
                "is 64 wide",
            ),
            (
                "attention_bias",
                json!(true),
                "attention_bias",
                Some("model.layers.0.self_attn.q_proj.bias"),
                "`attention_bias` is true",
            ),
            (
                "model_type",
                json!("qwen2"),
                "model_type",
                Some("model.layers.0.self_attn.q_proj.bias"),
                "qwen2 has this bias",
            ),
            // Mistral's key/value head count is 8 where the key is absent.
            (
                "model_type",
                json!("mistral"),
                "num_key_value_heads",
                None,
                "(absent: 8)",
            ),
        ];
        for (key, value, named, tensor, needle) in cases {
            let hostile = match (key, &value) {
                ("model_type", Value::Null) => without(&config, key),
                ("model_type", Value::String(t)) if t == "mistral" => {
                    without(&with(&config, key, value.clone()), "num_key_value_heads")
                }
                _ => with(&config, key, value.clone()),
            };
            let found = problem(&hostile, &specs, &format!("{key}: {value}"));
            let message = found.to_string();
            assert!(message.contains(needle), "{key}: {value}: {message}");
            assert_eq!(found.key(), named, "{key}: {value}: {message}");
            assert_eq!(found.tensor(), tensor, "{key}: {value}: {message}");
        }
    }

    #[test]
    fn loadable_configs_pass() {
        let shape = LlamaShape::TINY;
        let specs = shape.specs(Dtype::F32);
        let config = shape.config(Dtype::F32);
        let fine = [
            ("rope_scaling", Value::Null),
            (
                "rope_scaling",
                json!({"rope_type": "linear", "factor": 2.0}),
            ),
            (
                "rope_scaling",
                json!({"type": "mrope", "mrope_section": [2, 3, 3]}),
            ),
            (
                "rope_scaling",
                json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
            ),
            (
                "rope_parameters",
                json!({"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                       "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
            ),
            ("text_config", json!({"num_hidden_layers": 99})),
            ("head_dim", Value::Null),
        ];
        for (key, value) in fine {
            assert_eq!(
                config_mismatch(&with(&config, key, value.clone()), &specs),
                None,
                "{key}: {value}"
            );
        }
        // Absent, Llama's head count and size are derived from the others.
        let derived = without(&without(&config, "head_dim"), "num_key_value_heads");
        let mut mha = LlamaShape::TINY;
        mha.kv_heads = mha.heads;
        assert_eq!(config_mismatch(&derived, &mha.specs(Dtype::F32)), None);
        // A model type only its own code knows is read by that code.
        let remote = with(
            &with(&config, "model_type", json!("my_arch")),
            "auto_map",
            json!({"AutoConfig": "configuration_my.MyConfig"}),
        );
        assert_eq!(config_mismatch(&remote, &specs), None);
    }

    /// Any `text_config` key turned the whole check off; now a described
    /// family is checked regardless, and an undescribed multimodal one has
    /// its text layer count compared with the weights' layer stacks.
    #[test]
    fn a_text_config_no_longer_turns_the_check_off() {
        let shape = LlamaShape::TINY;
        let specs = shape.specs(Dtype::F32);
        let config = with(
            &shape.config(Dtype::F32),
            "text_config",
            json!({"num_hidden_layers": 4}),
        );
        let found = problem(
            &with(&config, "num_hidden_layers", json!(6)),
            &specs,
            "6 layers",
        );
        assert_eq!(found.key(), "num_hidden_layers");
        let multimodal = |layers: usize| {
            ModelConfig::from_json(
                json!({"model_type": "gemma3", "text_config": {"num_hidden_layers": layers,
                       "layer_types": vec!["full_attention"; 4]}})
                .as_object()
                .unwrap()
                .clone(),
            )
        };
        let mut tower: Vec<TensorSpec> = (0..2)
            .map(|i| {
                TensorSpec::new(
                    format!("vision_tower.encoder.layers.{i}.fc.weight"),
                    Dtype::F32,
                    vec![4, 4],
                )
            })
            .collect();
        tower.extend((0..4).map(|i| {
            TensorSpec::new(
                format!("language_model.model.layers.{i}.mlp.up_proj.weight"),
                Dtype::F32,
                vec![4, 4],
            )
        }));
        assert_eq!(config_mismatch(&multimodal(4), &tower), None);
        let found = problem(&multimodal(9), &tower, "9 text layers");
        assert_eq!(found.key(), "text_config.layer_types");
        let mut bogus = multimodal(9);
        let mut text = bogus.get("text_config").unwrap().clone();
        text.as_object_mut().unwrap().remove("layer_types");
        bogus.set("text_config", text);
        let found = problem(&bogus, &tower, "9 text layers");
        assert_eq!(found.key(), "text_config.num_hidden_layers");
        assert!(
            found.to_string().contains("language_model.model.layers: 4"),
            "{found}"
        );
    }

    #[test]
    fn biases_the_config_does_not_have_are_refused() {
        let shape = LlamaShape::TINY;
        let mut specs = shape.specs(Dtype::F32);
        let config = shape.config(Dtype::F32);
        for (part, rows) in [("q_proj", 64), ("k_proj", 32), ("v_proj", 32)] {
            for i in 0..shape.layers {
                let name = format!("model.layers.{i}.self_attn.{part}.bias");
                specs.push(TensorSpec::new(name, Dtype::F32, vec![rows]));
            }
        }
        // Qwen2 weights under a Llama config: transformers ignores the biases.
        let found = problem(&config, &specs, "llama over biases");
        assert_eq!(found.key(), "attention_bias");
        assert!(found.to_string().contains("would ignore"), "{found}");
        assert_eq!(
            config_mismatch(&with(&config, "model_type", json!("qwen2")), &specs),
            None
        );
        // Llama's `attention_bias` also puts a bias on the output projection.
        let found = problem(
            &with(&config, "attention_bias", json!(true)),
            &specs,
            "no o_proj bias",
        );
        assert_eq!(found.tensor(), Some("model.layers.0.self_attn.o_proj.bias"));
        let mut missing = specs.clone();
        missing.retain(|s| s.name != "model.layers.2.self_attn.v_proj.weight");
        let found = problem(
            &with(&config, "model_type", json!("qwen2")),
            &missing,
            "no v_proj",
        );
        assert_eq!(
            found.tensor(),
            Some("model.layers.2.self_attn.v_proj.weight")
        );
    }

    /// Shapes as transformers builds them (read off its models: hidden 48,
    /// 2 heads, one layer), for the families whose sizes are read otherwise
    /// than Llama's; each passes, and breaking one size is refused.
    #[test]
    fn every_family_reads_its_sizes_as_transformers_does() {
        type Case = (&'static str, Value, Vec<(String, Vec<usize>)>);
        let wide = json!({"hidden_size": 64, "num_attention_heads": 32});
        let ignored = json!({"hidden_size": 64, "num_attention_heads": 32, "head_dim": 8});
        // Llama-named attention of one layer: q/k/v rows, q/k norm size, q/k/v biases.
        let attention = |rows: &[usize; 3], norm: Option<usize>, bias: bool| {
            let p = "model.layers.0.self_attn";
            let mut tensors = vec![];
            for (part, rows) in ["q_proj", "k_proj", "v_proj"].iter().zip(rows) {
                tensors.push((format!("{p}.{part}.weight"), vec![*rows, 64]));
                if bias {
                    tensors.push((format!("{p}.{part}.bias"), vec![*rows]));
                }
            }
            tensors.push((format!("{p}.o_proj.weight"), vec![64, rows[0]]));
            if let Some(norm) = norm {
                tensors.push((format!("{p}.q_norm.weight"), vec![norm]));
                tensors.push((format!("{p}.k_norm.weight"), vec![norm]));
            }
            tensors
        };
        let common = json!({"hidden_size": 48, "num_attention_heads": 2});
        let merged = |extra: Value| {
            let mut c = common.clone();
            c.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            c
        };
        let cases: Vec<Case> = vec![
            (
                "gpt2",
                json!({"n_embd": 48, "n_head": 2}),
                vec![
                    ("transformer.wte.weight".into(), vec![16, 48]),
                    ("transformer.h.0.attn.c_attn.weight".into(), vec![48, 144]),
                    ("transformer.h.0.attn.c_attn.bias".into(), vec![144]),
                    ("transformer.h.0.attn.c_proj.weight".into(), vec![48, 48]),
                    ("transformer.h.0.attn.c_proj.bias".into(), vec![48]),
                ],
            ),
            (
                "bert",
                merged(json!({"head_dim": 8, "num_key_value_heads": 1})),
                vec![
                    ("embeddings.word_embeddings.weight".into(), vec![16, 48]),
                    (
                        "encoder.layer.0.attention.self.query.weight".into(),
                        vec![48, 48],
                    ),
                    ("encoder.layer.0.attention.self.query.bias".into(), vec![48]),
                    (
                        "encoder.layer.0.attention.self.key.weight".into(),
                        vec![48, 48],
                    ),
                    ("encoder.layer.0.attention.self.key.bias".into(), vec![48]),
                    (
                        "encoder.layer.0.attention.self.value.weight".into(),
                        vec![48, 48],
                    ),
                    ("encoder.layer.0.attention.self.value.bias".into(), vec![48]),
                    (
                        "encoder.layer.0.attention.output.dense.weight".into(),
                        vec![48, 48],
                    ),
                    (
                        "encoder.layer.0.attention.output.dense.bias".into(),
                        vec![48],
                    ),
                ],
            ),
            (
                "gpt_neox",
                merged(json!({"head_dim": 8})),
                vec![
                    (
                        "gpt_neox.layers.0.attention.query_key_value.weight".into(),
                        vec![144, 48],
                    ),
                    (
                        "gpt_neox.layers.0.attention.query_key_value.bias".into(),
                        vec![144],
                    ),
                    (
                        "gpt_neox.layers.0.attention.dense.weight".into(),
                        vec![48, 48],
                    ),
                    ("gpt_neox.layers.0.attention.dense.bias".into(), vec![48]),
                ],
            ),
            (
                "phi3",
                merged(json!({"head_dim": 8})),
                vec![
                    (
                        "model.layers.0.self_attn.qkv_proj.weight".into(),
                        vec![48, 48],
                    ),
                    (
                        "model.layers.0.self_attn.o_proj.weight".into(),
                        vec![48, 16],
                    ),
                ],
            ),
            (
                "olmo2",
                merged(json!({"num_key_value_heads": 1})),
                vec![
                    (
                        "model.layers.0.self_attn.q_proj.weight".into(),
                        vec![48, 48],
                    ),
                    (
                        "model.layers.0.self_attn.k_proj.weight".into(),
                        vec![24, 48],
                    ),
                    (
                        "model.layers.0.self_attn.v_proj.weight".into(),
                        vec![24, 48],
                    ),
                    (
                        "model.layers.0.self_attn.o_proj.weight".into(),
                        vec![48, 48],
                    ),
                    ("model.layers.0.self_attn.q_norm.weight".into(), vec![48]),
                    ("model.layers.0.self_attn.k_norm.weight".into(), vec![24]),
                ],
            ),
            // 32 heads of hidden 64: the absent counts are transformers' defaults.
            (
                "qwen3",
                wide.clone(),
                attention(&[4096, 4096, 4096], Some(128), false),
            ),
            (
                "gemma",
                wide.clone(),
                attention(&[8192, 4096, 4096], None, false),
            ),
            (
                "gemma2",
                wide.clone(),
                attention(&[8192, 1024, 1024], None, false),
            ),
            ("qwen2", wide.clone(), attention(&[64, 64, 64], None, true)),
            (
                "mistral",
                wide.clone(),
                attention(&[64, 16, 16], None, false),
            ),
            (
                "qwen3_moe",
                wide.clone(),
                attention(&[64, 8, 8], Some(2), false),
            ),
            // StableLM ignores `head_dim`.
            ("stablelm", ignored, attention(&[64, 64, 64], None, false)),
        ];
        for (family, fields, tensors) in cases {
            let mut fields = fields.as_object().unwrap().clone();
            fields.insert("model_type".into(), family.into());
            let config = ModelConfig::from_json(fields);
            let specs: Vec<TensorSpec> = tensors
                .iter()
                .map(|(name, shape)| TensorSpec::new(name.as_str(), Dtype::F32, shape.clone()))
                .collect();
            assert_eq!(config_mismatch(&config, &specs), None, "{family}");
            let heads = family::by_model_type(family).unwrap().shapes.heads.clone();
            problem(&with(&config, &heads, json!(5)), &specs, family);
            // Every attention tensor listed is one the check reads: dropping any is refused.
            let vocabulary = &family::by_model_type(family).unwrap().vocabulary;
            for dropped in (0..specs.len()).filter(|&i| !vocabulary.contains(&specs[i].name)) {
                let mut fewer = specs.clone();
                let gone = fewer.remove(dropped);
                let found = problem(&config, &fewer, &format!("{family} without {}", gone.name));
                assert_eq!(
                    found.tensor(),
                    Some(gone.name.as_str()),
                    "{family}: {found}"
                );
            }
            // And the width every vocabulary tensor has is the config's.
            let narrower = with(
                &config,
                &family::by_model_type(family).unwrap().shapes.hidden,
                json!(40),
            );
            problem(&narrower, &specs, &format!("{family} 40 wide"));
        }
    }
}
