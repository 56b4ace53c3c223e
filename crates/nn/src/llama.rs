//! The Llama-family decoder: RMSNorm, RoPE, grouped-query attention, SwiGLU
//! (act(gate)·up), tied or untied embeddings, one FFN width per layer.
//! Parameters live in a tch `VarStore` under the Hugging Face tensor names,
//! so loading, saving and training address them by the same names.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::{
    stream_seed, Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, TensorSpec, WriteOptions,
};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{nn, Device, Kind, Tensor};

use crate::{LlamaConfig, NnError, Result, RopeScaling};

/// Activations recorded by [`Llama::forward_taps`], one entry per block.
#[derive(Debug, Default)]
pub struct Taps {
    /// The residual stream at every block boundary: before block 0 (the
    /// embeddings), between blocks, and after the last block (before the final
    /// norm) — `layers + 1` tensors of `[batch, seq, hidden]`.
    pub residual: Vec<Tensor>,
    /// act(gate)·up per block: `[batch, seq, ffn width of that block]`.
    pub ffn_hidden: Vec<Tensor>,
    /// Each attention head's output before `o_proj`: `[batch, seq, heads, head_dim]`.
    pub attention_heads: Vec<Tensor>,
}

impl Taps {
    /// Every tap flattened over batch and positions: `[tokens, width]`
    /// (attention heads side by side), in the order residual, attention, FFN.
    pub fn flattened(&self) -> [Vec<Tensor>; 3] {
        let flat = |taps: &[Tensor]| {
            taps.iter()
                .map(|t| {
                    let width: i64 = t.size()[2..].iter().product();
                    t.reshape([-1, width])
                })
                .collect()
        };
        [
            flat(&self.residual),
            flat(&self.attention_heads),
            flat(&self.ffn_hidden),
        ]
    }
}

struct Block {
    input_norm: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    post_norm: Tensor,
    gate: Tensor,
    up: Tensor,
    down: Tensor,
}

/// A Llama-style causal language model.
pub struct Llama {
    pub config: LlamaConfig,
    pub vs: nn::VarStore,
    embed: Tensor,
    blocks: Vec<Block>,
    norm: Tensor,
    /// `None` when tied to the embeddings.
    lm_head: Option<Tensor>,
}

impl Llama {
    /// A freshly initialised model: weights N(0, 0.02²), norms 1. Each
    /// tensor's draws come from a stream keyed by (`seed`, tensor name), not
    /// from libtorch's global generator, so the result does not depend on
    /// what else runs in the process.
    pub fn new(config: LlamaConfig, device: Device, seed: u64) -> Self {
        Self::build(config, device, Some(seed))
    }

    /// The model's variables, drawn from `seed` or zero (to be loaded
    /// into); norms start at 1. Names and shapes come from
    /// [`LlamaConfig::parameter_shapes`].
    fn build(config: LlamaConfig, device: Device, seed: Option<u64>) -> Self {
        let vs = nn::VarStore::new(device);
        let mut vars: std::collections::HashMap<String, Tensor> = config
            .parameter_shapes()
            .into_iter()
            .map(|(name, shape)| {
                let mut path = vs.root();
                let mut parts: Vec<&str> = name.split('.').collect();
                let leaf = parts.pop().expect("a dotted name");
                for part in parts {
                    path = &path / part;
                }
                let var = match seed {
                    _ if shape.len() == 1 => path.var(leaf, &shape, nn::Init::Const(1.0)),
                    Some(seed) => {
                        path.var_copy(leaf, &normal(&name, &shape, seed).to_device(device))
                    }
                    None => path.zeros(leaf, &shape),
                };
                (name, var)
            })
            .collect();
        let mut take = |name: String| vars.remove(&name).expect("listed by parameter_shapes");
        let embed = take("model.embed_tokens.weight".into());
        let blocks = (0..config.num_hidden_layers())
            .map(|i| {
                let mut part = |p: &str| take(format!("model.layers.{i}.{p}.weight"));
                Block {
                    input_norm: part("input_layernorm"),
                    q: part("self_attn.q_proj"),
                    k: part("self_attn.k_proj"),
                    v: part("self_attn.v_proj"),
                    o: part("self_attn.o_proj"),
                    post_norm: part("post_attention_layernorm"),
                    gate: part("mlp.gate_proj"),
                    up: part("mlp.up_proj"),
                    down: part("mlp.down_proj"),
                }
            })
            .collect();
        let norm = take("model.norm.weight".into());
        let lm_head = (!config.tie_word_embeddings).then(|| take("lm_head.weight".into()));
        Llama {
            config,
            vs,
            embed,
            blocks,
            norm,
            lm_head,
        }
    }

