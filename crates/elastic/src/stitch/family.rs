//! A stitched family as one artifact, a directory:
//!
//! * `anchor-0/`, `anchor-1/` — the anchors, as Hugging Face checkpoints;
//! * `stitches.safetensors` — each stitched route's layer, as
//!   `{route}.weight` `[end width, front width]` and `{route}.bias`;
//! * `family.json` — `format` (`amalgam-stitched-family`), `version` (1) and
//!   `routes`: per network its `name`, `kind` (`anchor` or `stitched`), the
//!   anchor (`anchor`) or `front`, `cut`, `end`, `resume`, and its
//!   `parameters` and `flops_per_token`.
//!
//! Route names: `anchor-0`, `anchor-1`, and `F:C-E:R` for front anchor F's
//! first C blocks stitched into end anchor E from block R.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::{copy_checkpoint, Checkpoint, ModelCard, OutputDir, WriteOptions};
use amalgam_nn::calibration::CalibrationText;
use amalgam_nn::eval::LanguageModel;
use amalgam_nn::{Decoder, DecoderConfig, Part, SaveFiles};
use amalgam_recipe::StitchTraining;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::{json, Value};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Tensor};

use super::{stitched_logits, Route, Stitch};
use crate::{ElasticError, Result};

pub const FAMILY_FILE: &str = "family.json";
const FORMAT: &str = "amalgam-stitched-family";
const STITCHES_FILE: &str = "stitches.safetensors";

/// One network of the family.
pub enum Network {
    Anchor(usize),
    Stitched(Route, Stitch),
}

/// A named network with its size.
pub struct StitchedMember {
    pub name: String,
    pub network: Network,
    pub parameters: u64,
    /// Twice the weights its matrix products use per token (projections,
    /// FFNs, the stitch, the output head); attention scores excluded.
    pub flops_per_token: u64,
}

/// Anchors plus every stitched route between them.
pub struct StitchedFamily {
    pub anchors: Vec<Decoder>,
    pub members: Vec<StitchedMember>,
    /// Where each anchor's tokenizer files and stored dtype come from.
    pub dirs: Vec<PathBuf>,
}

/// How [`save_family`] writes an anchor.
pub enum AnchorOut<'a> {
    /// Copied from its checkpoint, one part at a time (never whole in memory).
    Checkpoint(&'a Path),
    /// Saved from memory (trained, or cut by an export) in the dtype and
    /// with the tokenizer files of the checkpoint `files_from`.
    Model {
        model: &'a Decoder,
        files_from: &'a Path,
    },
}

/// A member ready to score (see [`StitchedFamily::scorer`]).
pub struct MemberScorer<'f> {
    family: &'f StitchedFamily,
    member: &'f StitchedMember,
}

impl LanguageModel for MemberScorer<'_> {
    fn logits(&self, ids: &Tensor) -> Tensor {
        match &self.member.network {
            Network::Anchor(a) => self.family.anchors[*a].forward(ids),
            Network::Stitched(route, stitch) => {
                stitched_logits(&self.family.anchors, *route, stitch, ids)
            }
        }
    }
    fn vocab_size(&self) -> usize {
        self.family.anchors[0].config.vocab_size
    }
    fn device(&self) -> Device {
        self.family.anchors[0].device()
    }
}

impl StitchedMember {
    pub fn new(name: String, network: Network, configs: [&DecoderConfig; 2]) -> Self {
        let (parameters, flops_per_token) = size(configs, &network);
        StitchedMember {
            name,
            network,
            parameters,
            flops_per_token,
        }
    }
}

/// The members of a family of anchors of `configs`: the two anchors, then
/// each route with its stitch.
pub fn members(
    configs: [&DecoderConfig; 2],
    routes: &[Route],
    stitches: Vec<Stitch>,
) -> Vec<StitchedMember> {
    let anchors =
        (0..2).map(|a| StitchedMember::new(format!("anchor-{a}"), Network::Anchor(a), configs));
    let stitched = routes.iter().zip(stitches).map(|(&route, stitch)| {
        StitchedMember::new(route_name(route), Network::Stitched(route, stitch), configs)
    });
    anchors.chain(stitched).collect()
}

