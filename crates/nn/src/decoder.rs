//! One decoder-only forward pass for every supported family: pre- or
//! post-norm blocks, RMSNorm or LayerNorm, separate or fused projections,
//! optional biases and q/k norms, gated or plain MLPs, full or partial RoPE,
//! sequential or parallel residual, sliding windows and soft caps — each
//! chosen by the family's description ([`crate::Architecture`]), not by a
//! copy of the model. Parameters live in a tch `VarStore` under the Hugging
//! Face tensor names, so loading, saving and training address them by the
//! same names.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::decoder::{NormKind, RowSplit};
use amalgam_checkpoint::{
    family, stream_seed, Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard, TensorSpec,
    WriteOptions,
};
use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;
use tch::{nn, Device, Kind, Tensor};

use crate::config::{rotary_dim, Activation, ParameterRole};
use crate::linear::LinearWeights;
use crate::{DecoderConfig, NnError, Result, RopeScaling};

/// Activations recorded by [`Decoder::forward_taps`], one entry per block.
#[derive(Debug, Default)]
pub struct Taps {
    /// The residual stream at every block boundary: before block 0 (the
    /// embeddings), between blocks, and after the last block (before the final
    /// norm) — `layers + 1` tensors of `[batch, seq, hidden]`.
    pub residual: Vec<Tensor>,
    /// The residual stream each block's MLP reads (its input norm's input):
    /// the block input plus attention's output, or with a parallel residual
    /// the block input itself — `[batch, seq, hidden]`.
    pub mlp_stream: Vec<Tensor>,
    /// act(gate)·up per block: `[batch, seq, ffn width of that block]`.
    pub ffn_hidden: Vec<Tensor>,
    /// Each attention head's output before `o_proj`: `[batch, seq, heads, head_dim]`.
    pub attention_heads: Vec<Tensor>,
}

impl Taps {
    /// Every tap flattened over batch and positions: `[tokens, width]`
    /// (attention heads side by side), in the order residual, attention,
    /// MLP stream, FFN.
    pub fn flattened(&self) -> [Vec<Tensor>; 4] {
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
            flat(&self.mlp_stream),
            flat(&self.ffn_hidden),
        ]
    }
}

/// What [`Decoder::save_as`] writes besides the weights, and in which dtype.
pub struct SaveFiles<'a> {
    pub dtype: Dtype,
    /// Whose tokenizer files are copied.
    pub tokenizer_source: Option<&'a Path>,
    /// Written as `chat_template.jinja`.
    pub chat_template: Option<&'a str>,
    pub extra_files: &'a [(&'a str, Vec<u8>)],
}

/// Which pieces of a model a [`Decoder`] holds: a whole model, or the part
/// of one that a layer-by-layer pass needs (the rest is never read into
/// memory; running a piece the part lacks is a programming error and panics).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Part {
    /// The token embeddings.
    pub embedding: bool,
    /// The blocks, by their index in the whole model.
    pub layers: std::ops::Range<usize>,
    /// The final norm and the output head (and the embeddings when tied).
    pub head: bool,
}

impl Part {
    pub fn whole(layers: usize) -> Self {
        Part {
            embedding: true,
            layers: 0..layers,
            head: true,
        }
    }

    /// Block `layer` alone.
    pub fn block(layer: usize) -> Self {
        Part {
            embedding: false,
            layers: layer..layer + 1,
            head: false,
        }
    }

    pub fn embedding() -> Self {
        Part {
            embedding: true,
            layers: 0..0,
            head: false,
        }
    }

    pub fn head() -> Self {
        Part {
            embedding: false,
            layers: 0..0,
            head: true,
        }
    }

    /// The parameters of a model of `config` the part holds.
    pub fn parameter_count(&self, config: &DecoderConfig) -> u64 {
        config
            .parameters()
            .iter()
            .filter(|p| self.holds(config, &p.name))
            .map(|p| p.shape.iter().product::<i64>() as u64)
            .sum()
    }

    /// Whether the parameter `name` of a model of `config` is in the part.
    fn holds(&self, config: &DecoderConfig, name: &str) -> bool {
        let layout = config.architecture.layout;
        let stem = name.rsplit_once('.').map_or(name, |(stem, _)| stem);
        if stem == layout.embedding {
            return self.embedding || (self.head && config.tie_word_embeddings);
        }
        if stem == layout.final_norm || layout.head.iter().any(|h| h == stem) {
            return self.head;
        }
        self.layers
            .clone()
            .any(|l| name.starts_with(&layout.layer_tensor(l, "")))
    }
}

