//! What differs between model families, as data: one description per
//! family in `crates/checkpoint/families/MODEL_TYPE.json`, found by
//! `config.json`'s `model_type`. Adding a family is adding a file (and its
//! test): the build script compiles every file in `families/` in; nothing
//! else names a family.
//!
//! A description says which tensors come before the repeated layers (the
//! embedding side) and after them (final norm, head), which are indexed by
//! the vocabulary, whether the head is tied to the embedding when the config
//! does not say, the config key of the layer count, and (`shapes`) which
//! config keys size its attention and where those tensors are, so that the
//! output check can compare the two. A mixture of experts also describes
//! its experts (`moe`, [`crate::moe`]). Checkpoints of a family without a
//! description are read by the Llama description ([`llama`]), its names
//! matched whatever their prefix (see [`placement`]).
//!
//! `families/model_types.txt` lists every `model_type` transformers knows:
//! an output must name one of them (or a described family).

use std::borrow::Cow;
use std::collections::HashSet;
use std::sync::OnceLock;

use serde::Deserialize;

use crate::arch::{layer_index, locate};
use crate::decoder::{DecoderLayout, Flag, MlpInput, Projections, QkNorm};
use crate::moe::MoeLayout;
use crate::ModelConfig;

/// One family's description (see the module documentation).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Family {
    pub model_type: String,
    /// The transformers classes its checkpoints name (informative).
    pub architectures: Vec<String>,
    /// transformers' default for `tie_word_embeddings` in this family.
    pub tie_word_embeddings: bool,
    /// Tensors before the layers: embeddings (and their norm, positions).
    pub pre_layer: Vec<String>,
    /// Tensors after the layers: final norm, head, pooler.
    pub post_layer: Vec<String>,
    /// Tensors with one row per vocabulary entry.
    pub vocabulary: Vec<String>,
    /// The config key holding the layer count, where it is not `num_hidden_layers`.
    #[serde(default = "num_hidden_layers")]
    pub layer_count_key: String,
    /// How its decoder-only forward pass is built, for the families
    /// `amalgam-nn` runs.
    #[serde(default)]
    pub decoder: Option<DecoderLayout>,
    /// Where a mixture of experts keeps its experts and router.
    #[serde(default)]
    pub moe: Option<MoeLayout>,
    /// The `config.json` key holding the text model's config when the
    /// checkpoint is a larger (multimodal) model's (Gemma 3n: `text_config`);
    /// `None`: the text model's sizes are at the top level.
    #[serde(default)]
    pub text_config: Option<String>,
    /// Global tensors holding one block of inputs per layer (Gemma 3n's
    /// per-layer embeddings): dropping or keeping a layer drops or keeps its block.
    #[serde(default)]
    pub per_layer_inputs: Option<PerLayerInputs>,
    /// The config key counting the last layers that reuse an earlier
    /// layer's keys and values instead of computing their own (Gemma 3n).
    #[serde(default)]
    pub kv_shared_layers_key: Option<String>,
    /// Name endings of tensors some checkpoints store that are no
    /// parameters but recomputed at load (older transformers saved RoPE's
    /// inverse frequencies): read past, never required of an output.
    #[serde(default = "recomputed_buffers")]
    pub buffers: Vec<String>,
    /// What the output check compares between `config.json` and the tensors.
    pub shapes: Shapes,
    /// The tokenizer class transformers' `AutoTokenizer` maps this model
    /// type to (none: it maps it to none, as for Llama).
    #[serde(default)]
    pub tokenizer: Option<TokenizerChoice>,
}

/// How transformers picks a model type's tokenizer class, beside the one a
/// checkpoint's `tokenizer_config.json` names.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TokenizerChoice {
    /// The class the model type maps to; a generic one
    /// (`TokenizersBackend`) means the file's own pipeline, whatever class
    /// `tokenizer_config.json` names.
    pub class: String,
    /// Whether the model type's class replaces the one
    /// `tokenizer_config.json` names (transformers distrusts the published
    /// class for these model types).
    #[serde(default)]
    pub overrides_config: bool,
}

