//! `amalgam moe` (mergekit-moe): dense experts assembled into a mixture —
//! Mixtral from Llama or Mistral models, or Qwen2-MoE (one shared expert
//! every token goes through, with its own gate) from Llama, Mistral or Qwen2
//! models. Everything but the MLPs comes from the base (Qwen2-MoE's
//! attention biases are zeros where the base has none); each layer's MLP
//! becomes one expert per input model (the per-expert layout transformers 5
//! loads), and each layer's router row for an expert is a unit vector from
//! the gate mode: the base's hidden state entering that layer at the last
//! token of the expert's prompts (mean over prompts, minus the negative
//! prompts'), the mean token embedding of the prompts (every layer alike), or
//! random.
//!
//! Which tensors and config keys make a mixture is the output family's
//! description's `moe` section (`families/mixtral.json`,
//! `families/qwen2_moe.json`): its experts, router and shared expert, and
//! how it is assembled (the dense families it takes, the config it sets);
//! where a dense model keeps its MLP and embedding is the input family's.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::arch::layer_index;
use amalgam_checkpoint::decoder::{DecoderLayout, MlpInput, Projections};
use amalgam_checkpoint::family::{self, Family};
use amalgam_checkpoint::moe::{Assembly, MoeLayout, Projection};
use amalgam_checkpoint::{
    kind_from_dtype, parse_dtype, CheckpointWriter, Dtype, Finish, InputRecord, ModelCard,
    ModelConfig, TensorSpec, WriteOptions, TOKENIZER_CONFIG,
};
use amalgam_nn::text::TextTokenizer;
use amalgam_nn::Decoder;
use amalgam_recipe::{Expert, GateMode, Location, ModelRef, MoeRecipe};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::Value;
use tch::{Device, Kind, Tensor};

use crate::source::Source;
use crate::{MergeError, Progress, Result};

/// The most tokens of one prompt `gate_mode: hidden` runs through the base.
/// A forward pass costs time quadratic in its length (attention), and a
/// multi-megabyte prompt ran for minutes in gigabytes; routing prompts are a
/// line to a paragraph. Longer ones are refused at their line. (The config
/// also bounds each prompt's text and each expert's prompt count: see
/// [`amalgam_recipe::MAX_PROMPT_BYTES`] and [`amalgam_recipe::MAX_PROMPTS`].)
pub const MAX_HIDDEN_PROMPT_TOKENS: usize = 4096;

/// A dense MLP's projections, in the order each layer's experts are
/// written (mergekit's: Mixtral's w1, w2, w3).
const PROJECTIONS: [Projection; 3] = [Projection::Gate, Projection::Down, Projection::Up];

/// The mixture written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Output {
    Mixtral,
    Qwen2Moe,
}

impl Output {
    /// The family description it follows.
    fn family(self) -> &'static Family {
        let model_type = match self {
            Self::Mixtral => "mixtral",
            Self::Qwen2Moe => "qwen2_moe",
        };
        family::by_model_type(model_type).expect("a compiled-in description")
    }
}

/// The descriptions a mixture is built by: its own family's, its `moe`
/// section and assembly, and the dense input family's decoder.
struct Layouts {
    output: &'static Family,
    moe: &'static MoeLayout,
    assembly: &'static Assembly,
    dense: &'static DecoderLayout,
}

impl Layouts {
    /// `part` (relative, no suffix) of the mixture's block `layer`, weight.
    fn output(&self, layer: usize, part: &str) -> String {
        let name = self.output.layer_tensor(layer, part);
        format!("{}.weight", name.expect("a mixture has layers"))
    }

    /// A dense model's `projection` in `layer`.
    fn dense(&self, layer: usize, projection: Projection) -> String {
        let MlpInput::Gated([gate, up]) = &self.dense.mlp.input else {
            unreachable!("checked by Moe::open")
        };
        let part = match projection {
            Projection::Gate => gate,
            Projection::Up => up,
            Projection::Down => &self.dense.mlp.output,
        };
        format!("{}.weight", self.dense.layer_tensor(layer, part))
    }