/// Writes a checkpoint of a model of some config tensor by tensor, in any
/// order — for a model that is never whole in memory (PLeaS writes each
/// layer as it is solved). Atomic, as every checkpoint write.
pub struct DecoderWriter {
    writer: CheckpointWriter,
    config: DecoderConfig,
    kind: Kind,
}

impl DecoderWriter {
    /// Starts `out` for every parameter of `config`, stored in `dtype`.
    pub fn create(
        out: &Path,
        config: &DecoderConfig,
        dtype: Dtype,
        options: &WriteOptions,
    ) -> Result<Self> {
        let kind = amalgam_checkpoint::kind_from_dtype(dtype)
            .filter(|k| matches!(k, Kind::Float | Kind::Double | Kind::BFloat16 | Kind::Half))
            .ok_or_else(|| NnError::Invalid(format!("cannot save weights as {dtype:?}")))?;
        let mut parameters = config.parameters();
        parameters.sort_by(|a, b| a.name.cmp(&b.name));
        let specs = parameters
            .into_iter()
            .map(|p| {
                let shape = p.shape.iter().map(|&s| s as usize).collect();
                TensorSpec::new(p.name, dtype, shape)
            })
            .collect();
        Ok(DecoderWriter {
            writer: CheckpointWriter::create(out, specs, options)?,
            config: config.clone(),
            kind,
        })
    }

    /// Writes one tensor (any dtype and device; converted).
    pub fn write(&self, name: &str, tensor: &Tensor) -> Result<()> {
        let data = tensor
            .detach()
            .to_device(Device::Cpu)
            .to_kind(self.kind)
            .contiguous();
        self.writer.write_tensor(name, &data)?;
        Ok(())
    }

    /// Writes the config (its dtype `files.dtype`), the files `files` names
    /// and the card, and moves the checkpoint into place.
    pub fn finish(self, card: &ModelCard, files: &SaveFiles) -> Result<PathBuf> {
        let mut config = self.config.to_model_config();
        config.set_dtype(files.dtype);
        Ok(self.writer.finish(Finish {
            config: &config,
            tokenizer_source: files.tokenizer_source,
            chat_template: files.chat_template,
            extra_files: files.extra_files,
            card,
        })?)
    }
}

/// A norm's scale and (LayerNorm) shift.
struct Norm {
    weight: Tensor,
    bias: Option<Tensor>,
}

struct Block {
    /// Attention input, attention output, MLP input, MLP output.
    norms: [Option<Norm>; 4],
    /// q, k, v; or one fused projection.
    qkv: Vec<LinearWeights>,
    qk_norm: Option<[Norm; 2]>,
    output: LinearWeights,
    /// gate, up; or one fused or ungated projection.
    mlp_input: Vec<LinearWeights>,
    mlp_output: LinearWeights,
}

/// A decoder-only causal language model of any supported family.
pub struct Decoder {
    pub config: DecoderConfig,
    pub vs: nn::VarStore,
    /// Empty when the part lacks the embeddings (and so for the final norm).
    embed: Tensor,
    /// Blocks `first_layer..first_layer + blocks.len()` of the whole model.
    blocks: Vec<Block>,
    first_layer: usize,
    final_norm: Norm,
    /// `None` when tied to the embeddings.
    head: Option<Tensor>,
}

impl Decoder {
    /// A freshly initialised model: weights N(0, 0.02²), biases 0, norms the
    /// identity. Each tensor's draws come from a stream keyed by (`seed`,
    /// tensor name), not from libtorch's global generator, so the result does
    /// not depend on what else runs in the process.
    pub fn new(config: DecoderConfig, device: Device, seed: u64) -> Self {
        let part = Part::whole(config.num_hidden_layers());
        Self::build(config, device, Some(seed), Kind::Float, &part)
    }