/// (parameters, FLOPs per token) of a network of anchors of `configs`.
fn size(configs: [&DecoderConfig; 2], network: &Network) -> (u64, u64) {
    let head = |c: &DecoderConfig| (c.vocab_size * c.hidden_size) as u64;
    match network {
        Network::Anchor(a) => {
            let config = configs[*a];
            let matrices: u64 = (0..config.num_hidden_layers())
                .map(|l| config.block_matrix_parameters(l) as u64)
                .sum();
            (
                config.parameter_count() as u64,
                2 * (matrices + head(config)),
            )
        }
        Network::Stitched(route, stitch) => {
            let (front, end) = (configs[route.front], configs[route.end]);
            let matrices = |c: &DecoderConfig, layers: std::ops::Range<usize>| -> u64 {
                layers.map(|l| c.block_matrix_parameters(l) as u64).sum()
            };
            let front_m = matrices(front, 0..route.cut);
            let end_m = matrices(end, route.resume..end.num_hidden_layers());
            let stitch_m = stitch.weight.numel() as u64;
            // The front's embedding and blocks (every stored tensor: biases
            // and the family's norms too), the stitch, the end's blocks,
            // final norm and output head (its tied embedding or lm_head).
            let front_part = Part {
                embedding: true,
                layers: 0..route.cut,
                head: false,
            };
            let end_part = Part {
                embedding: false,
                layers: route.resume..end.num_hidden_layers(),
                head: true,
            };
            let parameters = front_part.parameter_count(front)
                + stitch_m
                + stitch.bias.numel() as u64
                + end_part.parameter_count(end);
            (parameters, 2 * (front_m + stitch_m + end_m + head(end)))
        }
    }
}

/// What [`StitchedFamily::train`] holds at once, estimated from the configs alone:
/// both anchors whole (F32; with gradients and Adam's two moments when they
/// train), every block's activations of a batch and its logits (twice more
/// when distilling: the teacher's and the softmaxes), and each stitch
/// (`stitch_parameters` in all) with its gradient and moments.
pub fn training_memory(
    configs: [&DecoderConfig; 2],
    stitch_parameters: u64,
    train: &StitchTraining,
) -> u64 {
    let copies = if train.anchor_lr_scale > 0.0 { 4 } else { 1 };
    let blocks = |c: &DecoderConfig| c.block_forward_bytes(train.batch, train.seq_len);
    let logits = |c: &DecoderConfig| c.forward_bytes(train.batch, train.seq_len) - blocks(c);
    let teacher = match train.distill > 0.0 {
        true => configs.iter().map(|c| 2 * logits(c)).max().unwrap_or(0),
        false => 0,
    };
    configs.iter().fold(
        stitch_parameters.saturating_mul(16).saturating_add(teacher),
        |sum, c| {
            sum.saturating_add((c.num_hidden_layers() as u64).saturating_mul(blocks(c)))
                .saturating_add(logits(c))
                .saturating_add(c.weight_bytes().saturating_mul(copies))
        },
    )
}

impl StitchedFamily {
    fn configs(&self) -> [&DecoderConfig; 2] {
        [&self.anchors[0].config, &self.anchors[1].config]
    }

