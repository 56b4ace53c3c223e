use std::path::Path;

use serde_json::{Map, Value};

use crate::files::{duplicate_key, read_regular, MAX_JSON_BYTES};
use crate::{dtype::dtype_name, Dtype, Error, Result};

/// The names families give the layer count (transformers' `attribute_map`
/// maps them to `num_hidden_layers`): GPT-2, GPT-J and BLOOM say `n_layer`,
/// MPT `n_layers`, T5 `num_layers`.
const LAYER_COUNT_FIELDS: &[&str] = &["num_hidden_layers", "n_layer", "n_layers", "num_layers"];

/// Fields that count something (layers, units, heads, tokens).
const SIZE_FIELDS: &[&str] = &[
    "num_hidden_layers",
    "n_layer",
    "n_layers",
    "num_layers",
    "hidden_size",
    "intermediate_size",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "vocab_size",
    "max_position_embeddings",
];

/// Fields transformers reads as positive real numbers wherever a family has
/// them: a norm's epsilon (negative: NaN from the first token), RoPE's base.
const POSITIVE_NUMBER_FIELDS: &[&str] = &[
    "rms_norm_eps",
    "layer_norm_eps",
    "layer_norm_epsilon",
    "rope_theta",
    "rotary_emb_base",
    "rope_local_base_freq",
];

/// Fractions of each head RoPE rotates, in (0, 1].
const FRACTION_FIELDS: &[&str] = &["partial_rotary_factor", "rotary_pct"];

/// RoPE settings: legacy `rope_scaling`, transformers 5's `rope_parameters`.
const ROPE_FIELDS: &[&str] = &["rope_scaling", "rope_parameters"];

/// The RoPE types transformers builds (`ROPE_INIT_FUNCTIONS` and
/// `default`), with the legacy names its configs still convert: Phi-3's
/// `su` (longrope), the vision-language families' `mrope` (default).
const ROPE_TYPES: &[&str] = &[
    "default",
    "linear",
    "dynamic",
    "yarn",
    "longrope",
    "llama3",
    "proportional",
    "su",
    "mrope",
];

/// The keys each RoPE type cannot do without (transformers refuses the
/// config without them).
const ROPE_REQUIRED: &[(&str, &[&str])] = &[
    ("linear", &["factor"]),
    ("dynamic", &["factor"]),
    ("yarn", &["factor"]),
    (
        "llama3",
        &[
            "factor",
            "low_freq_factor",
            "high_freq_factor",
            "original_max_position_embeddings",
        ],
    ),
    ("longrope", &["short_factor", "long_factor"]),
    ("su", &["short_factor", "long_factor"]),
];

/// Numbers in a RoPE entry that must be positive where present.
const ROPE_POSITIVE: &[&str] = &[
    "rope_theta",
    "factor",
    "low_freq_factor",
    "high_freq_factor",
    "original_max_position_embeddings",
    "attention_factor",
    "beta_fast",
    "beta_slow",
];

/// A model's `config.json`: kept whole (key order preserved) so it can be
/// written back with only the fields amalgam changes, plus typed accessors for
/// the fields amalgam reads.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelConfig {
    fields: Map<String, Value>,
}

impl ModelConfig {
    pub fn read(path: &Path) -> Result<Self> {
        Self::read_as(path, path)
    }

    /// Reads the config at `real` (a regular file, at most
    /// [`MAX_JSON_BYTES`]), naming it `shown` in errors.
    pub(crate) fn read_as(real: &Path, shown: &Path) -> Result<Self> {
        let fail = |message: String| Error::Config {
            path: shown.into(),
            message,
        };
        let text = read_regular(real, MAX_JSON_BYTES, "a config.json").map_err(|e| match e {
            Error::Io { cause, .. } => fail(format!("cannot read config.json: {cause}")),
            Error::Input { message, .. } => fail(message),
            other => other,
        })?;
        if let Some(key) = duplicate_key(&text) {
            return Err(fail(format!(
                "key {key:?} appears twice (readers disagree on which value counts)"
            )));
        }
        let value: Value = serde_json::from_slice(&text)
            .map_err(|e| fail(format!("config.json is not valid JSON: {e}")))?;
        let config = match value {
            Value::Object(fields) => Self { fields },
            _ => return Err(fail("config.json is not a JSON object".into())),
        };
        match config.invalid_size() {
            Some(problem) => Err(fail(problem)),
            None => Ok(config),
        }
    }

