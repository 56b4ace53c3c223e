//! A mixture-of-experts family's layout, as data: the `moe` section of its
//! description (`families/mixtral.json`, `qwen2_moe.json`, `qwen3_moe.json`).
//! Names are templates without `.weight`, relative to the family's layer
//! prefix (`model.layers.{i}`); `{e}` is the expert's index.

use serde::Deserialize;
use serde_json::{Map, Value};

/// Where a mixture keeps its experts, router and shared expert, the config
/// keys that count and size them, and how `amalgam moe` assembles one.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MoeLayout {
    /// The config key of the number of experts in a layer (Mixtral:
    /// `num_local_experts`).
    pub experts_key: String,
    /// The config key of the number of experts each token is routed to.
    pub experts_per_token_key: String,
    /// The config key of an expert's FFN width, where it is not
    /// `intermediate_size`.
    #[serde(default)]
    pub expert_width_key: Option<String>,
    /// Expert `{e}`'s projections.
    pub experts: ExpertMlp,
    /// The router: one row per expert.
    pub router: String,
    /// The expert every token goes through, where the family has one.
    #[serde(default)]
    pub shared_expert: Option<SharedExpert>,
    /// How `amalgam moe` builds this family from dense models, where it does.
    #[serde(default)]
    pub assembly: Option<Assembly>,
}

/// One expert's MLP: act(gate) · up, then down.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpertMlp {
    pub gate: String,
    pub up: String,
    pub down: String,
}

/// A shared expert (Qwen2-MoE): its MLP, its gate (one row: how much of it
/// each token takes) and the config key of its width.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SharedExpert {
    pub mlp: ExpertMlp,
    pub gate: String,
    pub width_key: String,
}

/// How `amalgam moe` (mergekit-moe) builds the family from dense models.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Assembly {
    /// The dense families (`model_type`) it is built from.
    pub inputs: Vec<String>,
    /// What the mixture's `config.json` sets over the base's, in this
    /// order (after `model_type` and `architectures`): fixed values, and
    /// the mixture's own sizes where a value is one of [`SIZES`].
    pub config: Map<String, Value>,
}

/// The sizes an assembly's config can name: the number of experts, of
/// experts per token, and an expert's FFN width (the dense models').
pub const SIZES: [&str; 3] = ["{experts}", "{experts_per_token}", "{expert_width}"];

/// An MLP projection of a dense model or of an expert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Projection {
    Gate,
    Up,
    Down,
}

impl ExpertMlp {
    /// The template of `projection`.
    pub fn get(&self, projection: Projection) -> &str {
        match projection {
            Projection::Gate => &self.gate,
            Projection::Up => &self.up,
            Projection::Down => &self.down,
        }
    }
}

impl MoeLayout {
    /// Expert `expert`'s `projection`, relative to the layer.
    pub fn expert(&self, expert: usize, projection: Projection) -> String {
        self.experts
            .get(projection)
            .replace("{e}", &expert.to_string())
    }
}

impl Assembly {
    /// The config entries with the sizes filled in, in order.
    pub fn config(
        &self,
        experts: usize,
        experts_per_token: usize,
        expert_width: usize,
    ) -> Vec<(String, Value)> {
        self.config
            .iter()
            .map(|(key, value)| {
                let size = match value.as_str() {
                    Some("{experts}") => Some(experts),
                    Some("{experts_per_token}") => Some(experts_per_token),
                    Some("{expert_width}") => Some(expert_width),
                    _ => None,
                };
                (key.clone(), size.map_or_else(|| value.clone(), Value::from))
            })
            .collect()
    }
}