    /// SN-Net's training: each step samples one stitched route uniformly
    /// (and, when the anchors train too, the anchors among them) and takes
    /// an AdamW step on its next-token loss — the stitching layers at
    /// `options.lr`, the anchors at `options.lr × anchor_lr_scale` (0: frozen,
    /// so the anchors stay exactly the checkpoints they came from). With
    /// `options.distill` > 0 the loss mixes in distillation from the larger
    /// anchor (by parameters; its own steps are not distilled), as SN-Net
    /// trains with a teacher. `on_step(step, loss)` after every step with the
    /// next-token loss; returns those losses.
    /// Training windows come from `text` (the calibration's source).
    pub fn train(
        &mut self,
        options: &StitchTraining,
        text: &mut CalibrationText,
        on_step: &mut dyn FnMut(usize, f64),
    ) -> Result<Vec<f64>> {
        let torch = |e: tch::TchError| ElasticError::Stitch(format!("training: {e}"));
        let device = self.anchors[0].device();
        let stitch_vars = nn::VarStore::new(device);
        for (i, m) in self.members.iter_mut().enumerate() {
            if let Network::Stitched(_, stitch) = &mut m.network {
                stitch.weight = stitch_vars
                    .root()
                    .var_copy(&format!("weight_{i}"), &stitch.weight);
                stitch.bias = stitch_vars
                    .root()
                    .var_copy(&format!("bias_{i}"), &stitch.bias);
            }
        }
        let adamw = nn::AdamW {
            beta1: 0.9,
            beta2: 0.95,
            wd: 0.0,
            eps: 1e-8,
            amsgrad: false,
        };
        let mut optimizers = vec![adamw.build(&stitch_vars, options.lr).map_err(torch)?];
        let anchors_train = options.anchor_lr_scale > 0.0;
        for anchor in &mut self.anchors {
            if anchors_train {
                optimizers.push(
                    adamw
                        .build(&anchor.vs, options.lr * options.anchor_lr_scale)
                        .map_err(torch)?,
                );
            } else {
                // No gradients for weights that never step.
                anchor.vs.freeze();
            }
        }
        let candidates: Vec<usize> = (0..self.members.len())
            .filter(|&i| anchors_train || matches!(self.members[i].network, Network::Stitched(..)))
            .collect();
        let teacher = (0..self.anchors.len())
            .max_by_key(|&a| self.anchors[a].config.parameter_count())
            .expect("two anchors");
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(options.seed);
        let mut losses = Vec::with_capacity(options.steps);
        for step in 0..options.steps {
            let member = &self.members[candidates[rng.random_range(0..candidates.len())]];
            let ids = text.batch(options.batch, options.seq_len).to_device(device);
            let seq = options.seq_len as i64;
            let input = ids.narrow(1, 0, seq - 1);
            let logits = self.scorer(member).logits(&input);
            let logits = logits.reshape([-1, logits.size()[2]]);
            let next_token =
                logits.cross_entropy_for_logits(&ids.narrow(1, 1, seq - 1).reshape([-1]));
            let is_teacher = matches!(member.network, Network::Anchor(a) if a == teacher);
            let loss = if options.distill > 0.0 && !is_teacher {
                let target = tch::no_grad(|| self.anchors[teacher].forward(&input));
                let kd = distillation(&logits, &target.reshape(logits.size()), options.temperature);
                &next_token * (1.0 - options.distill) + kd * options.distill
            } else {
                next_token.shallow_clone()
            };
            // Only the parameters this network used get a step (optimizer 0
            // holds the stitches, 1 + a anchor a's weights).
            let used: Vec<usize> = match &member.network {
                Network::Stitched(route, _) => vec![0, 1 + route.front, 1 + route.end],
                Network::Anchor(a) => vec![1 + a],
            };
            let used: Vec<usize> = used.into_iter().filter(|&o| o < optimizers.len()).collect();
            for &o in &used {
                optimizers[o].zero_grad();
            }
            loss.backward();
            for &o in &used {
                optimizers[o].clip_grad_norm(1.0);
                optimizers[o].step();
            }
            let value = next_token.double_value(&[]);
            if !value.is_finite() || !loss.double_value(&[]).is_finite() {
                return Err(ElasticError::Stitch(format!(
                    "training diverged at step {step} ({value})"
                )));
            }
            losses.push(value);
            on_step(step, value);
        }
        for m in &mut self.members {
            if let Network::Stitched(_, stitch) = &mut m.network {
                stitch.weight = stitch.weight.detach();
                stitch.bias = stitch.bias.detach();
            }
        }
        Ok(losses)
    }

