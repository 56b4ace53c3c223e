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

use std::path::Path;

use amalgam_checkpoint::{ModelCard, OutputDir};
use amalgam_nn::data::{Domain, Sampler, Split};
use amalgam_nn::eval::LanguageModel;
use amalgam_nn::Decoder;
use amalgam_recipe::StitchTraining;
use rand::{Rng, SeedableRng};
use rand_xoshiro::Xoshiro256PlusPlus;
use serde_json::{json, Value};
use tch::nn::OptimizerConfig;
use tch::{nn, Device, Tensor};

use super::{calibrate, family_routes, stitched_logits, Route, Stitch};
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
pub struct Member {
    pub name: String,
    pub network: Network,
    pub parameters: u64,
    /// Twice the weights its matrix products use per token (projections,
    /// FFNs, the stitch, the output head); attention scores excluded.
    pub flops_per_token: u64,
}

/// Anchors plus every stitched route between them.
pub struct Family {
    pub anchors: Vec<Decoder>,
    pub members: Vec<Member>,
}

/// A member ready to score (see [`Family::scorer`]).
pub struct Scorer<'f> {
    family: &'f Family,
    member: &'f Member,
}

impl LanguageModel for Scorer<'_> {
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

impl Family {
    /// Joins two anchors (same vocabulary) with least-squares stitches fitted
    /// on the calibration batch `ids`.
    pub fn fit(anchors: Vec<Decoder>, ids: &Tensor, ridge: f64) -> Result<Self> {
        if anchors.len() != 2 || anchors[0].config.vocab_size != anchors[1].config.vocab_size {
            return Err(ElasticError::Stitch(
                "a family joins two anchors with the same vocabulary".into(),
            ));
        }
        let routes = family_routes(&anchors);
        if routes.is_empty() {
            return Err(ElasticError::Stitch(
                "no stitch positions: each anchor needs at least two blocks".into(),
            ));
        }
        let stitches = calibrate(&anchors, &routes, ids, ridge)?;
        let mut family = Family {
            anchors,
            members: vec![],
        };
        for a in 0..family.anchors.len() {
            family.push(format!("anchor-{a}"), Network::Anchor(a));
        }
        for (route, stitch) in routes.into_iter().zip(stitches) {
            family.push(route_name(route), Network::Stitched(route, stitch));
        }
        Ok(family)
    }

    fn push(&mut self, name: String, network: Network) {
        let (parameters, flops_per_token) = self.size(&network);
        self.members.push(Member {
            name,
            network,
            parameters,
            flops_per_token,
        });
    }

    /// (parameters, FLOPs per token) of a network.
    fn size(&self, network: &Network) -> (u64, u64) {
        let head = |a: &Decoder| (a.config.vocab_size * a.config.hidden_size) as u64;
        match network {
            Network::Anchor(a) => {
                let config = &self.anchors[*a].config;
                let matrices: u64 = (0..config.intermediate_sizes.len())
                    .map(|l| config.block_matrix_parameters(l) as u64)
                    .sum();
                (
                    config.parameter_count() as u64,
                    2 * (matrices + head(&self.anchors[*a])),
                )
            }
            Network::Stitched(route, stitch) => {
                let (front, end) = (&self.anchors[route.front], &self.anchors[route.end]);
                let blocks = |a: &Decoder, layers: std::ops::Range<usize>| -> (u64, u64) {
                    layers.fold((0, 0), |(p, m), l| {
                        let matrices = a.config.block_matrix_parameters(l) as u64;
                        (p + matrices + 2 * a.config.hidden_size as u64, m + matrices)
                    })
                };
                let (front_p, front_m) = blocks(front, 0..route.cut);
                let end_layers = end.config.intermediate_sizes.len();
                let (end_p, end_m) = blocks(end, route.resume..end_layers);
                let stitch_m = stitch.weight.numel() as u64;
                // The front's embedding, its blocks, the stitch, the end's
                // blocks, final norm and output head (its tied embedding or
                // lm_head: one V × H matrix either way).
                let parameters = head(front)
                    + front_p
                    + stitch_m
                    + stitch.bias.numel() as u64
                    + end_p
                    + end.config.hidden_size as u64
                    + head(end);
                (parameters, 2 * (front_m + stitch_m + end_m + head(end)))
            }
        }
    }