/// Global tensors packing one block per layer, layer-major along an axis.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerLayerInputs {
    /// The (text) config key of one block's width.
    pub width_key: String,
    pub tensors: Vec<PerLayerTensor>,
}

/// One tensor of [`PerLayerInputs`]: its stored name and the axis of its blocks.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PerLayerTensor {
    pub name: String,
    pub axis: usize,
}

/// A block's MLP tensors, for families without a `decoder` section (names
/// relative to the layer prefix, without suffix).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MlpTensors {
    pub input: MlpInput,
    pub output: String,
}

/// How a family's `config.json` sizes its attention, and where the output
/// check finds the tensors those sizes describe.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shapes {
    /// The config key of the model width (GPT-2: `n_embd`).
    #[serde(default = "hidden_size")]
    pub hidden: String,
    /// The config key of the number of query heads (GPT-2: `n_head`).
    #[serde(default = "num_attention_heads")]
    pub heads: String,
    /// Key/value heads: the config key and transformers' value when it is
    /// absent (no default: as many as query heads). `None`: the family has
    /// no such key (transformers ignores one): as many as query heads.
    #[serde(default)]
    pub kv_heads: Option<SizeKey>,
    /// The head size: the config key and transformers' value when it is
    /// absent (no default: hidden / heads). `None`: the family always
    /// derives it as hidden / heads (transformers ignores a `head_dim` key).
    #[serde(default)]
    pub head_dim: Option<SizeKey>,
    /// The attention tensors, for families without a `decoder` section
    /// (which says where they are).
    #[serde(default)]
    pub attention: Option<AttentionTensors>,
    /// The MLP tensors, for families without a `decoder` section.
    #[serde(default)]
    pub mlp: Option<MlpTensors>,
}

/// A size's config key and the value transformers uses when it is absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SizeKey {
    pub key: String,
    #[serde(default)]
    pub default: Option<usize>,
}

/// A block's attention tensors as the output check reads them (names
/// relative to `layers`, without `.weight`/`.bias`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttentionTensors {
    /// The block prefix, e.g. `transformer.h.{i}`.
    pub layers: String,
    pub qkv: Projections,
    /// Weights stored `[in, out]` (GPT-2's Conv1D) rather than `[out, in]`.
    #[serde(default)]
    pub transposed: bool,
    pub output: String,
    #[serde(default)]
    pub qkv_bias: Flag,
    #[serde(default)]
    pub output_bias: Flag,
    #[serde(default)]
    pub qk_norm: Option<QkNorm>,
}

impl AttentionTensors {
    /// The stored name of `part` of block `layer` (`part` relative, no suffix).
    pub fn layer_tensor(&self, layer: usize, part: &str) -> String {
        format!("{}.{part}", self.layers.replace("{i}", &layer.to_string()))
    }
}

impl Family {
    /// The layer prefix template (`model.layers.{i}`).
    pub fn layers(&self) -> Option<&str> {
        match (&self.decoder, &self.shapes.attention) {
            (Some(decoder), _) => Some(&decoder.layers),
            (None, Some(attention)) => Some(&attention.layers),
            (None, None) => None,
        }
    }

    /// The stored name of `part` (relative, no suffix) of block `layer`.
    pub fn layer_tensor(&self, layer: usize, part: &str) -> Option<String> {
        let layers = self.layers()?;
        Some(format!(
            "{}.{part}",
            layers.replace("{i}", &layer.to_string())
        ))
    }

    /// The layers' MLP tensors: from the decoder description, else from `shapes`.
    pub fn mlp_tensors(&self) -> Option<MlpTensors> {
        match &self.decoder {
            Some(decoder) => Some(MlpTensors {
                input: decoder.mlp.input.clone(),
                output: decoder.mlp.output.clone(),
            }),
            None => self.shapes.mlp.clone(),
        }
    }