    /// One stitched route as a family of its own: the front anchor cut to
    /// the blocks the route runs, the end anchor to the blocks it resumes
    /// with, and the stitch — the same network (same logits), holding only
    /// what it uses. Anchors are already standalone checkpoints (`anchor-N/`).
    pub fn export(&self, name: &str) -> Result<StitchedFamily> {
        let member = self
            .member(name)
            .ok_or_else(|| ElasticError::Stitch(format!("no route {name:?} in the family")))?;
        let (route, stitch) = match &member.network {
            Network::Stitched(route, stitch) => (*route, stitch),
            Network::Anchor(a) => {
                return Err(ElasticError::Stitch(format!(
                    "{name} is an anchor, a checkpoint already (the family's anchor-{a}/)"
                )))
            }
        };
        let end = &self.anchors[route.end];
        let anchors = vec![
            self.anchors[route.front].sub_layers(0..route.cut),
            end.sub_layers(route.resume..end.config.intermediate_sizes.len()),
        ];
        let exported = Route {
            front: 0,
            cut: route.cut,
            end: 1,
            resume: 0,
        };
        let stitch = Stitch {
            weight: stitch.weight.copy(),
            bias: stitch.bias.copy(),
        };
        let configs = [&anchors[0].config, &anchors[1].config];
        let member = StitchedMember::new(
            name.to_owned(),
            Network::Stitched(exported, stitch),
            configs,
        );
        Ok(StitchedFamily {
            members: vec![member],
            dirs: [route.front, route.end]
                .iter()
                .filter_map(|&a| self.dirs.get(a).cloned())
                .collect(),
            anchors,
        })
    }

    pub fn member(&self, name: &str) -> Option<&StitchedMember> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn scorer<'f>(&'f self, member: &'f StitchedMember) -> MemberScorer<'f> {
        MemberScorer {
            family: self,
            member,
        }
    }

    /// Whether `dir` holds a stitched family.
    pub fn is_family(dir: &Path) -> bool {
        dir.join(FAMILY_FILE).is_file()
    }

    /// Writes the family to `out` (see [`save_family`]), each anchor saved
    /// from memory.
    pub fn save(&self, out: &Path, force: bool, card: &ModelCard) -> Result<()> {
        if self.dirs.len() != self.anchors.len() {
            return Err(ElasticError::Stitch(
                "the family does not say where its anchors' tokenizer files come from".into(),
            ));
        }
        let anchors = self
            .anchors
            .iter()
            .zip(&self.dirs)
            .map(|(model, dir)| AnchorOut::Model {
                model,
                files_from: dir,
            })
            .collect::<Vec<_>>();
        save_family(out, force, &anchors, &self.members, card)
    }

