//! `adapter_config.json`: the keys amalgam reads, checked as peft's loader
//! would check them (and where peft would compute non-finite weights
//! without a word, refused). A pure function over the file's bytes.

use serde_json::{Map, Value};

use super::CONFIG;

/// The parts of a PEFT LoRA adapter's config that decide its update.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    /// `r`: the rank of every module `rank_pattern` does not name (≥ 1).
    pub rank: u64,
    /// `lora_alpha`, finite and within F32's range.
    pub alpha: f64,
    /// `use_rslora`: the scale is `alpha / √r` instead of `alpha / r`.
    pub rslora: bool,
    /// `fan_in_fan_out`: the layer stores its weight transposed.
    pub fan_in_fan_out: bool,
    /// `rank_pattern`: module name (or its trailing components) → rank, in file order.
    pub rank_pattern: Vec<(String, u64)>,
    /// `alpha_pattern`: module name (or its trailing components) → alpha, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
}

/// Why an `adapter_config.json` cannot be applied.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ConfigError {
    #[error("{CONFIG} is not a JSON object: {0}")]
    NotAnObject(String),
    /// A key whose value amalgam refuses; the message says why.
    #[error("{CONFIG}: `{key}` {message}")]
    Key { key: String, message: String },
}

impl AdapterConfig {
    /// Parses and checks the bytes of an `adapter_config.json`.
    pub fn parse(bytes: &[u8]) -> Result<Self, ConfigError> {
        let config: Map<String, Value> =
            serde_json::from_slice(bytes).map_err(|e| ConfigError::NotAnObject(e.to_string()))?;
        let fail = |key: &str, message: String| ConfigError::Key {
            key: key.to_owned(),
            message,
        };
        match config.get("peft_type") {
            Some(Value::String(t)) if t == "LORA" => {}
            Some(Value::String(t)) => {
                return Err(fail(
                    "peft_type",
                    format!("is {t:?}: a {t} adapter; amalgam applies LoRA adapters"),
                ))
            }
            Some(other) => {
                return Err(fail(
                    "peft_type",
                    format!("is {other}, not \"LORA\"; amalgam applies LoRA adapters"),
                ))
            }
            None => {
                return Err(fail(
                    "peft_type",
                    "is missing (an untyped adapter); amalgam applies LoRA adapters".into(),
                ))
            }
        }
        let flag = |key: &str| match config.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(fail(key, format!("is {other}, not true or false"))),
        };
        for (key, what) in [("use_dora", "DoRA"), ("use_qalora", "QA-LoRA")] {
            if flag(key)? {
                return Err(fail(
                    key,
                    format!("is true: {what}, which amalgam does not apply"),
                ));
            }
        }
        for key in ["trainable_token_indices", "layer_replication"] {
            if config.get(key).is_some_and(|v| !v.is_null()) {
                return Err(fail(key, "is set; amalgam does not apply it".into()));
            }
        }
        let rank = match config.get("r") {
            None => return Err(fail("r", "is missing (the LoRA rank)".into())),
            Some(v) => rank(v).map_err(|m| fail("r", m))?,
        };
        let alpha = match config.get("lora_alpha") {
            None => return Err(fail("lora_alpha", "is missing".into())),
            Some(v) => alpha(v).map_err(|m| fail("lora_alpha", m))?,
        };
        let rank_pattern = pattern::<u64>(&config, "rank_pattern").map_err(|(k, m)| fail(&k, m))?;
        let alpha_pattern =
            pattern::<f64>(&config, "alpha_pattern").map_err(|(k, m)| fail(&k, m))?;
        Ok(Self {
            rank,
            alpha,
            rslora: flag("use_rslora")?,
            fan_in_fan_out: flag("fan_in_fan_out")?,
            rank_pattern,
            alpha_pattern,
        })
    }

    /// The rank `module` (a module name, `model.layers.0.self_attn.q_proj`) has.
    pub fn rank_of(&self, module: &str) -> u64 {
        matching(&self.rank_pattern, module).unwrap_or(self.rank)
    }

    /// The scale of `module`'s update: `alpha / r`, or `alpha / √r` for rsLoRA
    /// (finite: `r` ≥ 1 and `alpha` within F32's range).
    pub fn scale_of(&self, module: &str) -> f64 {
        let alpha = matching(&self.alpha_pattern, module).unwrap_or(self.alpha);
        let rank = self.rank_of(module) as f64;
        if self.rslora {
            alpha / rank.sqrt()
        } else {
            alpha / rank
        }
    }
}