    /// Loads a Hugging Face Llama checkpoint (any float dtype; computed in
    /// F32). The config is checked against the stored tensors' shapes before
    /// anything is allocated: a config claiming sizes the weights do not have
    /// is an error, not a huge allocation.
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let config = LlamaConfig::from_model_config(checkpoint.config(), &dir.join("config.json"))?;
        let mut shapes = config.parameter_shapes();
        shapes.sort(); // the first mismatch reported is the same every time
        let invalid = |message: String| NnError::Invalid(format!("{}: {message}", dir.display()));
        for (name, shape) in &shapes {
            let entry = checkpoint.entry(name).map_err(|_| {
                invalid(format!(
                    "no tensor {name}, which a Llama model of this config has"
                ))
            })?;
            if entry
                .shape
                .iter()
                .map(|&d| d as i64)
                .ne(shape.iter().copied())
            {
                return Err(invalid(format!(
                    "tensor {name} has shape {:?}, the config implies {shape:?}",
                    entry.shape
                )));
            }
        }
        for entry in checkpoint.tensors() {
            let known = shapes.iter().any(|(name, _)| *name == entry.name)
                || entry.name.ends_with("rotary_emb.inv_freq")
                || (entry.name == "lm_head.weight" && config.tie_word_embeddings);
            if !known {
                return Err(invalid(format!(
                    "tensor {} is not part of a Llama model of this config",
                    entry.name
                )));
            }
        }
        let model = Llama::build(config, device, None);
        for (name, var) in model.vs.variables() {
            let tensor = checkpoint.read_as(&name, Kind::Float)?;
            tch::no_grad(|| var.shallow_clone().copy_(&tensor));
        }
        Ok(model)
    }

    /// A model of `config` holding `tensors` (Hugging Face names; every
    /// variable must be given with its shape).
    pub fn from_tensors(
        config: LlamaConfig,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        device: Device,
    ) -> Result<Self> {
        let model = Llama::build(config, device, None);
        for (name, var) in model.vs.variables() {
            let tensor = tensors
                .get(&name)
                .ok_or_else(|| NnError::Invalid(format!("no tensor {name}")))?;
            if tensor.size() != var.size() {
                return Err(NnError::Invalid(format!(
                    "tensor {name} has shape {:?}, the config implies {:?}",
                    tensor.size(),
                    var.size()
                )));
            }
            tch::no_grad(|| var.shallow_clone().copy_(tensor));
        }
        Ok(model)
    }

    /// The model's tensors by name (shallow: they share the variables' storage).
    pub fn tensors(&self) -> std::collections::BTreeMap<String, Tensor> {
        self.vs.variables().into_iter().collect()
    }

    /// [`Llama::save`] with amalgam's byte tokenizer files beside the
    /// weights, to a new (or empty) directory.
    pub fn save_with_tokenizer(&self, out: &Path, card: &ModelCard) -> Result<PathBuf> {
        self.save(
            out,
            card,
            None,
            &crate::tokenizer::files(),
            &WriteOptions::default(),
        )
    }

    /// Writes the model as an F32 Hugging Face checkpoint (config, weights,
    /// the tokenizer files of `tokenizer_source` and the given extra files),
    /// atomically.
    pub fn save(
        &self,
        out: &Path,
        card: &ModelCard,
        tokenizer_source: Option<&Path>,
        extra_files: &[(&str, Vec<u8>)],
        options: &WriteOptions,
    ) -> Result<PathBuf> {
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        let specs = variables
            .iter()
            .map(|(name, t)| {
                let shape = t.size().iter().map(|&s| s as usize).collect();
                TensorSpec::new(name.clone(), Dtype::F32, shape)
            })
            .collect();
        let writer = CheckpointWriter::create(out, specs, options)?;
        for (name, tensor) in &variables {
            let data = tensor.detach().to_device(Device::Cpu).contiguous();
            writer.write_tensor(name, &data)?;
        }
        Ok(writer.finish(Finish {
            config: &self.config.to_model_config(),
            tokenizer_source,
            chat_template: None,
            extra_files,
            card,
        })?)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// A separate model made of blocks `layers` of this one (renumbered from
    /// 0), with its embeddings, final norm and head.
    pub fn sub_layers(&self, layers: std::ops::Range<usize>) -> Llama {
        let mut config = self.config.clone();
        config.intermediate_sizes = config.intermediate_sizes[layers.clone()].to_vec();
        let sub = Self::build(config, self.device(), None);
        let source = self.vs.variables();
        tch::no_grad(|| {
            for (name, mut var) in sub.vs.variables() {
                let from = match name
                    .strip_prefix("model.layers.")
                    .and_then(|rest| rest.split_once('.'))
                    .and_then(|(i, rest)| Some((i.parse::<usize>().ok()?, rest)))
                {
                    Some((i, rest)) => format!("model.layers.{}.{rest}", i + layers.start),
                    None => name.clone(),
                };
                var.copy_(&source[&from]);
            }
        });
        sub
    }

    /// Logits `[batch, seq, vocab]` for token ids `[batch, seq]`.
    pub fn forward(&self, ids: &Tensor) -> Tensor {
        self.run(ids, None, None)
    }

    /// Logits of the nested submodel that keeps the first `widths[l]` FFN
    /// units of layer `l` (MatFormer): rows `..m` of gate and up, columns
    /// `..m` of down. Gradients flow into those slices of the full weights.
    pub fn forward_nested(&self, ids: &Tensor, widths: &[usize]) -> Result<Tensor> {
        self.check_widths(widths)?;
        Ok(self.run(ids, None, Some(widths)))
    }

    /// Logits and the activations every block produced.
    pub fn forward_taps(&self, ids: &Tensor) -> (Tensor, Taps) {
        let mut taps = Taps::default();
        let logits = self.run(ids, Some(&mut taps), None);
        (logits, taps)
    }

    /// Mean next-token cross-entropy of a batch of sequences `[batch, seq]`.
    pub fn loss(&self, ids: &Tensor) -> Tensor {
        self.loss_nested(ids, None)
    }

    /// The loss of the nested submodel of `widths` (`None`: the whole model).
    /// The widths must be valid (see [`Llama::forward_nested`]).
    pub fn loss_nested(&self, ids: &Tensor, widths: Option<&[usize]>) -> Tensor {
        let seq = ids.size()[1];
        let logits = self.run(&ids.narrow(1, 0, seq - 1), None, widths);
        let targets = ids.narrow(1, 1, seq - 1);
        logits
            .reshape([-1, self.config.vocab_size as i64])
            .cross_entropy_for_logits(&targets.reshape([-1]))
    }

    /// One width per layer, each between 1 and the layer's full width.
    pub fn check_widths(&self, widths: &[usize]) -> Result<()> {
        let full = &self.config.intermediate_sizes;
        if widths.len() != full.len() || widths.iter().zip(full).any(|(&w, &f)| w == 0 || w > f) {
            return Err(NnError::Invalid(format!(
                "nested FFN widths {widths:?} do not fit the model's {full:?} (one per layer, 1 ≤ width ≤ full)"
            )));
        }
        Ok(())
    }

    fn run(&self, ids: &Tensor, mut taps: Option<&mut Taps>, widths: Option<&[usize]>) -> Tensor {
        let x = self.embed(ids);
        let x = self.run_blocks(x, 0..self.blocks.len(), taps.as_deref_mut(), widths);
        if let Some(t) = taps {
            t.residual.push(x.shallow_clone());
        }
        self.head(&x)
    }

    /// The residual stream entering block 0: the token embeddings `[batch, seq, hidden]`.
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        Tensor::embedding(&self.embed, ids, -1, false, false)
    }

    /// Logits from the residual stream after the last block (final norm, head).
    pub fn head(&self, x: &Tensor) -> Tensor {
        let x = rms_norm(x, &self.norm, self.config.rms_norm_eps);
        x.linear::<Tensor>(self.lm_head.as_ref().unwrap_or(&self.embed), None)
    }

    /// Runs the blocks `layers` on the residual stream `x` entering the first
    /// of them (positions 0..seq); returns the stream leaving the last.
    pub fn blocks(&self, x: Tensor, layers: std::ops::Range<usize>) -> Tensor {
        self.run_blocks(x, layers, None, None)
    }

    fn run_blocks(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        mut taps: Option<&mut Taps>,
        widths: Option<&[usize]>,
    ) -> Tensor {
        let c = &self.config;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = (
            c.num_attention_heads as i64,
            c.num_key_value_heads as i64,
            c.head_dim as i64,
        );
        let (cos, sin) = rope_tables(c, seq, self.device());
        for (layer, block) in self
            .blocks
            .iter()
            .enumerate()
            .take(layers.end)
            .skip(layers.start)
        {
            let (gate, up, down) = match widths {
                Some(widths) => {
                    let m = widths[layer] as i64;
                    (
                        block.gate.narrow(0, 0, m),
                        block.up.narrow(0, 0, m),
                        block.down.narrow(1, 0, m),
                    )
                }
                None => (
                    block.gate.shallow_clone(),
                    block.up.shallow_clone(),
                    block.down.shallow_clone(),
                ),
            };
            if let Some(t) = taps.as_deref_mut() {
                t.residual.push(x.shallow_clone());
            }
            let h = rms_norm(&x, &block.input_norm, c.rms_norm_eps);
            let split = |w: &Tensor, n: i64| {
                h.linear::<Tensor>(w, None)
                    .view([batch, seq, n, hd])
                    .transpose(1, 2)
            };
            let q = rotate(&split(&block.q, heads), &cos, &sin);
            let k = rotate(&split(&block.k, kv), &cos, &sin);
            let v = split(&block.v, kv);
            // Query head h reads key/value head h / (heads / kv).
            let (k, v) = if heads == kv {
                (k, v)
            } else {
                let groups = heads / kv;
                (
                    k.repeat_interleave_self_int(groups, 1, None),
                    v.repeat_interleave_self_int(groups, 1, None),
                )
            };
            let attended = Tensor::scaled_dot_product_attention::<Tensor>(
                &q,
                &k,
                &v,
                None,
                0.0,
                true,
                Some(1.0 / (hd as f64).sqrt()),
                false,
            )
            .transpose(1, 2);
            if let Some(t) = taps.as_deref_mut() {
                t.attention_heads.push(attended.shallow_clone());
            }
            let attended = attended.reshape([batch, seq, heads * hd]);
            // Out of place: `+=` would change the tapped tensors and break autograd.
            x = &x + attended.linear::<Tensor>(&block.o, None);
            let h = rms_norm(&x, &block.post_norm, c.rms_norm_eps);
            let hidden = h.linear::<Tensor>(&gate, None).silu() * h.linear::<Tensor>(&up, None);
            if let Some(t) = taps.as_deref_mut() {
                t.ffn_hidden.push(hidden.shallow_clone());
            }
            x = &x + hidden.linear::<Tensor>(&down, None);
        }
        x
    }
}

