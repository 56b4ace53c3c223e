//! `amalgam moe` (mergekit-moe): dense Llama or Mistral experts assembled into
//! a Mixtral-style mixture. Everything but the MLPs comes from the base; each
//! layer's MLP becomes one expert per input model (`w1`/`w2`/`w3` from its
//! gate/down/up projections, the per-expert layout transformers 5 loads),
//! and each layer's router row for an expert is a unit vector from the gate
//! mode: the base's hidden state entering that layer at the last token of
//! the expert's prompts (mean over prompts, minus the negative prompts'), the
//! mean token embedding of the prompts (every layer alike), or random.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::{
    kind_from_dtype, parse_dtype, CheckpointWriter, Dtype, Finish, InputRecord, ModelCard,
    TensorSpec, WriteOptions, TOKENIZER_CONFIG,
};
use amalgam_nn::Llama;
use amalgam_recipe::{GateMode, MoeRecipe};
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, StandardNormal};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::{json, Value};
use tch::{Device, Kind, Tensor};

use crate::source::Source;
use crate::{MergeError, Progress, Result};

const PROJECTIONS: [(&str, &str); 3] =
    [("gate_proj", "w1"), ("down_proj", "w2"), ("up_proj", "w3")];

/// The mixture's inputs, checked.
pub struct Moe<'r> {
    recipe: &'r MoeRecipe,
    base: Source,
    experts: Vec<Source>,
    layers: usize,
    hidden: usize,
    dtype: Dtype,
}

impl<'r> Moe<'r> {
    /// Opens and checks the base and experts: Llama or Mistral models of one
    /// shape. Errors name the config line.
    pub fn open(recipe: &'r MoeRecipe) -> Result<Self> {
        let open = |model: &amalgam_recipe::ModelRef| {
            Source::open_at(model, &|message| {
                MergeError::Recipe(recipe.error(model.at, message))
            })
        };
        let base = open(&recipe.base_model)?;
        let experts = recipe
            .experts
            .iter()
            .map(|e| open(&e.model))
            .collect::<Result<Vec<_>>>()?;
        let config = base.checkpoint.config();
        let at_base =
            |message: String| MergeError::Recipe(recipe.error(recipe.base_model.at, message));
        let kind = config.model_type().unwrap_or("unknown");
        if !["llama", "mistral"].contains(&kind) {
            return Err(at_base(format!(
                "the base is a `{kind}` model; `amalgam moe` builds Mixtral from Llama or Mistral models"
            )));
        }
        let layers = base.checkpoint.layers()?;
        let hidden = config
            .get("hidden_size")
            .and_then(Value::as_u64)
            .ok_or_else(|| at_base("its config has no hidden_size".into()))?
            as usize;
        for (expert, source) in recipe.experts.iter().zip(&experts) {
            let other = source.checkpoint.config().model_type().unwrap_or("unknown");
            for layer in 0..layers {
                for (projection, _) in PROJECTIONS {
                    let name = mlp(layer, projection);
                    let want = &base.checkpoint.entry(&name)?.shape;
                    let shape = source
                        .checkpoint
                        .entry(&name)
                        .map(|e| e.shape.clone())
                        .map_err(|_| {
                            MergeError::Recipe(recipe.error(
                                expert.model.at,
                                format!("this `{other}` model has no {name}, which the base has"),
                            ))
                        })?;
                    if &shape != want {
                        return Err(MergeError::Recipe(recipe.error(
                            expert.model.at,
                            format!("{name} is {shape:?} here and {want:?} in the base: experts share one shape"),
                        )));
                    }
                }
            }
        }
        let dtype = match &recipe.dtype {
            Some(name) => parse_dtype(name).expect("checked by the parser"),
            None => base.checkpoint.entry(&mlp(0, "gate_proj"))?.dtype,
        };
        Ok(Self {
            recipe,
            base,
            experts,
            layers,
            hidden,
            dtype,
        })
    }