    /// Whether `name` is a dense model's MLP tensor (weight or bias), which
    /// the experts replace.
    fn is_dense_mlp(&self, name: &str) -> bool {
        let Some(layer) = layer_index(name) else {
            return false;
        };
        PROJECTIONS.iter().any(|&p| {
            let weight = self.dense(layer, p);
            let stem = weight.strip_suffix(".weight").expect("a weight");
            name == weight || name.strip_suffix(".bias") == Some(stem)
        })
    }
}

/// Where one output tensor comes from.
enum Origin {
    Base(String),
    /// An expert's (or, `None`, the shared expert's) MLP projection: the
    /// dense tensor it is made from.
    Expert(Option<usize>, String, Projection),
    /// A layer's router.
    Router(usize),
    /// A layer's gate of the shared expert.
    SharedGate(usize),
    Zeros,
}

/// The mixture's inputs, checked.
pub struct Moe<'r> {
    recipe: &'r MoeRecipe,
    output: Output,
    layouts: Layouts,
    base: Source,
    experts: Vec<Source>,
    shared: Option<Source>,
    layers: usize,
    hidden: usize,
    dtype: Dtype,
}

impl<'r> Moe<'r> {
    /// Opens and checks the base and experts: models of one family and shape
    /// that the output can be built from. Errors name the config line.
    pub fn open(recipe: &'r MoeRecipe) -> Result<Self> {
        let at =
            |place: &ModelRef, message: String| MergeError::Recipe(recipe.error(place.at, message));
        let open = |model: &ModelRef| Source::open_at(model, &|message| at(model, message));
        let output = match (&recipe.architecture, recipe.shared_experts.is_empty()) {
            (Some((name, place)), shared) if "mixtral".starts_with(name.as_str()) => {
                if !shared {
                    return Err(MergeError::Recipe(recipe.error(*place, "Mixtral has no shared experts: drop `shared_experts` or write `architecture: qwen`")));
                }
                Output::Mixtral
            }
            (Some((_, place)), true) => {
                return Err(MergeError::Recipe(recipe.error(
                    *place,
                    "Qwen2-MoE needs one shared expert (`shared_experts`)",
                )))
            }
            (None, true) => Output::Mixtral,
            _ => Output::Qwen2Moe,
        };
        let base = open(&recipe.base_model)?;
        let experts = recipe
            .experts
            .iter()
            .map(|e| open(&e.model))
            .collect::<Result<Vec<_>>>()?;
        let shared = recipe
            .shared_experts
            .first()
            .map(|e| open(&e.model))
            .transpose()?;
        let config = base.checkpoint.config();
        let kind = config.model_type().unwrap_or("unknown").to_owned();
        let output_family = output.family();
        let moe = output_family.moe.as_ref().expect("a mixture's description");
        let assembly = moe.assembly.as_ref().expect("an output amalgam assembles");
        // A dense family the output is built from, whose decoder has a gated MLP.
        let gated = |f: &'static Family| {
            let decoder = f.decoder.as_ref()?;
            matches!(decoder.mlp.input, MlpInput::Gated(_)).then_some((f, decoder))
        };
        let dense = family::by_model_type(&kind).filter(|_| assembly.inputs.contains(&kind));
        let Some((input, dense)) = dense.and_then(gated) else {
            return Err(at(
                &recipe.base_model,
                format!(
                    "the base is a `{kind}` model; {output:?} is built from {} models",
                    assembly.inputs.join(", ")
                ),
            ));
        };
        let layouts = Layouts {
            output: output_family,
            moe,
            assembly,
            dense,
        };
        let layers = base.checkpoint.layers()?;
        let hidden_key = &input.shapes.hidden;
        let hidden = config
            .get(hidden_key)
            .and_then(Value::as_u64)
            .ok_or_else(|| {
                at(
                    &recipe.base_model,
                    format!("its config has no {hidden_key}"),
                )
            })? as usize;
        let all = recipe
            .experts
            .iter()
            .zip(&experts)
            .chain(recipe.shared_experts.iter().zip(&shared));
        for (expert, source) in all {
            let other = source.checkpoint.config().model_type().unwrap_or("unknown");
            if other != kind {
                return Err(at(
                    &expert.model,
                    format!(
                        "a `{other}` model; the base is `{kind}`: experts share the base's family"
                    ),
                ));
            }
            for layer in 0..layers {
                for projection in PROJECTIONS {
                    let name = layouts.dense(layer, projection);
                    let want = &base.checkpoint.entry(&name)?.shape;
                    let shape = source
                        .checkpoint
                        .entry(&name)
                        .map(|e| e.shape.clone())
                        .map_err(|_| {
                            at(
                                &expert.model,
                                format!("this model has no {name}, which the base has"),
                            )
                        })?;
                    if &shape != want {
                        return Err(at(
                            &expert.model,
                            format!("{name} is {shape:?} here and {want:?} in the base: experts share one shape"),
                        ));
                    }
                }
            }
        }
        let dtype = match &recipe.dtype {
            Some(name) => parse_dtype(name).expect("checked by the parser"),
            None => {
                let gate = layouts.dense(0, Projection::Gate);
                base.checkpoint.entry(&gate)?.dtype
            }
        };
        if kind_from_dtype(dtype).is_none() {
            return Err(at(
                &recipe.base_model,
                format!("its weights are stored as {dtype:?}; give `dtype:` (float32, float16 or bfloat16)"),
            ));
        }
        Ok(Self {
            recipe,
            output,
            layouts,
            base,
            experts,
            shared,
            layers,
            hidden,
            dtype,
        })
    }

    pub fn output(&self) -> Output {
        self.output
    }

    /// Router rows `[layers, experts (+ the shared one), hidden]` (F32), as
    /// the gate mode says.
    pub fn gates(&self, seed: u64) -> Result<Tensor> {
        let rows: Vec<&Expert> = self
            .recipe
            .experts
            .iter()
            .chain(&self.recipe.shared_experts)
            .collect();
        let (layers, count, hidden) = (self.layers as i64, rows.len() as i64, self.hidden as i64);
        let shape = [layers, count, hidden];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(amalgam_checkpoint::stream_seed(
            seed,
            "moe gates",
            0,
        ));
        let total = (layers * count * hidden) as usize;
        match self.recipe.gate_mode {
            GateMode::Random => {
                let values: Vec<f32> = (0..total)
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                return Ok(Tensor::from_slice(&values).reshape(shape));
            }
            GateMode::UniformRandom => {
                let scale = (1.0 / hidden as f64).sqrt() as f32;
                let values: Vec<f32> = (0..total)
                    .map(|_| rng.random_range(-scale..scale))
                    .collect();
                return Ok(Tensor::from_slice(&values).reshape(shape));
            }
            GateMode::Hidden | GateMode::CheapEmbed => {}
        }
        // As transformers' AutoTokenizer reads the base's tokenizer (mergekit's prompts).
        if self.base.checkpoint.tokenizer()?.is_none() {
            return Err(self
                .at_base("the base has no tokenizer.json, which prompt-based gates need".into()));
        }
        let tokenizer = TextTokenizer::load(self.base.checkpoint.dir())?;
        let bos = self.bos_token()?;
        // Every prompt's ids, checked before any forward pass: the work is
        // bounded by the prompt count times MAX_HIDDEN_PROMPT_TOKENS.
        let runs_base = self.recipe.gate_mode == GateMode::Hidden;
        let encode = |prompts: &[String], places: &[Location], expert: &Expert| {
            prompts
                .iter()
                .enumerate()
                .map(|(i, prompt)| {
                    let at = places.get(i).copied().unwrap_or(expert.at);
                    let ids = tokenizer
                        .encode(&format!("{bos}{prompt}"), false)
                        .map_err(|e| {
                            MergeError::Recipe(self.recipe.error(at, format!("this prompt: {e}")))
                        })?;
                    if ids.is_empty() {
                        return Err(MergeError::Recipe(self.recipe.error(
                            at,
                            "this prompt has no tokens (an empty prompt, and the base has no \
                             BOS token): give it some text",
                        )));
                    }
                    if runs_base && ids.len() > MAX_HIDDEN_PROMPT_TOKENS {
                        return Err(MergeError::Recipe(self.recipe.error(
                            at,
                            format!(
                                "this prompt is {} tokens with the base's tokenizer; \
                                 `gate_mode: hidden` runs prompts of at most \
                                 {MAX_HIDDEN_PROMPT_TOKENS} tokens through the base (the cost \
                                 of a forward pass grows with the square of its length): \
                                 shorten it, or use gate_mode: cheap_embed",
                                ids.len()
                            ),
                        )));
                    }
                    Ok(ids)
                })
                .collect::<Result<Vec<Vec<i64>>>>()
        };
        let encoded = rows
            .iter()
            .map(|e| {
                Ok((
                    encode(&e.positive_prompts, &e.positive_at, e)?,
                    encode(&e.negative_prompts, &e.negative_at, e)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        let forward = match self.recipe.gate_mode {
            GateMode::Hidden => {
                if self.base.adapter.is_some() {
                    return Err(self.at_base(
                        "hidden-state gates run the base itself: give it without an adapter".into(),
                    ));
                }
                Some(Decoder::load(self.base.dir(), Device::Cpu).map_err(|e| {
                    self.at_base(format!("hidden-state gates run the base through amalgam's forward pass, which cannot run it ({e}); use gate_mode: cheap_embed or random"))
                })?)
            }
            _ => None,
        };
        let embedding = match forward {
            None => {
                let name = format!("{}.weight", self.layouts.dense.embedding);
                Some(self.base.read_as(&name, Kind::Float)?)
            }
            Some(_) => None,
        };
        // One prompt set's vectors `[layers, hidden]`.
        let vectors = |prompts: &[Vec<i64>]| -> Result<Tensor> {
            match (&forward, &embedding) {
                (Some(model), _) => {
                    let mut sum = Tensor::zeros([layers, hidden], (Kind::Float, Device::Cpu));
                    for ids in prompts {
                        let last = ids.len() as i64 - 1;
                        let (_, taps) = tch::no_grad(|| {
                            model.forward_taps(&Tensor::from_slice(ids).unsqueeze(0))
                        });
                        let states: Vec<Tensor> = taps.residual[..self.layers]
                            .iter()
                            .map(|t| t.get(0).get(last))
                            .collect();
                        sum += Tensor::stack(&states, 0);
                    }
                    Ok(sum / prompts.len() as f64)
                }
                (None, Some(embedding)) => {
                    let mut sum = Tensor::zeros([hidden], (Kind::Float, Device::Cpu));
                    for ids in prompts {
                        sum += embedding
                            .index_select(0, &Tensor::from_slice(ids))
                            .sum_dim_intlist(0, false, Kind::Float);
                    }
                    let unit = &sum / sum.norm().clamp_min(1e-8);
                    Ok(unit
                        .unsqueeze(0)
                        .expand([layers, hidden], false)
                        .contiguous())
                }
                _ => unreachable!("one of the two is set"),
            }
        };
        let mut gates = vec![];
        for (positive, negative) in &encoded {
            let mut v = vectors(positive)?;
            if !negative.is_empty() {
                v -= vectors(negative)?;
            }
            let norm = v.norm_scalaropt_dim(2, [-1], true).clamp_min(1e-8);
            gates.push(v / norm);
        }
        Ok(Tensor::stack(&gates, 1))
    }

    /// The base's BOS token text (prompts start with it), or nothing.
    fn bos_token(&self) -> Result<String> {
        let files = amalgam_checkpoint::ModelDir::new(self.base.dir())?;
        if !files.has(TOKENIZER_CONFIG) {
            return Ok(String::new());
        }
        Ok(
            match files.json_object(TOKENIZER_CONFIG)?.get("bos_token") {
                Some(Value::String(text)) => text.clone(),
                Some(Value::Object(token)) => token
                    .get("content")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_owned(),
                _ => String::new(),
            },
        )
    }

    fn at_base(&self, message: String) -> MergeError {
        MergeError::Recipe(self.recipe.error(self.recipe.base_model.at, message))
    }

    /// The mixture's config: the base's, with the output family's
    /// `model_type`, `architectures` and assembly config.
    fn config(&self) -> Result<ModelConfig> {
        let mut config = self.base.checkpoint.config().clone();
        let gate = self.layouts.dense(0, Projection::Gate);
        let width = self.base.checkpoint.entry(&gate)?.shape[0];
        let family = self.layouts.output;
        config.set("model_type", family.model_type.clone().into());
        config.set("architectures", family.architectures.clone().into());
        let entries = self.layouts.assembly.config(
            self.recipe.experts.len(),
            self.recipe.experts_per_token,
            width,
        );
        for (key, value) in entries {
            config.set(&key, value);
        }
        Ok(config)
    }

    /// Every output tensor: (spec, where it comes from).
    fn plan(&self) -> Result<Vec<(TensorSpec, Origin)>> {
        let base = &self.base.checkpoint;
        let layouts = &self.layouts;
        let mut out = vec![];
        let outside_mlp = base
            .tensors()
            .iter()
            .filter(|e| !layouts.is_dense_mlp(&e.name));
        for entry in outside_mlp {
            out.push((
                TensorSpec::new(&entry.name, self.dtype, entry.shape.clone()),
                Origin::Base(entry.name.clone()),
            ));
        }
        // q/k/v biases where the mixture always has them (Qwen2-MoE) and
        // the base has none: zeros, as wide as the weights' rows.
        let attention = layouts.output.attention_tensors().expect("described");
        let zero_biases = match (&attention.qkv, attention.qkv_bias.of(&self.config()?)) {
            (Projections::Separate(parts), true) => parts.as_slice(),
            _ => &[],
        };
        let moe = layouts.moe;
        for layer in 0..self.layers {
            for part in zero_biases {
                let name = attention.layer_tensor(layer, part);
                let bias = format!("{name}.bias");
                if base.entry(&bias).is_err() {
                    let width = base.entry(&format!("{name}.weight"))?.shape[0];
                    out.push((
                        TensorSpec::new(&bias, self.dtype, vec![width]),
                        Origin::Zeros,
                    ));
                }
            }
            for projection in PROJECTIONS {
                let source = layouts.dense(layer, projection);
                let shape = base.entry(&source)?.shape.clone();
                for e in 0..self.experts.len() {
                    out.push((
                        TensorSpec::new(
                            layouts.output(layer, &moe.expert(e, projection)),
                            self.dtype,
                            shape.clone(),
                        ),
                        Origin::Expert(Some(e), source.clone(), projection),
                    ));
                }
                if self.shared.is_some() {
                    let shared = moe.shared_expert.as_ref().expect("checked by Moe::open");
                    out.push((
                        TensorSpec::new(
                            layouts.output(layer, shared.mlp.get(projection)),
                            self.dtype,
                            shape.clone(),
                        ),
                        Origin::Expert(None, source.clone(), projection),
                    ));
                }
            }
            out.push((
                TensorSpec::new(
                    layouts.output(layer, &moe.router),
                    self.dtype,
                    vec![self.experts.len(), self.hidden],
                ),
                Origin::Router(layer),
            ));
            if let (Some(_), Some(shared)) = (&self.shared, &moe.shared_expert) {
                out.push((
                    TensorSpec::new(
                        layouts.output(layer, &shared.gate),
                        self.dtype,
                        vec![1, self.hidden],
                    ),
                    Origin::SharedGate(layer),
                ));
            }
        }
        Ok(out)
    }

    /// Writes the mixture into `out` with router rows `gates` (from [`Moe::gates`]).
    pub fn write(
        &self,
        out: &Path,
        gates: &Tensor,
        seed: u64,
        write: &WriteOptions,
        progress: &dyn Progress,
    ) -> Result<PathBuf> {
        let kind = kind_from_dtype(self.dtype).expect("checked by Moe::open");
        let plan = self.plan()?;
        let specs: Vec<TensorSpec> = plan.iter().map(|(s, _)| s.clone()).collect();
        let sources: Vec<&Source> = std::iter::once(&self.base)
            .chain(&self.experts)
            .chain(&self.shared)
            .collect();
        let mut write = write.clone();
        write.inputs = sources.iter().map(|s| s.dir().to_path_buf()).collect();
        progress.start(specs.len() as u64, "moe");
        let writer = CheckpointWriter::create(out, specs, &write)?;
        let experts = self.experts.len() as i64;
        for (spec, origin) in &plan {
            let name = spec.name.as_str();
            let tensor = match origin {
                Origin::Base(source) => self.base.read_as(source, Kind::Float)?,
                Origin::Zeros => Tensor::zeros([spec.shape[0] as i64], (Kind::Float, Device::Cpu)),
                Origin::Router(layer) => gates.get(*layer as i64).narrow(0, 0, experts),
                Origin::SharedGate(layer) => gates.get(*layer as i64).narrow(0, experts, 1),
                Origin::Expert(e, source, projection) => {
                    let (model, expert) = match e {
                        Some(e) => (&self.experts[*e], &self.recipe.experts[*e]),
                        None => (
                            self.shared.as_ref().expect("planned with one"),
                            &self.recipe.shared_experts[0],
                        ),
                    };
                    let stream = e.map_or(u64::MAX, |e| e as u64);
                    let t = self.expert_tensor(model, expert, source, name, seed, stream)?;
                    match expert.residual_scale {
                        Some(scale) if *projection == Projection::Down => t * scale,
                        _ => t,
                    }
                }
            };
            let tensor = tensor
                .f_to_kind(kind)
                .map_err(|cause| MergeError::Torch {
                    tensor: name.to_owned(),
                    cause,
                })?
                .contiguous();
            writer.write_tensor(name, &tensor)?;
            progress.advance(1);
        }
        progress.finish();
        let config = self.config()?;
        let roles = std::iter::once("base")
            .chain(self.experts.iter().map(|_| "expert"))
            .chain(self.shared.iter().map(|_| "shared expert"));
        let inputs = sources
            .iter()
            .zip(roles)
            .map(|(source, role)| source.records(role))
            .collect::<Result<Vec<Vec<InputRecord>>>>()?
            .concat();
        let card = ModelCard {
            title: out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            summary: format!(
                "A {:?} mixture of {} experts ({} per token{}), router from `{:?}` gates, made by `amalgam moe` from the config below (seed {seed}).",
                self.output,
                self.experts.len(),
                self.recipe.experts_per_token,
                if self.shared.is_some() { ", and a shared expert" } else { "" },
                self.recipe.gate_mode
            ),
            recipe: Some(self.recipe.text.clone()),
            inputs,
        };
        Ok(writer.finish(Finish {
            config: &config,
            tokenizer_source: Some(self.base.dir()),
            chat_template: None,
            extra_files: &[],
            card: &card,
        })?)
    }

    /// One expert's projection, with its noise (a seeded stream per tensor
    /// and expert).
    fn expert_tensor(
        &self,
        model: &Source,
        expert: &Expert,
        source: &str,
        name: &str,
        seed: u64,
        stream: u64,
    ) -> Result<Tensor> {
        let mut t = model.read_as(source, Kind::Float)?;
        if let Some(scale) = expert.noise_scale {
            let mut rng = Xoshiro256PlusPlus::seed_from_u64(amalgam_checkpoint::stream_seed(
                seed, name, stream,
            ));
            let noise: Vec<f32> = (0..t.numel())
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            let noise = Tensor::from_slice(&noise).reshape(t.size()) * scale;
            t += noise;
        }
        Ok(t)
    }
}