/// N(0, 0.02²) draws of `shape` from the stream (seed, name).
fn normal(name: &str, shape: &[i64], seed: u64) -> Tensor {
    let mut rng = Xoshiro256PlusPlus::seed_from_u64(stream_seed(seed, name, 0));
    let count: i64 = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| 0.02 * rng.sample::<f32, _>(StandardNormal))
        .collect();
    Tensor::from_slice(&values).view(shape)
}

/// x / rms(x) · weight, the mean of squares taken in F32.
fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Tensor {
    let kind = x.kind();
    let x = x.to_kind(Kind::Float);
    let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
    weight * (x * (variance + eps).rsqrt()).to_kind(kind)
}

/// RoPE with the half-split layout `transformers` uses: x·cos + rotate_half(x)·sin.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Tensor {
    let half = x.size()[3] / 2;
    let (x1, x2) = (x.narrow(3, 0, half), x.narrow(3, half, half));
    let rotated = Tensor::cat(&[-x2, x1], 3);
    x * cos + rotated * sin
}

/// cos and sin `[seq, head_dim]` for positions 0..seq.
fn rope_tables(c: &LlamaConfig, seq: i64, device: Device) -> (Tensor, Tensor) {
    let inv_freq: Vec<f32> = inverse_frequencies(c)
        .into_iter()
        .map(|f| f as f32)
        .collect();
    let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
    let positions = Tensor::arange(seq, (Kind::Float, device));
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let angles = Tensor::cat(&[&freqs, &freqs], 1);
    (angles.cos(), angles.sin())
}

/// θ^(−2i/d) per rotary pair, rescaled as config.json's `rope_scaling` says.
fn inverse_frequencies(c: &LlamaConfig) -> Vec<f64> {
    let dim = c.head_dim;
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| {
            let exponent = f64::from((2 * i) as f32 / dim as f32);
            1.0 / c.rope_theta.powf(exponent)
        })
        .collect();
    match c.rope_scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor,
            high_freq_factor,
            original_max_position_embeddings: old_context,
        }) => {
            let low_wavelen = old_context / low_freq_factor;
            let high_wavelen = old_context / high_freq_factor;
            base.iter()
                .map(|&f| {
                    let wavelen = 2.0 * std::f64::consts::PI / f;
                    if wavelen < high_wavelen {
                        f
                    } else if wavelen > low_wavelen {
                        f / factor
                    } else {
                        let smooth = (old_context / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        (1.0 - smooth) * f / factor + smooth * f
                    }
                })
                .collect()
        }
    }
}