    /// The first size field (`num_hidden_layers`, `hidden_size`, …, here or
    /// in a `text_config`) that is present but not a positive integer (or,
    /// for `intermediate_size`, a list of them): `-1`, `"4"`, `4.5` or `0`
    /// describe no model, and would be copied into outputs.
    pub fn invalid_size(&self) -> Option<String> {
        self.invalid_size_field().map(|(_, message)| message)
    }

    /// [`Self::invalid_size`] with the key (`text_config.KEY` inside a text config).
    pub fn invalid_size_field(&self) -> Option<(String, String)> {
        let count = |v: &Value| v.as_u64().is_some_and(|n| n > 0);
        for (scope, fields) in self.scopes() {
            for key in SIZE_FIELDS {
                let valid = match fields.get(*key) {
                    None | Some(Value::Null) => true,
                    Some(Value::Array(items)) if *key == "intermediate_size" => {
                        items.iter().all(count)
                    }
                    Some(value) => count(value),
                };
                if !valid {
                    return Some((
                        format!("{scope}{key}"),
                        format!("`{key}` must be a positive integer, got {}", fields[*key]),
                    ));
                }
            }
        }
        None
    }

    /// The top-level fields and a `text_config`'s, each with the prefix its
    /// keys are named with in messages.
    fn scopes(&self) -> impl Iterator<Item = (&'static str, &Map<String, Value>)> {
        std::iter::once(("", &self.fields)).chain(
            self.fields
                .get("text_config")
                .and_then(Value::as_object)
                .map(|text| ("text_config.", text)),
        )
    }

    /// The first field (here or in a `text_config`) a loader rejects or
    /// computes NaN from: an epsilon or RoPE base that is not a positive
    /// number (`-1e-5`, `"1e-5"`), a rotary fraction outside (0, 1], a
    /// `rope_scaling`/`rope_parameters` that is not an object, names no
    /// known type, lacks what its type needs or holds a non-positive
    /// factor; a `text_config` that is not an object. Its key, and what is wrong.
    pub fn invalid_value(&self) -> Option<(String, String)> {
        if let Some(text) = self.fields.get("text_config") {
            if !text.is_object() && !text.is_null() {
                return Some((
                    "text_config".into(),
                    format!("`text_config` must be an object, got {text}"),
                ));
            }
        }
        for (scope, fields) in self.scopes() {
            for key in POSITIVE_NUMBER_FIELDS {
                if let Some(value) = fields.get(*key).filter(|v| !v.is_null()) {
                    if !positive(value) {
                        return Some((
                            format!("{scope}{key}"),
                            format!("`{scope}{key}` must be a positive number, got {value}"),
                        ));
                    }
                }
            }
            for key in FRACTION_FIELDS {
                if let Some(value) = fields.get(*key).filter(|v| !v.is_null()) {
                    if !fraction(value) {
                        return Some((
                            format!("{scope}{key}"),
                            format!("`{scope}{key}` must be a number in (0, 1], got {value}"),
                        ));
                    }
                }
            }
            for key in ROPE_FIELDS {
                let Some(value) = fields.get(*key).filter(|v| !v.is_null()) else {
                    continue;
                };
                let name = format!("{scope}{key}");
                if let Some(problem) = rope_problem(value) {
                    return Some((name.clone(), format!("`{name}` {problem}")));
                }
            }
        }
        None
    }