/// A pattern's value for `module`: the first (in file order, as peft takes
/// it) whose key is the module's name or its trailing components.
fn matching<T: Copy>(pattern: &[(String, T)], module: &str) -> Option<T> {
    pattern
        .iter()
        .find(|(p, _)| module == p || module.ends_with(&format!(".{p}")))
        .map(|(_, v)| *v)
}

/// A rank: a positive integer (peft refuses `r <= 0`; rank 0 divides by zero).
fn rank(value: &Value) -> Result<u64, String> {
    match value.as_u64() {
        Some(0) => Err("is 0; a LoRA rank is a positive integer".into()),
        Some(r) => Ok(r),
        None => Err(format!("is {value}; a LoRA rank is a positive integer")),
    }
}

/// An alpha: a number the scale `alpha / r`, applied in F32, can hold.
fn alpha(value: &Value) -> Result<f64, String> {
    let Some(a) = value.as_f64() else {
        return Err(format!("is {value}, not a number"));
    };
    if !a.is_finite() || a.abs() > f64::from(f32::MAX) {
        return Err(format!(
            "is {value}, beyond F32's range (the scale it makes is applied in F32, and every \
             adapted weight would be infinite or NaN)"
        ));
    }
    Ok(a)
}

/// `rank_pattern` or `alpha_pattern` (absent or null: empty), each value
/// checked as `r` or `lora_alpha` is; an error is (the key, why).
fn pattern<T: PatternValue>(
    config: &Map<String, Value>,
    key: &str,
) -> Result<Vec<(String, T)>, (String, String)> {
    let entries = match config.get(key) {
        None | Some(Value::Null) => return Ok(vec![]),
        Some(Value::Object(m)) => m,
        Some(other) => {
            return Err((
                key.to_owned(),
                format!("is {other}, not an object of module names"),
            ))
        }
    };
    entries
        .iter()
        .map(|(module, value)| {
            let at = format!("{key}.{module}");
            if module.is_empty() || module.chars().any(|c| "*+?[](){}|^$\\".contains(c)) {
                return Err((
                    at,
                    "is a regular expression (or empty); amalgam matches module names".into(),
                ));
            }
            let value = T::check(value).map_err(|m| (at, m))?;
            Ok((module.clone(), value))
        })
        .collect()
}

/// The value of a pattern entry, checked as its key's global value is.
trait PatternValue: Sized {
    fn check(value: &Value) -> Result<Self, String>;
}

impl PatternValue for u64 {
    fn check(value: &Value) -> Result<Self, String> {
        rank(value)
    }
}