    /// Router weights `[layers, experts, hidden]` (F32), as the gate mode says.
    pub fn gates(&self, seed: u64) -> Result<Tensor> {
        let (layers, experts, hidden) = (
            self.layers as i64,
            self.experts.len() as i64,
            self.hidden as i64,
        );
        let shape = [layers, experts, hidden];
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(amalgam_checkpoint::stream_seed(
            seed,
            "moe gates",
            0,
        ));
        let count = (layers * experts * hidden) as usize;
        match self.recipe.gate_mode {
            GateMode::Random => {
                let values: Vec<f32> = (0..count)
                    .map(|_| StandardNormal.sample(&mut rng))
                    .collect();
                return Ok(Tensor::from_slice(&values).reshape(shape));
            }
            GateMode::UniformRandom => {
                let scale = (1.0 / hidden as f64).sqrt() as f32;
                let values: Vec<f32> = (0..count)
                    .map(|_| rng.random_range(-scale..scale))
                    .collect();
                return Ok(Tensor::from_slice(&values).reshape(shape));
            }
            GateMode::Hidden | GateMode::CheapEmbed => {}
        }
        let tokenizer = self.base.checkpoint.tokenizer()?.ok_or_else(|| {
            self.at_base("the base has no tokenizer.json, which prompt-based gates need".into())
        })?;
        let bos = self.bos_token()?;
        let encode = |prompt: &str| -> Result<Vec<i64>> {
            let encoding = tokenizer
                .encode(format!("{bos}{prompt}"), false)
                .map_err(|e| self.at_base(format!("cannot tokenize the prompt {prompt:?}: {e}")))?;
            Ok(encoding.get_ids().iter().map(|&id| i64::from(id)).collect())
        };
        let forward = match self.recipe.gate_mode {
            GateMode::Hidden => {
                if self.base.adapter.is_some() {
                    return Err(self.at_base(
                        "hidden-state gates run the base itself: give it without an adapter".into(),
                    ));
                }
                Some(Llama::load(self.base.dir(), Device::Cpu)?)
            }
            _ => None,
        };
        let embedding = match forward {
            None => Some(
                self.base
                    .read_as("model.embed_tokens.weight", Kind::Float)?,
            ),
            Some(_) => None,
        };
        // One prompt set's vectors `[layers, hidden]`.
        let vectors = |prompts: &[String]| -> Result<Tensor> {
            match (&forward, &embedding) {
                (Some(model), _) => {
                    let mut sum = Tensor::zeros([layers, hidden], (Kind::Float, Device::Cpu));
                    for prompt in prompts {
                        let ids = encode(prompt)?;
                        let last = ids.len() as i64 - 1;
                        let (_, taps) = tch::no_grad(|| {
                            model.forward_taps(&Tensor::from_slice(&ids).unsqueeze(0))
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
                    for prompt in prompts {
                        let ids = encode(prompt)?;
                        sum += embedding
                            .index_select(0, &Tensor::from_slice(&ids))
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
        for expert in &self.recipe.experts {
            let mut v = vectors(&expert.positive_prompts)?;
            if !expert.negative_prompts.is_empty() {
                v -= vectors(&expert.negative_prompts)?;
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

    /// Writes the mixture into `out` with router weights `gates`.
    pub fn write(
        &self,
        out: &Path,
        gates: &Tensor,
        seed: u64,
        write: &WriteOptions,
        progress: &dyn Progress,
    ) -> Result<PathBuf> {
        let kind = kind_from_dtype(self.dtype).expect("a float dtype");
        let base = &self.base.checkpoint;
        let mut specs = vec![];
        for entry in base.tensors().iter().filter(|e| !e.name.contains(".mlp.")) {
            specs.push(TensorSpec::new(
                &entry.name,
                self.dtype,
                entry.shape.clone(),
            ));
        }
        for layer in 0..self.layers {
            for e in 0..self.experts.len() {
                for (projection, w) in PROJECTIONS {
                    let shape = base.entry(&mlp(layer, projection))?.shape.clone();
                    specs.push(TensorSpec::new(expert_name(layer, e, w), self.dtype, shape));
                }
            }
            specs.push(TensorSpec::new(
                router_name(layer),
                self.dtype,
                vec![self.experts.len(), self.hidden],
            ));
        }
        let mut write = write.clone();
        write.inputs = std::iter::once(&self.base)
            .chain(&self.experts)
            .map(|s| s.dir().to_path_buf())
            .collect();
        progress.start(specs.len() as u64, "moe");
        let writer = CheckpointWriter::create(out, specs.clone(), &write)?;
        let torch = |name: &str| {
            let name = name.to_owned();
            move |cause| MergeError::Torch {
                tensor: name.clone(),
                cause,
            }
        };
        for spec in &specs {
            let name = spec.name.as_str();
            let tensor = if let Some(layer) = name
                .strip_suffix(".block_sparse_moe.gate.weight")
                .and_then(layer_of)
            {
                gates.get(layer as i64)
            } else if let Some((layer, e, w)) = parse_expert(name) {
                let (projection, _) = PROJECTIONS
                    .iter()
                    .find(|(_, x)| *x == w)
                    .expect("one of ours");
                let source_name = mlp(layer, projection);
                let mut t = self.experts[e].read_as(&source_name, Kind::Float)?;
                let expert = &self.recipe.experts[e];
                if let Some(scale) = expert.noise_scale {
                    let mut rng = Xoshiro256PlusPlus::seed_from_u64(
                        amalgam_checkpoint::stream_seed(seed, name, e as u64),
                    );
                    let noise: Vec<f32> = (0..t.numel())
                        .map(|_| StandardNormal.sample(&mut rng))
                        .collect();
                    let noise = Tensor::from_slice(&noise).reshape(t.size()) * scale;
                    t += noise;
                }
                if let (Some(scale), "down_proj") = (expert.residual_scale, *projection) {
                    t *= scale;
                }
                t
            } else {
                self.base.read_as(name, Kind::Float)?
            };
            let t = tensor.f_to_kind(kind).map_err(torch(name))?.contiguous();
            writer.write_tensor(name, &t)?;
            progress.advance(1);
        }
        progress.finish();
        let mut config = base.config().clone();
        let mixtral = json!({
            "model_type": "mixtral",
            "architectures": ["MixtralForCausalLM"],
            "num_local_experts": self.experts.len(),
            "num_experts_per_tok": self.recipe.experts_per_token,
            "sliding_window": null,
            "output_router_logits": false,
            "router_aux_loss_coef": 0.001,
            "router_jitter_noise": 0.0,
        });
        for (key, value) in mixtral.as_object().expect("an object") {
            config.set(key, value.clone());
        }
        let inputs = std::iter::once(("base", &self.base))
            .chain(self.experts.iter().map(|s| ("expert", s)))
            .map(|(role, source)| source.records(role))
            .collect::<Result<Vec<Vec<InputRecord>>>>()?
            .concat();
        let card = ModelCard {
            title: out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            summary: format!(
                "A Mixtral-style mixture of {} experts ({} per token), router from `{:?}` gates, made by `amalgam moe` from the config below (seed {seed}).",
                self.experts.len(),
                self.recipe.experts_per_token,
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
}

fn mlp(layer: usize, projection: &str) -> String {
    format!("model.layers.{layer}.mlp.{projection}.weight")
}

fn expert_name(layer: usize, expert: usize, w: &str) -> String {
    format!("model.layers.{layer}.block_sparse_moe.experts.{expert}.{w}.weight")
}

fn router_name(layer: usize) -> String {
    format!("model.layers.{layer}.block_sparse_moe.gate.weight")
}

fn layer_of(prefix: &str) -> Option<usize> {
    prefix.strip_prefix("model.layers.")?.parse().ok()
}

/// (layer, expert, w1/w2/w3) of an expert tensor's name.
fn parse_expert(name: &str) -> Option<(usize, usize, &str)> {
    let rest = name.strip_prefix("model.layers.")?;
    let (layer, rest) = rest.split_once(".block_sparse_moe.experts.")?;
    let (expert, rest) = rest.split_once('.')?;
    let w = rest.strip_suffix(".weight")?;
    Some((layer.parse().ok()?, expert.parse().ok()?, w))
}