    /// The variables of `part` of the model, drawn from `seed` or zero (to be
    /// loaded into), in `kind`. Names and shapes come from
    /// [`DecoderConfig::parameters`].
    fn build(
        config: DecoderConfig,
        device: Device,
        seed: Option<u64>,
        kind: Kind,
        part: &Part,
    ) -> Self {
        Self::try_build(config, device, seed, kind, part)
            .unwrap_or_else(|e| panic!("allocating a model's variables: {e}"))
    }

    /// [`Decoder::build`], libtorch's failure to allocate a variable (a
    /// model larger than the memory) an error.
    fn try_build(
        config: DecoderConfig,
        device: Device,
        seed: Option<u64>,
        kind: Kind,
        part: &Part,
    ) -> Result<Self> {
        Self::build_variables(config, device, seed, kind, part)
            .map_err(|e| e.brief("cannot allocate the model's weights"))
    }

    fn build_variables(
        config: DecoderConfig,
        device: Device,
        seed: Option<u64>,
        kind: Kind,
        part: &Part,
    ) -> Result<Self> {
        let mut vs = nn::VarStore::new(device);
        // Variables are made in `kind` (never an F32 copy of a half model).
        vs.set_kind(kind);
        let unit_offset = config.architecture.layout.norm == NormKind::RmsUnitOffset;
        let mut vars: std::collections::HashMap<String, Tensor> = config
            .parameters()
            .into_iter()
            .filter(|p| part.holds(&config, &p.name))
            .map(|p| {
                let mut path = vs.root();
                let mut parts: Vec<&str> = p.name.split('.').collect();
                let leaf = parts.pop().expect("a dotted name");
                for part in parts {
                    path = &path / part;
                }
                let var = match (p.kind, seed) {
                    (ParameterRole::Norm, _) if !unit_offset => {
                        path.f_var(leaf, &p.shape, nn::Init::Const(1.0))
                    }
                    (ParameterRole::Weight, Some(seed)) => {
                        path.f_var_copy(leaf, &normal(&p.name, &p.shape, seed).f_to_device(device)?)
                    }
                    _ => path.f_zeros(leaf, &p.shape),
                };
                Ok((p.name, var?))
            })
            .collect::<Result<_>>()?;
        let mut take = |stem: &str, suffix: &str| vars.remove(&format!("{stem}.{suffix}"));
        let empty = || Tensor::zeros([0], (kind, device));
        let mut linear = |stem: &String| LinearWeights {
            weight: take(stem, "weight").unwrap_or_else(empty),
            bias: take(stem, "bias"),
        };
        let layout = config.architecture.layout;
        let embed = linear(&layout.embedding).weight;
        let blocks = part
            .layers
            .clone()
            .map(|i| {
                let names = config.block_names(i);
                let norm = |l: LinearWeights| Norm {
                    weight: l.weight,
                    bias: l.bias,
                };
                Block {
                    norms: names.norms.map(|n| n.as_ref().map(|n| norm(linear(n)))),
                    qkv: names.qkv.iter().map(&mut linear).collect(),
                    qk_norm: names
                        .qk_norm
                        .as_ref()
                        .map(|[q, k]| [norm(linear(q)), norm(linear(k))]),
                    output: linear(&names.output),
                    mlp_input: names.mlp_input.iter().map(&mut linear).collect(),
                    mlp_output: linear(&names.mlp_output),
                }
            })
            .collect();
        let final_norm = linear(&layout.final_norm);
        let head = (!config.tie_word_embeddings).then(|| linear(&layout.head[0]).weight);
        Ok(Decoder {
            config,
            vs,
            embed,
            blocks,
            first_layer: part.layers.start,
            final_norm: Norm {
                weight: final_norm.weight,
                bias: final_norm.bias,
            },
            head,
        })
    }