impl PatternValue for f64 {
    fn check(value: &Value) -> Result<Self, String> {
        alpha(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(edit: impl FnOnce(&mut Value)) -> Result<AdapterConfig, ConfigError> {
        let mut config = json!({
            "peft_type": "LORA", "r": 4, "lora_alpha": 8, "use_rslora": false,
            "fan_in_fan_out": false, "rank_pattern": {}, "alpha_pattern": {},
            "use_dora": false, "layer_replication": null,
        });
        edit(&mut config);
        AdapterConfig::parse(&serde_json::to_vec(&config).unwrap())
    }

    /// The error's key and message, for a config that must be refused.
    fn refused(edit: impl FnOnce(&mut Value)) -> (String, String) {
        match parse(edit) {
            Err(ConfigError::Key { key, message }) => (key, message),
            other => panic!("not refused by a key: {other:?}"),
        }
    }

    #[test]
    fn a_peft_config_parses_with_its_scales() {
        let config = parse(|c| {
            c["rank_pattern"] = json!({"model.layers.1.mlp.down_proj": 2});
            c["alpha_pattern"] = json!({"down_proj": 3});
        })
        .unwrap();
        assert_eq!(config.rank_of("model.layers.0.mlp.down_proj"), 4);
        assert_eq!(config.rank_of("model.layers.1.mlp.down_proj"), 2);
        assert_eq!(config.scale_of("model.layers.0.self_attn.q_proj"), 2.0);
        assert_eq!(config.scale_of("model.layers.0.mlp.down_proj"), 0.75);
        assert_eq!(config.scale_of("model.layers.1.mlp.down_proj"), 1.5);
        // A pattern matches whole components only.
        assert_eq!(config.scale_of("model.layers.0.mlp.xdown_proj"), 2.0);
        let rs = parse(|c| c["use_rslora"] = json!(true)).unwrap();
        assert_eq!(rs.scale_of("q_proj"), 4.0);
    }

    /// Rank 0 (plain or rsLoRA, globally or in `rank_pattern`) divides by
    /// zero: every adapted weight would be inf or NaN.
    #[test]
    fn rank_zero_and_non_integer_ranks_are_refused() {
        let (key, message) = refused(|c| c["r"] = json!(0));
        assert_eq!(key, "r");
        assert!(message.contains("positive integer"), "{message}");
        let (key, _) = refused(|c| {
            c["r"] = json!(0);
            c["use_rslora"] = json!(true)
        });
        assert_eq!(key, "r");
        for bad in [json!(-4), json!(2.5), json!("4"), json!(null)] {
            assert_eq!(refused(|c| c["r"] = bad.clone()).0, "r", "{bad}");
        }
        assert_eq!(
            refused(|c| c["rank_pattern"] = json!({"q_proj": 0})).0,
            "rank_pattern.q_proj"
        );
        assert_eq!(
            refused(|c| c.as_object_mut().unwrap().remove("r").map(drop).unwrap()).0,
            "r"
        );
    }

    /// An alpha beyond F32's range makes an infinite scale in F32.
    #[test]
    fn alphas_a_scale_cannot_hold_are_refused() {
        let (key, message) = refused(|c| c["lora_alpha"] = json!(1e300));
        assert_eq!(key, "lora_alpha");
        assert!(message.contains("F32"), "{message}");
        assert_eq!(refused(|c| c["lora_alpha"] = json!(-1e39)).0, "lora_alpha");
        assert_eq!(refused(|c| c["lora_alpha"] = json!("8")).0, "lora_alpha");
        assert_eq!(
            refused(|c| c["alpha_pattern"] = json!({"v_proj": 1e300})).0,
            "alpha_pattern.v_proj"
        );
        assert_eq!(
            refused(|c| c["alpha_pattern"] = json!({"v_proj": "x"})).0,
            "alpha_pattern.v_proj"
        );
        // Large but in range: the output's own check judges the weights.
        assert_eq!(
            parse(|c| c["lora_alpha"] = json!(1e38)).unwrap().alpha,
            1e38
        );
        // Negative and zero alphas are peft's too.
        assert_eq!(
            parse(|c| c["lora_alpha"] = json!(-2))
                .unwrap()
                .scale_of("x"),
            -0.5
        );
    }

    #[test]
    fn what_amalgam_does_not_apply_is_refused_by_key() {
        assert_eq!(refused(|c| c["peft_type"] = json!("IA3")).0, "peft_type");
        assert_eq!(refused(|c| c["peft_type"] = json!(3)).0, "peft_type");
        assert_eq!(
            refused(|c| c
                .as_object_mut()
                .unwrap()
                .remove("peft_type")
                .map(drop)
                .unwrap())
            .0,
            "peft_type"
        );
        assert_eq!(refused(|c| c["use_dora"] = json!(true)).0, "use_dora");
        assert_eq!(refused(|c| c["use_rslora"] = json!("yes")).0, "use_rslora");
        assert_eq!(
            refused(|c| c["layer_replication"] = json!([[0, 1]])).0,
            "layer_replication"
        );
        assert_eq!(
            refused(|c| c["alpha_pattern"] = json!([1])).0,
            "alpha_pattern"
        );
        assert_eq!(
            refused(|c| c["rank_pattern"] = json!({"layers.*.q_proj": 2})).0,
            "rank_pattern.layers.*.q_proj"
        );
        for bytes in [&b""[..], b"[]", b"{", b"null", b"\xff"] {
            assert!(matches!(
                AdapterConfig::parse(bytes),
                Err(ConfigError::NotAnObject(_))
            ));
        }
    }
}