    /// The key this config keeps its layer count under: the family's own
    /// spelling where it has one (`n_layer` for GPT-2), else `num_hidden_layers`.
    pub fn layer_count_key(&self) -> &str {
        if let Some(family) = crate::family::of(self) {
            return &family.layer_count_key;
        }
        LAYER_COUNT_FIELDS
            .iter()
            .find(|key| self.fields.contains_key(**key))
            .copied()
            .unwrap_or(LAYER_COUNT_FIELDS[0])
    }

    /// The layer count, under whichever key the family uses.
    pub fn layer_count(&self) -> Option<usize> {
        self.usize(self.layer_count_key())
    }

    /// Sets the layer count under the family's own key (never adding a
    /// second spelling next to it).
    pub fn set_layer_count(&mut self, layers: usize) {
        let key = self.layer_count_key().to_owned();
        self.set(&key, layers.into());
    }

    pub fn from_json(fields: Map<String, Value>) -> Self {
        Self { fields }
    }

    pub fn fields(&self) -> &Map<String, Value> {
        &self.fields
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.fields.get(key)
    }

    pub fn set(&mut self, key: &str, value: Value) {
        self.fields.insert(key.to_owned(), value);
    }

    pub fn usize(&self, key: &str) -> Option<usize> {
        self.fields.get(key)?.as_u64().map(|v| v as usize)
    }

    /// `architectures[0]`, e.g. `LlamaForCausalLM`.
    pub fn architecture(&self) -> Option<&str> {
        self.fields.get("architectures")?.get(0)?.as_str()
    }

    pub fn model_type(&self) -> Option<&str> {
        self.fields.get("model_type")?.as_str()
    }

    /// Whether the output head shares the input embedding. When the key is
    /// absent this follows transformers' default for the family (its
    /// description), else transformers' general default, true.
    pub fn tie_word_embeddings(&self) -> bool {
        match self
            .fields
            .get("tie_word_embeddings")
            .and_then(Value::as_bool)
        {
            Some(tied) => tied,
            None => crate::family::of(self).is_none_or(|f| f.tie_word_embeddings),
        }
    }

    /// The stored dtype name (`torch_dtype`, or `dtype` as transformers 5 writes).
    pub fn dtype(&self) -> Option<&str> {
        self.fields
            .get("torch_dtype")
            .or_else(|| self.fields.get("dtype"))?
            .as_str()
    }

    /// Records the dtype the weights are saved in, under both spellings
    /// transformers reads.
    pub fn set_dtype(&mut self, dtype: Dtype) {
        let name = Value::String(dtype_name(dtype));
        if self.fields.contains_key("dtype") {
            self.set("dtype", name.clone());
        }
        self.set("torch_dtype", name);
    }

    pub fn to_json_pretty(&self) -> String {
        let mut text = serde_json::to_string_pretty(&self.fields).expect("a JSON map serialises");
        text.push('\n');
        text
    }
}

fn positive(value: &Value) -> bool {
    value.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)
}

fn fraction(value: &Value) -> bool {
    value.as_f64().is_some_and(|x| x > 0.0 && x <= 1.0)
}

/// What is wrong with a `rope_scaling` or `rope_parameters` value, if
/// anything: an object, flat or (`rope_parameters`) one entry per layer type.
fn rope_problem(value: &Value) -> Option<String> {
    let Value::Object(entry) = value else {
        return Some(format!("must be an object, got {value}"));
    };
    if entry.values().any(Value::is_object) {
        // Nested by layer type: `{"full_attention": {...}, "sliding_attention": {...}}`.
        return entry.iter().find_map(|(layer_type, nested)| match nested {
            Value::Object(_) => {
                rope_entry_problem(nested).map(|problem| format!("`{layer_type}`: {problem}"))
            }
            other => Some(format!(
                "mixes per-layer-type entries with `{layer_type}`: {other}"
            )),
        });
    }
    rope_entry_problem(value)
}