    /// The attention tensors the output check compares with the config:
    /// from `shapes`, else from the decoder description.
    pub fn attention_tensors(&self) -> Option<AttentionTensors> {
        if let Some(attention) = &self.shapes.attention {
            return Some(attention.clone());
        }
        let decoder = self.decoder.as_ref()?;
        Some(AttentionTensors {
            layers: decoder.layers.clone(),
            qkv: decoder.attention.qkv.clone(),
            transposed: false,
            output: decoder.attention.output.clone(),
            qkv_bias: decoder.attention.qkv_bias.clone(),
            output_bias: decoder.attention.output_bias.clone(),
            qk_norm: decoder.attention.qk_norm.clone(),
        })
    }
}

fn recomputed_buffers() -> Vec<String> {
    vec!["rotary_emb.inv_freq".into()]
}

fn num_hidden_layers() -> String {
    "num_hidden_layers".into()
}

fn hidden_size() -> String {
    "hidden_size".into()
}

fn num_attention_heads() -> String {
    "num_attention_heads".into()
}

/// Whether transformers knows `model_type` (or amalgam describes it).
pub fn known_model_type(model_type: &str) -> bool {
    static KNOWN: OnceLock<HashSet<&'static str>> = OnceLock::new();
    let known = KNOWN.get_or_init(|| {
        include_str!("../families/model_types.txt")
            .lines()
            .map(str::trim)
            .filter(|line| !line.is_empty() && !line.starts_with('#'))
            .collect()
    });
    known.contains(model_type) || by_model_type(model_type).is_some()
}

/// Every description, parsed once.
pub fn families() -> &'static [Family] {
    static FAMILIES: OnceLock<Vec<Family>> = OnceLock::new();
    FAMILIES.get_or_init(|| {
        // `(model_type, text)` for every `families/*.json`, from build.rs.
        let files: &[(&str, &str)] = include!(concat!(env!("OUT_DIR"), "/families.rs"));
        files
            .iter()
            .map(|(name, text)| {
                let family: Family = serde_json::from_str(text)
                    .unwrap_or_else(|e| panic!("families/{name}.json: {e}"));
                assert_eq!(family.model_type, *name, "families/{name}.json");
                family
            })
            .collect()
    })
}

/// The description of a config's family, if there is one.
pub fn of(config: &ModelConfig) -> Option<&'static Family> {
    by_model_type(config.model_type()?)
}

/// The description of the family `model_type`, if there is one.
pub fn by_model_type(model_type: &str) -> Option<&'static Family> {
    families().iter().find(|f| f.model_type == model_type)
}

/// The Llama description: how checkpoints of families without one of
/// their own are read.
pub fn llama() -> &'static Family {
    by_model_type("llama").expect("families/llama.json is compiled in")
}

/// The Llama decoder's description.
pub fn llama_decoder() -> &'static DecoderLayout {
    llama()
        .decoder
        .as_ref()
        .expect("families/llama.json describes its decoder")
}

/// The description `name` is read by, and the name it is read as: a
/// described family's own, as it is; for a family without a description,
/// the Llama description, whatever the name's prefix — a layer tensor as
/// Llama's of the same layer and part (`language_model.model.layers.3.mlp.
/// down_proj.weight` is Llama's `model.layers.3.mlp.down_proj.weight`),
/// any other as Llama's tensor of the same module (`….embed_tokens.weight`
/// is its embedding, `….norm.weight` its final norm).
fn reading<'a>(family: Option<&'a Family>, name: &'a str) -> (&'a Family, Cow<'a, str>) {
    if let Some(family) = family {
        return (family, Cow::Borrowed(name));
    }
    let llama = llama();
    if let Some((layer, digits)) = locate(name) {
        let part = &name[digits.end..];
        let layers = llama.layers().expect("Llama has layers");
        return (
            llama,
            Cow::Owned(format!(
                "{}{part}",
                layers.replace("{i}", &layer.to_string())
            )),
        );
    }
    let module = |name: &'a str| {
        let stem = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        stem.rsplit('.').next().unwrap_or(stem)
    };
    let described = llama
        .pre_layer
        .iter()
        .chain(&llama.post_layer)
        .find(|n| module(n) == module(name));
    (
        llama,
        described.map_or(Cow::Borrowed(name), |n| Cow::Borrowed(n)),
    )
}