    /// Reads a family written by [`save_family`], its anchors computing in
    /// `kind` (F32, or BF16 to run every route in BF16).
    pub fn load(dir: &Path, device: Device, kind: tch::Kind) -> Result<Self> {
        let bad = |message: String| ElasticError::Model {
            path: dir.join(FAMILY_FILE),
            message,
        };
        let text = amalgam_checkpoint::read_regular(
            &dir.join(FAMILY_FILE),
            amalgam_checkpoint::MAX_JSON_BYTES,
            "a family index",
        )
        .map_err(|e| bad(e.to_string()))?;
        let index: Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if index["format"] != FORMAT || index["version"] != 1 {
            return Err(bad(format!("not a version-1 {FORMAT}")));
        }
        let dirs: Vec<PathBuf> = (0..2).map(|a| dir.join(format!("anchor-{a}"))).collect();
        let anchors = dirs
            .iter()
            .enumerate()
            .map(|(a, dir)| {
                Decoder::load_as(dir, device, kind).map_err(|e| bad(format!("anchor {a}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let stitches: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join(STITCHES_FILE))
                .map_err(|e| bad(format!("{STITCHES_FILE}: {e}")))?
                .into_iter()
                .collect();
        let mut family = StitchedFamily {
            anchors,
            members: vec![],
            dirs,
        };
        let routes = index["routes"]
            .as_array()
            .ok_or_else(|| bad("no `routes` list".into()))?;
        for entry in routes {
            let field = |key: &str| {
                entry[key]
                    .as_u64()
                    .map(|v| v as usize)
                    .ok_or_else(|| bad(format!("a route without `{key}`: {entry}")))
            };
            let name = entry["name"].as_str().unwrap_or_default().to_owned();
            let depth = |a: usize| {
                family
                    .anchors
                    .get(a)
                    .map(|m| m.config.intermediate_sizes.len())
            };
            let network = match entry["kind"].as_str() {
                Some("anchor") if depth(field("anchor")?).is_some() => {
                    Network::Anchor(field("anchor")?)
                }
                Some("stitched") => {
                    let route = Route {
                        front: field("front")?,
                        cut: field("cut")?,
                        end: field("end")?,
                        resume: field("resume")?,
                    };
                    let fits = matches!((depth(route.front), depth(route.end)),
                        (Some(f), Some(e)) if route.cut <= f && route.resume < e);
                    if !fits {
                        return Err(bad(format!(
                            "route {name} does not fit the anchors: {entry}"
                        )));
                    }
                    let tensor = |part: &str| {
                        stitches
                            .get(&format!("{name}.{part}"))
                            .map(|t| t.to_device(device))
                            .ok_or_else(|| {
                                bad(format!("route {name}: no {part} in {STITCHES_FILE}"))
                            })
                    };
                    Network::Stitched(
                        route,
                        Stitch {
                            weight: tensor("weight")?,
                            bias: tensor("bias")?,
                        },
                    )
                }
                _ => {
                    return Err(bad(format!(
                        "route {name}: unknown kind or anchor: {entry}"
                    )))
                }
            };
            let member = StitchedMember::new(name, network, family.configs());
            family.members.push(member);
        }
        Ok(family)
    }
}

/// Writes a family to `out`, built in a hidden sibling and renamed into
/// place when complete (a non-empty `out` is replaced only with `force`):
/// `anchor-0/`, `anchor-1/`, the stitches and the index.
pub fn save_family(
    out: &Path,
    force: bool,
    anchors: &[AnchorOut<'_>],
    members: &[StitchedMember],
    card: &ModelCard,
) -> Result<()> {
    // Nothing broken is written: a stitch with NaN or ±inf is an error.
    for m in members {
        if let Network::Stitched(_, stitch) = &m.network {
            let finite = |t: &Tensor| t.isfinite().all().int64_value(&[]) == 1;
            if !finite(&stitch.weight) || !finite(&stitch.bias) {
                return Err(ElasticError::Stitch(format!(
                    "route {}: its stitching layer holds NaN or infinite values (the \
                     calibration streams are not finite, or the least squares failed); \
                     nothing written",
                    m.name
                )));
            }
        }
    }
    // The anchors' checkpoints are inputs: the family is never written over,
    // into or around one (an export into its own family's directory included).
    let inputs: Vec<std::path::PathBuf> = anchors
        .iter()
        .map(|a| match a {
            AnchorOut::Checkpoint(from) => from.to_path_buf(),
            AnchorOut::Model { files_from, .. } => files_from.to_path_buf(),
        })
        .collect();
    let staged = OutputDir::create(out, force, &inputs)?;
    let dir = staged.staging();
    std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
    for (a, anchor) in anchors.iter().enumerate() {
        let path = dir.join(format!("anchor-{a}"));
        match anchor {
            // Bit for bit, one tensor in memory at a time.
            AnchorOut::Checkpoint(from) => Checkpoint::open(from)
                .and_then(|c| {
                    copy_checkpoint(&c, &path, None, &WriteOptions::default(), card, &|_| {})
                })
                .map(drop)
                .map_err(ElasticError::from),
            AnchorOut::Model { model, files_from } => {
                let dtype = Checkpoint::open(files_from)?.weights_dtype();
                let files = SaveFiles {
                    dtype,
                    tokenizer_source: Some(files_from),
                    chat_template: None,
                    extra_files: &[],
                };
                model
                    .save_as(&path, card, &files, &WriteOptions::default())
                    .map(drop)
                    .map_err(ElasticError::from)
            }
        }
        .map_err(|cause| ElasticError::SaveAnchor {
            anchor: a,
            cause: Box::new(cause),
        })?;
    }
    let mut tensors = vec![];
    let mut routes = vec![];
    for m in members {
        let mut entry = json!({
            "name": m.name,
            "parameters": m.parameters,
            "flops_per_token": m.flops_per_token,
        });
        match &m.network {
            Network::Anchor(a) => {
                entry["kind"] = "anchor".into();
                entry["anchor"] = (*a).into();
            }
            Network::Stitched(route, stitch) => {
                entry["kind"] = "stitched".into();
                entry["front"] = route.front.into();
                entry["cut"] = route.cut.into();
                entry["end"] = route.end.into();
                entry["resume"] = route.resume.into();
                tensors.push((format!("{}.weight", m.name), stitch.weight.shallow_clone()));
                tensors.push((format!("{}.bias", m.name), stitch.bias.shallow_clone()));
            }
        }
        routes.push(entry);
    }
    Tensor::write_safetensors(&tensors, dir.join(STITCHES_FILE))
        .map_err(|e| ElasticError::Stitch(format!("writing {STITCHES_FILE}: {e}")))?;
    let index = json!({"format": FORMAT, "version": 1, "routes": routes});
    let path = dir.join(FAMILY_FILE);
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&index).expect("JSON serialises"),
    )
    .map_err(|e| io(&path, e))?;
    staged.commit()?;
    Ok(())
}

fn io(path: &Path, e: std::io::Error) -> ElasticError {
    ElasticError::Stitch(format!("{}: {e}", path.display()))
}

fn route_name(r: Route) -> String {
    format!("{}:{}-{}:{}", r.front, r.cut, r.end, r.resume)
}

/// Knowledge distillation's loss: `T² · KL(softmax(target/T) ‖
/// softmax(logits/T))` per position, averaged over positions (`[positions,
/// vocab]` both); T² keeps its gradients on the next-token loss's scale.
fn distillation(logits: &Tensor, target: &Tensor, temperature: f64) -> Tensor {
    let kind = tch::Kind::Float;
    let student = (logits / temperature).log_softmax(-1, kind);
    let teacher = (target / temperature).log_softmax(-1, kind);
    let kl = (teacher.exp() * (&teacher - student)).sum_dim_intlist(-1, false, kind);
    kl.mean(kind) * (temperature * temperature)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distillation_is_the_scaled_kl_divergence() {
        tch::manual_seed(0);
        let logits = Tensor::randn([3, 5], (tch::Kind::Float, Device::Cpu));
        let target = Tensor::randn([3, 5], (tch::Kind::Float, Device::Cpu)) * 2.0;
        let rows = |t: &Tensor| -> Vec<Vec<f64>> {
            Vec::<Vec<f64>>::try_from(t.to_kind(tch::Kind::Double)).unwrap()
        };
        for temperature in [1.0, 2.0] {
            let expected: f64 = rows(&logits)
                .iter()
                .zip(rows(&target))
                .map(|(s, t)| {
                    let softmax = |x: &[f64]| {
                        let z: Vec<f64> = x.iter().map(|v| (v / temperature).exp()).collect();
                        let sum: f64 = z.iter().sum();
                        z.into_iter().map(|v| v / sum).collect::<Vec<f64>>()
                    };
                    let (p, q) = (softmax(&t), softmax(s));
                    p.iter().zip(&q).map(|(p, q)| p * (p / q).ln()).sum::<f64>()
                })
                .sum::<f64>()
                / 3.0
                * temperature
                * temperature;
            let got = distillation(&logits, &target, temperature).double_value(&[]);
            assert!(
                (got - expected).abs() < 1e-5,
                "T {temperature}: {got} vs {expected}"
            );
        }
        let same = distillation(&logits, &logits, 1.0).double_value(&[]);
        assert!(same.abs() < 1e-6, "{same}");
    }
}