fn rope_entry_problem(value: &Value) -> Option<String> {
    let entry = value.as_object()?;
    let kind =
        match entry.get("rope_type").or_else(|| entry.get("type")) {
            None | Some(Value::Null) if entry.contains_key("factor") => return Some(
                "has a `factor` but names no `rope_type` (transformers would ignore it, or fail)"
                    .into(),
            ),
            None | Some(Value::Null) => "default",
            Some(Value::String(kind)) if ROPE_TYPES.contains(&kind.as_str()) => kind,
            Some(other) => {
                return Some(format!(
                    "names RoPE type {other}, which transformers does not build (one of {})",
                    ROPE_TYPES.join(", ")
                ))
            }
        };
    let required = ROPE_REQUIRED
        .iter()
        .find(|(k, _)| *k == kind)
        .map_or(&[][..], |(_, keys)| *keys);
    if let Some(key) = required.iter().find(|k| !entry.contains_key(**k)) {
        return Some(format!("of type `{kind}` needs `{key}`"));
    }
    for key in ROPE_POSITIVE {
        if let Some(v) = entry.get(*key).filter(|v| !v.is_null()) {
            if !positive(v) {
                return Some(format!("`{key}` must be a positive number, got {v}"));
            }
        }
    }
    if let Some(v) = entry.get("partial_rotary_factor").filter(|v| !v.is_null()) {
        if !fraction(v) {
            return Some(format!(
                "`partial_rotary_factor` must be a number in (0, 1], got {v}"
            ));
        }
    }
    for key in ["short_factor", "long_factor"] {
        match entry.get(key) {
            None => {}
            Some(Value::Array(items)) if !items.is_empty() && items.iter().all(positive) => {}
            Some(v) => {
                return Some(format!(
                    "`{key}` must be a list of positive numbers, got {v}"
                ))
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn config(value: Value) -> ModelConfig {
        ModelConfig::from_json(value.as_object().unwrap().clone())
    }

    #[test]
    fn tie_defaults_follow_the_model_family() {
        assert!(!config(json!({"model_type": "llama"})).tie_word_embeddings());
        assert!(config(json!({"model_type": "gemma"})).tie_word_embeddings());
        // transformers defaults these off; the general default (on) was wrong.
        assert!(!config(json!({"model_type": "gpt_neox"})).tie_word_embeddings());
        assert!(!config(json!({"model_type": "olmo2"})).tie_word_embeddings());
        assert!(config(json!({"model_type": "unknown-family"})).tie_word_embeddings());
        assert!(
            config(json!({"model_type": "llama", "tie_word_embeddings": true}))
                .tie_word_embeddings()
        );
    }

    #[test]
    fn the_layer_count_keeps_the_familys_own_key() {
        let mut gpt2 = config(json!({"model_type": "gpt2", "n_layer": 4}));
        assert_eq!(
            (gpt2.layer_count_key(), gpt2.layer_count()),
            ("n_layer", Some(4))
        );
        gpt2.set_layer_count(6);
        assert_eq!(gpt2.get("n_layer"), Some(&json!(6)));
        assert_eq!(gpt2.get("num_hidden_layers"), None);
        let mut llama = config(json!({"model_type": "llama"}));
        llama.set_layer_count(2);
        assert_eq!(llama.get("num_hidden_layers"), Some(&json!(2)));
    }

    #[test]
    fn set_dtype_keeps_key_order_and_updates_both_spellings() {
        let mut c = config(json!({"a": 1, "dtype": "float32", "torch_dtype": "float32", "z": 2}));
        c.set_dtype(Dtype::BF16);
        assert_eq!(c.dtype(), Some("bfloat16"));
        assert_eq!(c.get("dtype").unwrap(), "bfloat16");
        let keys: Vec<_> = c.fields().keys().cloned().collect();
        assert_eq!(keys, ["a", "dtype", "torch_dtype", "z"]);
    }
}