/// Where a tensor outside the repeated layers belongs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    /// Before the layers (embedding side): taken from the first slice of a stack.
    BeforeLayers,
    /// After the layers (final norm, head): taken from the last slice.
    AfterLayers,
}

/// How the merge planner reads one tensor name of a checkpoint: where it
/// sits outside the layers (`None` for layer tensors) and whether its rows
/// follow the vocabulary. From the family's description, else from Llama's
/// (see [`reading`]).
pub fn placement(family: Option<&Family>, name: &str) -> (Option<Place>, bool) {
    if layer_index(name).is_some() {
        return (None, false);
    }
    let (f, name) = reading(family, name);
    let place = if f.pre_layer.iter().any(|n| *n == name) {
        Place::BeforeLayers
    } else {
        Place::AfterLayers
    };
    (Some(place), f.vocabulary.iter().any(|n| *n == name))
}

/// Whether `name` is a recomputed buffer rather than a parameter (see
/// [`Family::buffers`]); Llama's description for families without one.
pub fn is_buffer(family: Option<&Family>, name: &str) -> bool {
    family
        .unwrap_or(llama())
        .buffers
        .iter()
        .any(|b| name.ends_with(b.as_str()))
}

/// Whether `name` is the input embedding (the vocabulary rows before the
/// layers): from the family's description, else from Llama's.
pub fn is_embedding(family: Option<&Family>, name: &str) -> bool {
    let (f, name) = reading(family, name);
    f.pre_layer.iter().any(|n| *n == name) && f.vocabulary.iter().any(|n| *n == name)
}

/// Whether `name` is the output head (the vocabulary rows after the layers).
pub fn is_head(family: Option<&Family>, name: &str) -> bool {
    let (f, name) = reading(family, name);
    f.post_layer.iter().any(|n| *n == name) && f.vocabulary.iter().any(|n| *n == name)
}

/// The name a family's output head is written under (what a tied
/// checkpoint leaves out).
pub fn head_name(family: Option<&Family>) -> String {
    let f = family.unwrap_or(llama());
    match &f.decoder {
        Some(decoder) => format!("{}.weight", decoder.head[0]),
        None => f
            .post_layer
            .iter()
            .find(|n| is_head(Some(f), n))
            .cloned()
            .unwrap_or_else(|| head_name(None)),
    }
}