    /// SN-Net's training: each step samples one stitched route uniformly
    /// (and, when the anchors train too, the anchors among them) and takes
    /// an AdamW step on its next-token loss — the stitching layers at
    /// `options.lr`, the anchors at `options.lr × anchor_lr_scale` (0: frozen,
    /// so the anchors stay exactly the checkpoints they came from).
    /// `on_step(step, loss)` after every step; returns the losses.
    pub fn train(
        &mut self,
        options: &StitchTraining,
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
        if anchors_train {
            for anchor in &self.anchors {
                optimizers.push(
                    adamw
                        .build(&anchor.vs, options.lr * options.anchor_lr_scale)
                        .map_err(torch)?,
                );
            }
        }
        let candidates: Vec<usize> = (0..self.members.len())
            .filter(|&i| anchors_train || matches!(self.members[i].network, Network::Stitched(..)))
            .collect();
        let mut rng = Xoshiro256PlusPlus::seed_from_u64(options.seed);
        let mut sampler = Sampler::new(&Domain::ALL, Split::Train, options.seed);
        let mut losses = Vec::with_capacity(options.steps);
        for step in 0..options.steps {
            let member = &self.members[candidates[rng.random_range(0..candidates.len())]];
            let ids = sampler.batch(options.batch, options.seq_len, device);
            let seq = options.seq_len as i64;
            let logits = self.scorer(member).logits(&ids.narrow(1, 0, seq - 1));
            let loss = logits
                .reshape([-1, logits.size()[2]])
                .cross_entropy_for_logits(&ids.narrow(1, 1, seq - 1).reshape([-1]));
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
            let value = loss.double_value(&[]);
            if !value.is_finite() {
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
    pub fn export(&self, name: &str) -> Result<Family> {
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
        let mut family = Family {
            anchors,
            members: vec![],
        };
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
        family.push(name.to_owned(), Network::Stitched(exported, stitch));
        Ok(family)
    }

    pub fn member(&self, name: &str) -> Option<&Member> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn scorer<'f>(&'f self, member: &'f Member) -> Scorer<'f> {
        Scorer {
            family: self,
            member,
        }
    }

    /// Whether `dir` holds a stitched family.
    pub fn is_family(dir: &Path) -> bool {
        dir.join(FAMILY_FILE).is_file()
    }

    /// Writes the family to `out`, built in a hidden sibling and renamed
    /// into place when complete; a non-empty `out` is replaced only with `force`.
    pub fn save(&self, out: &Path, force: bool, card: &ModelCard) -> Result<()> {
        let dir = OutputDir::create(out, force, &[])?;
        self.write_into(dir.staging(), card)?;
        dir.commit()?;
        Ok(())
    }

    fn write_into(&self, dir: &Path, card: &ModelCard) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for (a, anchor) in self.anchors.iter().enumerate() {
            anchor
                .save_with_tokenizer(&dir.join(format!("anchor-{a}")), card)
                .map_err(|e| ElasticError::Stitch(format!("saving anchor {a}: {e}")))?;
        }
        let mut tensors = vec![];
        let mut routes = vec![];
        for m in &self.members {
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
        .map_err(|e| io(&path, e))
    }

    /// Reads a family written by [`Family::save`].
    pub fn load(dir: &Path, device: Device) -> Result<Self> {
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
        let anchors = (0..2)
            .map(|a| {
                Decoder::load(&dir.join(format!("anchor-{a}")), device)
                    .map_err(|e| bad(format!("anchor {a}: {e}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let stitches: std::collections::HashMap<String, Tensor> =
            Tensor::read_safetensors(dir.join(STITCHES_FILE))
                .map_err(|e| bad(format!("{STITCHES_FILE}: {e}")))?
                .into_iter()
                .collect();
        let mut family = Family {
            anchors,
            members: vec![],
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
            family.push(name, network);
        }
        Ok(family)
    }
}

fn io(path: &Path, e: std::io::Error) -> ElasticError {
    ElasticError::Stitch(format!("{}: {e}", path.display()))
}

fn route_name(r: Route) -> String {
    format!("{}:{}-{}:{}", r.front, r.cut, r.end, r.resume)
}
