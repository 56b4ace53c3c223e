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

use amalgam_checkpoint::{staging_sibling, ModelCard, WriteOptions};
use amalgam_nn::eval::LanguageModel;
use amalgam_nn::{tokenizer, Llama};
use serde_json::{json, Value};
use tch::{Device, Tensor};

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
    pub anchors: Vec<Llama>,
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
    pub fn fit(anchors: Vec<Llama>, ids: &Tensor, ridge: f64) -> Result<Self> {
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
        let head = |a: &Llama| (a.config.vocab_size * a.config.hidden_size) as u64;
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
                let blocks = |a: &Llama, layers: std::ops::Range<usize>| -> (u64, u64) {
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
        let io = |path: &Path, e: std::io::Error| {
            ElasticError::Stitch(format!("{}: {e}", path.display()))
        };
        if out.exists()
            && std::fs::read_dir(out)
                .map_err(|e| io(out, e))?
                .next()
                .is_some()
            && !force
        {
            return Err(ElasticError::Stitch(format!(
                "{}: output directory exists and is not empty (pass --force to replace it)",
                out.display()
            )));
        }
        let staging = staging_sibling(out, "tmp");
        let result = self.write_into(&staging, card);
        if let Err(e) = result {
            let _ = std::fs::remove_dir_all(&staging);
            return Err(e);
        }
        if out.exists() {
            std::fs::remove_dir_all(out).map_err(|e| io(out, e))?;
        }
        std::fs::rename(&staging, out).map_err(|e| io(out, e))
    }

    fn write_into(&self, dir: &Path, card: &ModelCard) -> Result<()> {
        let io = |path: &Path, e: std::io::Error| {
            ElasticError::Stitch(format!("{}: {e}", path.display()))
        };
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        for (a, anchor) in self.anchors.iter().enumerate() {
            anchor
                .save(
                    &dir.join(format!("anchor-{a}")),
                    card,
                    &tokenizer::files(),
                    &WriteOptions::default(),
                )
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
        let text = std::fs::read(dir.join(FAMILY_FILE)).map_err(|e| bad(e.to_string()))?;
        let index: Value =
            serde_json::from_slice(&text).map_err(|e| bad(format!("not JSON: {e}")))?;
        if index["format"] != FORMAT || index["version"] != 1 {
            return Err(bad(format!("not a version-1 {FORMAT}")));
        }
        let anchors = (0..2)
            .map(|a| {
                Llama::load(&dir.join(format!("anchor-{a}")), device)
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

fn route_name(r: Route) -> String {
    format!("{}:{}-{}:{}", r.front, r.cut, r.end, r.resume)
}