    /// Loads a Hugging Face checkpoint of any supported family (any float
    /// dtype; computed in F32).
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
        Self::load_as(dir, device, Kind::Float)
    }

    /// Loads a checkpoint computing in `kind` (F32, or BF16/F16 to halve the
    /// memory). The config is checked against the stored tensors' shapes
    /// before anything is allocated (a config claiming sizes the weights do
    /// not have is an error, not a huge allocation), and every stored tensor
    /// must be one the family's description places.
    pub fn load_as(dir: &Path, device: Device, kind: Kind) -> Result<Self> {
        Self::load_part(dir, device, kind, None)
    }

    /// [`Decoder::load_as`] reading only `part` of the model (`None`: all of
    /// it) — every stored tensor is still checked against the config, but
    /// only the part's are read.
    pub fn load_part(dir: &Path, device: Device, kind: Kind, part: Option<&Part>) -> Result<Self> {
        let checkpoint = Checkpoint::open(dir)?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &dir.join("config.json"))?;
        let whole = Part::whole(config.num_hidden_layers());
        let part = part.unwrap_or(&whole);
        if part.layers.end > whole.layers.end {
            return Err(NnError::Invalid(format!(
                "{}: blocks {:?} asked of a {}-layer model",
                dir.display(),
                part.layers,
                whole.layers.end
            )));
        }
        let layout = config.architecture.layout;
        let mut parameters = config.parameters();
        parameters.sort_by(|a, b| a.name.cmp(&b.name)); // the first mismatch reported is the same every time
        let invalid = |message: String| NnError::Invalid(format!("{}: {message}", dir.display()));
        let model_type = &config.architecture.model_type;
        // The head may be stored under an older name (GPT-NeoX's `embed_out`).
        let head_names: Vec<String> = layout.head.iter().map(|h| format!("{h}.weight")).collect();
        let stored_name = |name: &str| -> String {
            if name == head_names[0] {
                if let Some(found) = head_names.iter().find(|h| checkpoint.entry(h).is_ok()) {
                    return found.clone();
                }
            }
            name.to_owned()
        };
        let mut sources = Vec::with_capacity(parameters.len());
        for p in &parameters {
            let stored = stored_name(&p.name);
            let entry = checkpoint.entry(&stored).map_err(|_| {
                invalid(format!(
                    "no tensor {stored}, which a {model_type} model of this config has"
                ))
            })?;
            if entry
                .shape
                .iter()
                .map(|&d| d as i64)
                .ne(p.shape.iter().copied())
            {
                return Err(invalid(format!(
                    "tensor {stored} has shape {:?}, the config implies {:?}",
                    entry.shape, p.shape
                )));
            }
            sources.push((p.name.clone(), stored));
        }
        for entry in checkpoint.tensors() {
            let known = sources.iter().any(|(_, stored)| *stored == entry.name)
                || family::is_buffer(family::of(checkpoint.config()), &entry.name)
                || (head_names.contains(&entry.name) && config.tie_word_embeddings);
            if !known {
                return Err(invalid(format!(
                    "tensor {} is not part of a {model_type} model of this config",
                    entry.name
                )));
            }
        }
        let model = Decoder::try_build(config, device, None, kind, part)?;
        let variables = model.vs.variables();
        for (name, stored) in sources {
            let Some(variable) = variables.get(&name) else {
                continue; // outside the part
            };
            let tensor = checkpoint.read_as(&stored, kind)?;
            tch::no_grad(|| variable.shallow_clone().f_copy_(&tensor))?;
        }
        Ok(model)
    }

    /// A model of `config` holding `tensors` (Hugging Face names; every
    /// variable must be given with its shape).
    pub fn from_tensors(
        config: DecoderConfig,
        tensors: &std::collections::BTreeMap<String, Tensor>,
        device: Device,
    ) -> Result<Self> {
        let part = Part::whole(config.num_hidden_layers());
        let model = Decoder::try_build(config, device, None, Kind::Float, &part)?;
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

    /// [`Decoder::save`] with amalgam's byte tokenizer files beside the
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
        let files = SaveFiles {
            dtype: Dtype::F32,
            tokenizer_source,
            chat_template: None,
            extra_files,
        };
        self.save_as(out, card, &files, options)
    }

    /// Writes the model as a Hugging Face checkpoint in `files.dtype` (its
    /// config saying so) with the files `files` names, atomically.
    pub fn save_as(
        &self,
        out: &Path,
        card: &ModelCard,
        files: &SaveFiles,
        options: &WriteOptions,
    ) -> Result<PathBuf> {
        let writer = DecoderWriter::create(out, &self.config, files.dtype, options)?;
        let mut variables: Vec<(String, Tensor)> = self.vs.variables().into_iter().collect();
        variables.sort_by(|a, b| a.0.cmp(&b.0));
        for (name, tensor) in &variables {
            writer.write(name, tensor)?;
        }
        writer.finish(card, files)
    }

    pub fn device(&self) -> Device {
        self.vs.device()
    }

    /// The dtype the model computes in.
    pub fn kind(&self) -> Kind {
        self.embed.kind()
    }

    /// A copy of `part` of this model (which must hold it).
    pub fn part(&self, part: &Part) -> Decoder {
        let copy = Self::build(self.config.clone(), self.device(), None, Kind::Float, part);
        let source = self.vs.variables();
        tch::no_grad(|| {
            for (name, mut var) in copy.vs.variables() {
                var.copy_(&source[&name]);
            }
        });
        copy
    }

    /// A separate model made of blocks `layers` of this one (renumbered from
    /// 0), with its embeddings, final norm and head.
    pub fn sub_layers(&self, layers: std::ops::Range<usize>) -> Decoder {
        self.select_layers(&layers.collect::<Vec<_>>())
    }

    /// A separate model made of the blocks `kept` (indices into this one, in
    /// the order given, renumbered from 0), with its embeddings, final norm
    /// and head; each block keeps its width and sliding-window type.
    pub fn select_layers(&self, kept: &[usize]) -> Decoder {
        let mut config = self.config.clone();
        config.intermediate_sizes = kept.iter().map(|&l| config.intermediate_sizes[l]).collect();
        let arch = &mut config.architecture;
        if !arch.sliding_layers.is_empty() {
            arch.sliding_layers = kept.iter().map(|&l| arch.sliding_layers[l]).collect();
        }
        let part = Part::whole(config.num_hidden_layers());
        let sub = Self::build(config, self.device(), None, Kind::Float, &part);
        let layout = self.config.architecture.layout;
        let prefix = |i: usize| format!("{}.", layout.layers.replace("{i}", &i.to_string()));
        let source = self.vs.variables();
        tch::no_grad(|| {
            for (name, mut var) in sub.vs.variables() {
                let from = (0..kept.len())
                    .find_map(|i| {
                        let rest = name.strip_prefix(&prefix(i))?;
                        Some(format!("{}{rest}", prefix(kept[i])))
                    })
                    .unwrap_or_else(|| name.clone());
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
    /// units of layer `l` (MatFormer): those rows of the MLP's input
    /// projections (each half of a fused gate/up), those columns of its
    /// output. Gradients flow into those slices of the full weights.
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
    /// The widths must be valid (see [`Decoder::forward_nested`]).
    pub fn loss_nested(&self, ids: &Tensor, widths: Option<&[usize]>) -> Tensor {
        let seq = ids.size()[1];
        let logits = self.run(&ids.narrow(1, 0, seq - 1), None, widths);
        let targets = ids.narrow(1, 1, seq - 1);
        logits
            .reshape([-1, self.config.vocab_size as i64])
            .to_kind(Kind::Float)
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
        let layers = self.first_layer..self.first_layer + self.blocks.len();
        let x = self.run_blocks(x, layers, taps.as_deref_mut(), widths);
        if let Some(t) = taps {
            t.residual.push(x.shallow_clone());
        }
        self.head(&x)
    }

    /// The residual stream entering block 0: the token embeddings
    /// `[batch, seq, hidden]` (times √hidden where the family scales them).
    pub fn embed(&self, ids: &Tensor) -> Tensor {
        let x = Tensor::embedding(&self.embed, ids, -1, false, false);
        if self.config.architecture.layout.embedding_scaled {
            // The scale is rounded to the weights' dtype first, as transformers does.
            let scale = Tensor::from((self.config.hidden_size as f64).sqrt())
                .to_kind(x.kind())
                .to_device(x.device());
            x * scale
        } else {
            x
        }
    }

    /// Logits from the residual stream after the last block (final norm,
    /// head, the family's soft cap).
    pub fn head(&self, x: &Tensor) -> Tensor {
        let x = self.norm(&self.final_norm, x);
        let logits = x.linear::<Tensor>(self.head.as_ref().unwrap_or(&self.embed), None);
        match self.config.architecture.final_softcap {
            Some(cap) => soft_cap(&logits, cap),
            None => logits,
        }
    }

    /// Runs the blocks `layers` on the residual stream `x` entering the first
    /// of them (positions 0..seq); returns the stream leaving the last.
    pub fn blocks(&self, x: Tensor, layers: std::ops::Range<usize>) -> Tensor {
        self.run_blocks(x, layers, None, None)
    }

    /// [`Decoder::blocks`] with the activations of each block (the residual
    /// stream entering each, not the one leaving the last).
    pub fn blocks_taps(&self, x: Tensor, layers: std::ops::Range<usize>) -> (Tensor, Taps) {
        let mut taps = Taps::default();
        let x = self.run_blocks(x, layers, Some(&mut taps), None);
        (x, taps)
    }

    fn norm(&self, norm: &Norm, x: &Tensor) -> Tensor {
        let eps = self.config.norm_eps;
        let layout_norm = self.config.architecture.layout.norm;
        match layout_norm {
            NormKind::Rms => rms_norm(x, &norm.weight, eps),
            NormKind::RmsWeightInF32 | NormKind::RmsUnitOffset => {
                let kind = x.kind();
                let x = x.to_kind(Kind::Float);
                let variance = x.pow_tensor_scalar(2).mean_dim(-1, true, Kind::Float);
                // Out of place: `to_kind` of an F32 weight is the weight itself.
                let scale = norm.weight.to_kind(Kind::Float);
                let scale = if layout_norm == NormKind::RmsUnitOffset {
                    scale + 1.0
                } else {
                    scale
                };
                (x * (variance + eps).rsqrt() * scale).to_kind(kind)
            }
            NormKind::Layer => {
                let width = *x.size().last().expect("a tensor with dimensions");
                x.layer_norm([width], Some(&norm.weight), norm.bias.as_ref(), eps, true)
            }
        }
    }

    /// `x` through the block's norm in `slot` (0 attention input, 1 attention
    /// output, 2 MLP input, 3 MLP output), unchanged where there is none.
    fn block_norm(&self, block: &Block, slot: usize, x: &Tensor) -> Tensor {
        match &block.norms[slot] {
            Some(norm) => self.norm(norm, x),
            None => x.shallow_clone(),
        }
    }

    /// Queries, keys and values `[batch, seq, heads, head_dim]`, q/k normed
    /// where the family norms them.
    fn qkv(&self, block: &Block, h: &Tensor) -> [Tensor; 3] {
        let c = &self.config;
        let (batch, seq) = (h.size()[0], h.size()[1]);
        let (heads, kv, hd) = c.attention_sizes();
        let layout = c.architecture.layout;
        let flat = match layout.attention.qkv.row_split(heads, kv, hd) {
            RowSplit::Separate => block.qkv.iter().map(|p| p.apply(h)).collect(),
            fused => fused.split(&block.qkv[0].apply(h), -1),
        };
        let across = layout
            .attention
            .qk_norm
            .as_ref()
            .is_some_and(|n| n.across_heads);
        let [q, k, v]: [Tensor; 3] = flat.try_into().expect("three projections");
        let (q, k) = match &block.qk_norm {
            Some([qn, kn]) if across => (self.norm(qn, &q), self.norm(kn, &k)),
            _ => (q, k),
        };
        let q = q.view([batch, seq, heads, hd]);
        let k = k.view([batch, seq, kv, hd]);
        let v = v.view([batch, seq, kv, hd]);
        match &block.qk_norm {
            Some([qn, kn]) if !across => [self.norm(qn, &q), self.norm(kn, &k), v],
            _ => [q, k, v],
        }
    }

    /// The MLP's hidden units (act(gate)·up, or act(up)) at `width` units, and
    /// its output projection cut to them.
    fn mlp(&self, block: &Block, h: &Tensor, width: Option<i64>) -> (Tensor, LinearWeights) {
        let c = &self.config;
        let act = |x: Tensor| match c.architecture.activation {
            Activation::Silu => x.silu(),
            Activation::Gelu => x.gelu("none"),
            Activation::GeluTanh => x.gelu("tanh"),
            Activation::Relu => x.relu(),
        };
        let full = block.mlp_output.weight.size()[1];
        let m = width.unwrap_or(full);
        let input = match c.architecture.layout.mlp.input.row_split(full) {
            RowSplit::Separate => block.mlp_input.iter().map(|p| p.rows(0, m)).collect(),
            fused => block.mlp_input[0]
                .split(&fused)
                .iter()
                .map(|p| p.rows(0, m))
                .collect::<Vec<_>>(),
        };
        let hidden = match input.as_slice() {
            [gate, up] => act(gate.apply(h)) * up.apply(h),
            [up] => act(up.apply(h)),
            _ => unreachable!("an MLP has one or two input parts"),
        };
        (hidden, block.mlp_output.columns(m))
    }

    fn run_blocks(
        &self,
        mut x: Tensor,
        layers: std::ops::Range<usize>,
        mut taps: Option<&mut Taps>,
        widths: Option<&[usize]>,
    ) -> Tensor {
        let c = &self.config;
        let arch = &c.architecture;
        let (batch, seq) = (x.size()[0], x.size()[1]);
        let (heads, kv, hd) = c.attention_sizes();
        let rotary = rotary_dim(c.head_dim, arch.partial_rotary_factor) as i64;
        let global = rope_tables(
            c.rope_theta,
            c.rope_scaling.as_ref(),
            rotary,
            seq,
            self.device(),
        );
        let local = arch
            .local_rope_theta
            .map(|theta| rope_tables(theta, None, rotary, seq, self.device()));
        let scale = 1.0 / arch.query_scale.unwrap_or(c.head_dim as f64).sqrt();
        // Masks once per pass: the causal one only where soft caps need an
        // explicit mask, the sliding one only where the window is shorter
        // than the sequence.
        let full_mask = arch
            .attention_softcap
            .map(|_| allowed_positions(seq, None, self.device()));
        let sliding_mask = arch
            .sliding_window
            .map(|w| w as i64)
            .filter(|&w| w < seq)
            .map(|w| allowed_positions(seq, Some(w), self.device()));
        let held = self.first_layer..self.first_layer + self.blocks.len();
        assert!(
            layers.is_empty() || (held.contains(&layers.start) && layers.end <= held.end),
            "blocks {layers:?} asked of a model holding {held:?}"
        );
        for layer in layers {
            let block = &self.blocks[layer - self.first_layer];
            if let Some(t) = taps.as_deref_mut() {
                t.residual.push(x.shallow_clone());
            }
            let sliding = arch.slides(layer);
            let (cos, sin) = match &local {
                Some(tables) if sliding => tables,
                _ => &global,
            };
            let h = self.block_norm(block, 0, &x);
            let [q, k, v] = self.qkv(block, &h);
            let in_f32 = arch.layout.rope.in_f32;
            let q = rotate(&q.transpose(1, 2), cos, sin, in_f32);
            let k = rotate(&k.transpose(1, 2), cos, sin, in_f32);
            let v = v.transpose(1, 2);
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
            let mask = match &sliding_mask {
                Some(mask) if sliding => Some(mask),
                _ => full_mask.as_ref(),
            };
            let attended = attend(&q, &k, &v, scale, arch.attention_softcap, mask).transpose(1, 2);
            if let Some(t) = taps.as_deref_mut() {
                t.attention_heads.push(attended.shallow_clone());
            }
            let attended = attended.reshape([batch, seq, heads * hd]);
            let attention_out = self.block_norm(block, 1, &block.output.apply(&attended));
            let width = widths.map(|w| w[layer] as i64);
            // Out of place throughout: `+=` would change the tapped tensors and break autograd.
            if arch.parallel_residual {
                if let Some(t) = taps.as_deref_mut() {
                    t.mlp_stream.push(x.shallow_clone());
                }
                let (hidden, down) = self.mlp(block, &self.block_norm(block, 2, &x), width);
                if let Some(t) = taps.as_deref_mut() {
                    t.ffn_hidden.push(hidden.shallow_clone());
                }
                let mlp_out = self.block_norm(block, 3, &down.apply(&hidden));
                x = mlp_out + attention_out + &x;
            } else {
                x = &x + attention_out;
                if let Some(t) = taps.as_deref_mut() {
                    t.mlp_stream.push(x.shallow_clone());
                }
                let (hidden, down) = self.mlp(block, &self.block_norm(block, 2, &x), width);
                if let Some(t) = taps.as_deref_mut() {
                    t.ffn_hidden.push(hidden.shallow_clone());
                }
                x = &x + self.block_norm(block, 3, &down.apply(&hidden));
            }
        }
        x
    }
}

/// Which key positions each query may attend to `[seq, seq]`: itself and
/// earlier ones, within the last `window` where given.
fn allowed_positions(seq: i64, window: Option<i64>, device: Device) -> Tensor {
    let positions = Tensor::arange(seq, (Kind::Int64, device));
    let distance = positions.unsqueeze(1) - positions.unsqueeze(0);
    let causal = distance.ge(0);
    match window {
        Some(w) => causal.logical_and(&distance.lt(w)),
        None => causal,
    }
}

/// Attention of `q`, `k`, `v` `[batch, heads, seq, head_dim]`, scores scaled
/// by `scale` and soft-capped where the family caps them, within `allowed`
/// (see [`allowed_positions`]; `None`: plain causal, without a soft cap).
fn attend(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    softcap: Option<f64>,
    allowed: Option<&Tensor>,
) -> Tensor {
    match (softcap, allowed) {
        (None, None) => Tensor::scaled_dot_product_attention::<Tensor>(
            q,
            k,
            v,
            None,
            0.0,
            true,
            Some(scale),
            false,
        ),
        (None, Some(allowed)) => Tensor::scaled_dot_product_attention(
            q,
            k,
            v,
            Some(allowed),
            0.0,
            false,
            Some(scale),
            false,
        ),
        (Some(cap), allowed) => {
            let allowed = allowed.expect("a soft-capped attention is given its mask");
            let scores = soft_cap(&(q.matmul(&k.transpose(-2, -1)) * scale), cap);
            let scores = scores.masked_fill(&allowed.logical_not(), f64::NEG_INFINITY);
            scores.softmax(-1, Kind::Float).to_kind(q.kind()).matmul(v)
        }
    }
}

/// `cap · tanh(x / cap)`.
fn soft_cap(x: &Tensor, cap: f64) -> Tensor {
    (x / cap).tanh() * cap
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

/// RoPE with the half-split layout `transformers` uses on the first
/// `cos.size()[1]` dimensions of each head: x·cos + rotate_half(x)·sin; the
/// rest pass unrotated.
/// With `in_f32` the rotation runs in F32 and is rounded after; otherwise
/// cos and sin are rounded to `x`'s dtype first.
fn rotate(x: &Tensor, cos: &Tensor, sin: &Tensor, in_f32: bool) -> Tensor {
    let (dim, rotary) = (x.size()[3], cos.size()[1]);
    let x_rot = x.narrow(3, 0, rotary);
    let half = rotary / 2;
    let (x1, x2) = (x_rot.narrow(3, 0, half), x_rot.narrow(3, half, half));
    let rotated = Tensor::cat(&[-x2, x1], 3);
    let x_rot = if in_f32 {
        (x_rot * cos + rotated * sin).to_kind(x.kind())
    } else {
        let (cos, sin) = (cos.to_kind(x.kind()), sin.to_kind(x.kind()));
        x_rot * cos + rotated * sin
    };
    if rotary == dim {
        x_rot
    } else {
        Tensor::cat(&[x_rot, x.narrow(3, rotary, dim - rotary)], 3)
    }
}

/// cos and sin `[seq, rotary_dim]` for positions 0..seq (F32).
fn rope_tables(
    theta: f64,
    scaling: Option<&RopeScaling>,
    rotary_dim: i64,
    seq: i64,
    device: Device,
) -> (Tensor, Tensor) {
    let inv_freq: Vec<f32> = inverse_frequencies(theta, scaling, rotary_dim as usize)
        .into_iter()
        .map(|f| f as f32)
        .collect();
    let inv_freq = Tensor::from_slice(&inv_freq).to_device(device);
    let positions = Tensor::arange(seq, (Kind::Float, device));
    let freqs = positions.unsqueeze(1) * inv_freq.unsqueeze(0);
    let angles = Tensor::cat(&[&freqs, &freqs], 1);
    (angles.cos(), angles.sin())
}

/// θ^(−2i/d) per rotary pair, rescaled as the config's RoPE scaling says.
fn inverse_frequencies(theta: f64, scaling: Option<&RopeScaling>, dim: usize) -> Vec<f64> {
    let base: Vec<f64> = (0..dim / 2)
        .map(|i| {
            let exponent = f64::from((2 * i) as f32 / dim as f32);
            1.0 / theta.powf(exponent)
        })
        .collect();
    match scaling {
        None => base,
        Some(RopeScaling::Linear { factor }) => base.iter().map(|f| f / factor).collect(),
        Some(&RopeScaling::Llama3 {
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