/// The FFN width of a dense block's MLP from its output projection
/// (`[hidden, width]`); `None` for any other tensor (experts and shared
/// experts have widths of their own), and for families whose description
/// names no MLP.
pub fn mlp_width(family: Option<&Family>, name: &str, shape: &[usize]) -> Option<usize> {
    let (f, name) = reading(family, name);
    let mlp = f.mlp_tensors()?;
    let layer = layer_index(&name)?;
    let output = format!("{}.weight", f.layer_tensor(layer, &mlp.output)?);
    (name == output && shape.len() == 2).then(|| shape[1])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decoder::MlpInput;
    use crate::moe::Projection;

    #[test]
    fn every_description_parses_and_is_consistent() {
        let all = families();
        assert!(all.len() >= 16);
        for f in all {
            assert!(!f.pre_layer.is_empty(), "{}", f.model_type);
            for name in f.pre_layer.iter().chain(&f.post_layer) {
                assert_eq!(layer_index(name), None, "{}: {name}", f.model_type);
            }
            for name in &f.vocabulary {
                assert!(
                    f.pre_layer.contains(name) || f.post_layer.contains(name),
                    "{}: {name}",
                    f.model_type
                );
            }
            // The attention tensors are described once: by the decoder, or
            // in `shapes` for families amalgam does not run.
            assert_ne!(
                f.decoder.is_some(),
                f.shapes.attention.is_some(),
                "{}",
                f.model_type
            );
            assert!(f.attention_tensors().is_some(), "{}", f.model_type);
            assert!(known_model_type(&f.model_type), "{}", f.model_type);
        }
        assert!(known_model_type("t5") && known_model_type("gemma3n"));
        let files = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/families"))
            .unwrap()
            .filter(|e| e.as_ref().unwrap().path().extension().unwrap() == "json")
            .count();
        assert_eq!(all.len(), files, "every file in families/ is compiled in");
        assert!(!known_model_type("nonsense") && !known_model_type(""));
    }

    #[test]
    fn positional_embeddings_sit_before_the_layers() {
        let config = |t: &str| {
            ModelConfig::from_json(
                serde_json::json!({"model_type": t})
                    .as_object()
                    .unwrap()
                    .clone(),
            )
        };
        let gpt2 = config("gpt2");
        let (place, vocab) = placement(of(&gpt2), "transformer.wpe.weight");
        assert_eq!((place, vocab), (Some(Place::BeforeLayers), false));
        let neox = config("gpt_neox");
        let place = placement(of(&neox), "gpt_neox.embed_in.weight");
        assert_eq!(place, (Some(Place::BeforeLayers), true));
        let bert = config("bert");
        let place = placement(of(&bert), "embeddings.LayerNorm.weight").0;
        assert_eq!(place, Some(Place::BeforeLayers));
        assert_eq!(
            placement(of(&bert), "pooler.dense.weight").0,
            Some(Place::AfterLayers)
        );
        assert_eq!(
            placement(None, "model.embed_tokens.weight"),
            (Some(Place::BeforeLayers), true)
        );
        assert_eq!(
            placement(None, "model.layers.3.mlp.up_proj.weight"),
            (None, false)
        );
    }

    /// A family without a description is read by Llama's, whatever the
    /// prefix of its names (a multimodal model's text model, say).
    #[test]
    fn undescribed_families_are_read_as_llama() {
        for (name, placed) in [
            (
                "model.embed_tokens.weight",
                (Some(Place::BeforeLayers), true),
            ),
            (
                "language_model.model.embed_tokens.weight",
                (Some(Place::BeforeLayers), true),
            ),
            ("model.embed_tokens.bias", (Some(Place::BeforeLayers), true)),
            ("lm_head.weight", (Some(Place::AfterLayers), true)),
            ("model.norm.weight", (Some(Place::AfterLayers), false)),
            (
                "vision_tower.patch.weight",
                (Some(Place::AfterLayers), false),
            ),
            ("model.layers.3.mlp.up_proj.weight", (None, false)),
        ] {
            assert_eq!(placement(None, name), placed, "{name}");
        }
        assert!(is_embedding(
            None,
            "model.language_model.embed_tokens.weight"
        ));
        assert!(!is_embedding(None, "model.embed_tokens_per_layer.weight"));
        assert!(is_head(None, "language_model.lm_head.weight"));
        assert!(!is_head(None, "model.embed_tokens.weight"));
        let down = "language_model.model.layers.11.mlp.down_proj.weight";
        assert_eq!(mlp_width(None, down, &[8, 40]), Some(40));
        assert_eq!(
            mlp_width(
                None,
                "model.layers.1.mlp.experts.1.down_proj.weight",
                &[8, 40]
            ),
            None
        );
        assert_eq!(head_name(None), "lm_head.weight");
        assert!(std::ptr::eq(
            llama_decoder(),
            llama().decoder.as_ref().unwrap()
        ));
    }

    /// The mixtures' descriptions: templates with the expert index, and
    /// assemblies whose config sets the keys the layout names, from dense
    /// families amalgam runs.
    #[test]
    fn mixtures_describe_their_experts() {
        let mixtures: Vec<&Family> = families().iter().filter(|f| f.moe.is_some()).collect();
        let types: Vec<&str> = mixtures.iter().map(|f| f.model_type.as_str()).collect();
        assert_eq!(types, ["mixtral", "qwen2_moe", "qwen3_moe"]);
        for f in mixtures {
            let moe = f.moe.as_ref().unwrap();
            let t = &f.model_type;
            assert!(f.layers().is_some(), "{t}");
            for p in [Projection::Gate, Projection::Up, Projection::Down] {
                assert!(moe.experts.get(p).contains("{e}"), "{t}");
                assert_ne!(moe.expert(0, p), moe.expert(1, p), "{t}");
            }
            if let Some(shared) = &moe.shared_expert {
                assert!(!shared.mlp.gate.contains("{e}") && !shared.gate.contains("{e}"));
            }
            let Some(assembly) = &moe.assembly else {
                continue;
            };
            let mut sized = vec![
                (moe.experts_key.as_str(), "{experts}"),
                (moe.experts_per_token_key.as_str(), "{experts_per_token}"),
            ];
            sized.extend(
                moe.expert_width_key
                    .as_deref()
                    .map(|k| (k, "{expert_width}")),
            );
            sized.extend(
                moe.shared_expert
                    .as_ref()
                    .map(|s| (s.width_key.as_str(), "{expert_width}")),
            );
            for (key, size) in &sized {
                assert_eq!(assembly.config[*key], *size, "{t}: {key}");
            }
            for (key, value) in &assembly.config {
                let placeholder = value.as_str().is_some_and(|v| v.starts_with('{'));
                assert_eq!(
                    placeholder,
                    sized.iter().any(|(k, _)| k == key),
                    "{t}: {key}"
                );
            }
            for input in &assembly.inputs {
                let dense = by_model_type(input).and_then(|d| d.decoder.as_ref());
                let gated = dense.is_some_and(|d| matches!(d.mlp.input, MlpInput::Gated(_)));
                assert!(gated, "{t} from {input}: a decoder with a gated MLP");
            }
        }
    }

    #[test]
    fn embeddings_heads_and_mlp_widths_follow_the_description() {
        let of_type = |t: &str| {
            let config = ModelConfig::from_json(
                serde_json::json!({"model_type": t})
                    .as_object()
                    .unwrap()
                    .clone(),
            );
            of(&config)
        };
        let neox = of_type("gpt_neox");
        assert!(is_embedding(neox, "gpt_neox.embed_in.weight"));
        assert!(!is_embedding(None, "gpt_neox.embed_in.weight"));
        assert!(is_head(neox, "embed_out.weight") && is_head(neox, "lm_head.weight"));
        assert_eq!(head_name(neox), "lm_head.weight");
        assert_eq!(head_name(None), "lm_head.weight");
        assert_eq!(head_name(of_type("gpt2")), "lm_head.weight");
        let down = "gpt_neox.layers.2.mlp.dense_4h_to_h.weight";
        assert_eq!(mlp_width(neox, down, &[48, 192]), Some(192));
        assert_eq!(mlp_width(None, down, &[48, 192]), None);
        let phi3 = of_type("phi3");
        assert_eq!(
            mlp_width(phi3, "model.layers.0.mlp.down_proj.weight", &[8, 40]),
            Some(40)
        );
        assert_eq!(
            mlp_width(phi3, "model.layers.0.mlp.gate_up_proj.weight", &[80, 8]),
            None
        );
        // Described without a decoder: the MLP is read as Llama's.
        let stablelm = of_type("stablelm");
        assert_eq!(
            mlp_width(stablelm, "model.layers.1.mlp.down_proj.weight", &[8, 40]),
            Some(40)
        );
    }
}
