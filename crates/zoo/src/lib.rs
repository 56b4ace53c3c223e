//! The model zoo: small Llama models trained here on the corpus, for the
//! merging, PLeaS, MatFormer and stitching experiments.
//!
//! | member | how it is made | used for |
//! |---|---|---|
//! | `base` | trained on the mixture of the general domains (init seed 1) | the shared base; an anchor |
//! | `expert-<domain>` | `base` fine-tuned on one domain | task-vector merges |
//! | `init-b` | the base's shape and data, init seed 2 | PLeaS (with `base`) |
//! | `init-b-code` | `init-b` fine-tuned on code | PLeaS (with `expert-prose`: experts from different bases) |
//! | `anchor-small` | narrower and shallower, same data | stitching (with `base`) |
//! | `matformer` | the base's shape, init and data, trained with the nested MatFormer loss | extraction |
//! | `baseline-{s,m,l}` | FFNs at 1/8, 1/4, 1/2 of the base's, trained like it | MatFormer's comparison |
//!
//! | `study-<domain>` | `base` fine-tuned on one study domain (german, c, spanish, perl), which it never saw | the merging study |
//! | `multitask-<k>` | `base` fine-tuned on the first k study domains together, k × an expert's steps | the study's upper reference |
//! | `base-short` | trained like `base` for a quarter of its steps | the study's weaker base |
//! | `base-long` | `base` trained for a second schedule at half the rate | the study's stronger base |
//! | `short-study-<domain>`, `long-study-<domain>` | `base-short`, `base-long` fine-tuned like `study-<domain>` | merges from a weaker and a stronger base |
//! | `anchor-small-long` | `anchor-small` trained further as `base-long` is | stitching anchors trained further |
//! | `deep-narrow`, `deep-wide` | one depth (twice the base's), two widths (half the base's and the base's), same data and schedule | stitching anchors of one family, as SN-Net's |
//!
//! The members come in sets ([`ZooSet`]): `merging` (base, experts, init-b, init-b-code,
//! anchor-small), `matformer` (base — the full-width baseline — matformer
//! and the three narrower baselines), `study` (base, the study experts,
//! the multitask models, base-short, base-long and their experts) and
//! `stitching` (base and anchor-small, both trained further, and the deep pair).
//! Each member is a normal Hugging Face checkpoint directory with the byte
//! tokenizer beside it, plus `zoo-member.json` recording how it was made. A
//! member whose record matches the current recipe (size, corpus, code
//! version) is reused, so `zoo build` trains only what is missing.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_checkpoint::{ModelCard, WriteOptions};
use serde_json::json;
use tch::Device;

use amalgam_nn::data::{Domain, Sampler, Split};
use amalgam_nn::eval::EvalOptions;
use amalgam_nn::train::{train, TrainOptions};
use amalgam_nn::{tokenizer, Architecture, Decoder, DecoderConfig, NnError, Result, GRANULARITIES};

/// Bump when training changes in a way that invalidates cached members.
const RECIPE_VERSION: u32 = 2;

/// The merging study's experts' domains, in the order the 2-, 3- and
/// 4-expert merges take them; the other study domains are held out.
pub const STUDY_EXPERTS: [Domain; 4] = [Domain::German, Domain::C, Domain::Spanish, Domain::Perl];

/// The zoo at one scale.
#[derive(Debug, Clone)]
pub struct ZooSize {
    pub name: &'static str,
    pub shape: DecoderConfig,
    pub small_anchor: DecoderConfig,
    /// Stitching anchors of one depth at two widths (narrow, wide).
    pub deep_anchors: [DecoderConfig; 2],
    pub pretrain: TrainOptions,
    pub finetune: TrainOptions,
    /// How the zoo's models are evaluated (windows of the pretraining length).
    pub eval: EvalOptions,
}

fn shape(hidden: usize, layers: usize, heads: usize, kv: usize, ffn: usize) -> DecoderConfig {
    DecoderConfig {
        vocab_size: tokenizer::VOCAB_SIZE,
        hidden_size: hidden,
        intermediate_sizes: vec![ffn; layers],
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim: hidden / heads,
        norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        max_position_embeddings: 1024,
        bos_token_id: Some(tokenizer::BOS),
        eos_token_id: Some(tokenizer::EOS),
        architecture: Architecture::llama(),
    }
}

fn schedule(steps: usize, batch: usize, seq_len: usize, lr: f64) -> TrainOptions {
    TrainOptions {
        steps,
        batch,
        seq_len,
        lr,
        warmup: steps / 10,
        final_lr_fraction: 0.1,
        weight_decay: 0.1,
        clip: 1.0,
        nested: vec![],
    }
}

impl ZooSize {
    /// `micro` (seconds; for CI) or `small` (minutes; the book's results).
    pub fn named(name: &str) -> Option<ZooSize> {
        match name {
            "micro" => Some(ZooSize {
                name: "micro",
                shape: shape(32, 2, 4, 2, 96),
                // Two blocks: stitching needs a cut strictly inside each anchor.
                small_anchor: shape(16, 2, 2, 1, 48),
                deep_anchors: [shape(16, 4, 2, 1, 48), shape(32, 4, 4, 2, 96)],
                pretrain: schedule(400, 8, 65, 3e-3),
                finetune: schedule(120, 8, 65, 1e-3),
                eval: EvalOptions {
                    seq_len: 65,
                    max_windows: 32,
                    batch: 16,
                },
            }),
            "small" => Some(ZooSize {
                name: "small",
                shape: shape(128, 4, 4, 2, 384),
                small_anchor: shape(96, 3, 4, 2, 256),
                deep_anchors: [shape(64, 8, 4, 2, 192), shape(128, 8, 4, 2, 384)],
                pretrain: schedule(2000, 16, 129, 2e-3),
                finetune: schedule(300, 16, 129, 2e-4),
                eval: EvalOptions {
                    seq_len: 129,
                    max_windows: 256,
                    batch: 32,
                },
            }),
            _ => None,
        }
    }

    /// The members of `set`, in build order (a parent before its children).
    pub fn members(&self, set: ZooSet) -> Vec<ZooMember> {
        let mixture = Domain::GENERAL.to_vec();
        let base = ZooMember {
            name: "base".into(),
            shape: self.shape.clone(),
            init_seed: 1,
            parent: None,
            domains: mixture.clone(),
            options: self.pretrain.clone(),
        };
        match set {
            ZooSet::Matformer => return self.matformer_members(base),
            ZooSet::Study => return self.study_members(base),
            ZooSet::Stitching => return self.stitching_members(base),
            ZooSet::Merging => {}
        }
        let mut members = vec![base];
        for &domain in Domain::GENERAL {
            members.push(ZooMember {
                name: format!("expert-{}", domain.name()),
                shape: self.shape.clone(),
                init_seed: 1,
                parent: Some("base".into()),
                domains: vec![domain],
                options: self.finetune.clone(),
            });
        }
        members.push(ZooMember {
            name: "init-b".into(),
            shape: self.shape.clone(),
            init_seed: 2,
            parent: None,
            domains: mixture,
            options: self.pretrain.clone(),
        });
        // An expert from the other base: PLeaS merges it with expert-prose.
        members.push(ZooMember {
            name: "init-b-code".into(),
            shape: self.shape.clone(),
            init_seed: 2,
            parent: Some("init-b".into()),
            domains: vec![Domain::Code],
            options: self.finetune.clone(),
        });
        members.push(self.anchor_small());
        members
    }

    /// The small stitching anchor: narrower and shallower than `base`, same
    /// data and schedule.
    fn anchor_small(&self) -> ZooMember {
        ZooMember {
            name: "anchor-small".into(),
            shape: self.small_anchor.clone(),
            init_seed: 3,
            parent: None,
            domains: Domain::GENERAL.to_vec(),
            options: self.pretrain.clone(),
        }
    }

    /// Both stitching pairs: base and anchor-small with each trained further,
    /// and the deep pair of one depth at two widths (SN-Net's anchors are one
    /// family).
    fn stitching_members(&self, base: ZooMember) -> Vec<ZooMember> {
        let small = self.anchor_small();
        let (base_long, small_long) = (trained_further(&base), trained_further(&small));
        let deep = |name: &str, shape: &DecoderConfig, init_seed| ZooMember {
            name: name.into(),
            shape: shape.clone(),
            init_seed,
            ..base.clone()
        };
        let [narrow, wide] = &self.deep_anchors;
        let deep_pair = [deep("deep-narrow", narrow, 4), deep("deep-wide", wide, 5)];
        [base, small, base_long, small_long]
            .into_iter()
            .chain(deep_pair)
            .collect()
    }

    /// The study's experts on domains `base` never saw, the multitask models
    /// over the first 2, 3 and 4 of them, and a shorter- and a longer-trained
    /// base with their own experts.
    fn study_members(&self, base: ZooMember) -> Vec<ZooMember> {
        let fine_tune = |name: String, parent: &str, domains: Vec<Domain>| {
            let mut options = self.finetune.clone();
            options.steps *= domains.len();
            options.warmup *= domains.len();
            ZooMember {
                name,
                shape: self.shape.clone(),
                init_seed: 1,
                parent: Some(parent.into()),
                domains,
                options,
            }
        };
        let mut short = base.clone();
        short.name = "base-short".into();
        short.options.steps /= 4;
        short.options.warmup /= 4;
        let long = trained_further(&base);
        let mut members = vec![base];
        for d in STUDY_EXPERTS {
            members.push(fine_tune(format!("study-{}", d.name()), "base", vec![d]));
        }
        for k in 2..=STUDY_EXPERTS.len() {
            let domains = STUDY_EXPERTS[..k].to_vec();
            members.push(fine_tune(format!("multitask-{k}"), "base", domains));
        }
        for (other, prefix) in [(short, "short"), (long, "long")] {
            let parent = other.name.clone();
            members.push(other);
            for d in STUDY_EXPERTS {
                let name = format!("{prefix}-study-{}", d.name());
                members.push(fine_tune(name, &parent, vec![d]));
            }
        }
        members
    }

    /// The MatFormer model and one independently trained model per
    /// granularity; the base, trained with the same data budget and init, is
    /// the full-width baseline.
    fn matformer_members(&self, base: ZooMember) -> Vec<ZooMember> {
        let mut nested = base.clone();
        nested.name = "matformer".into();
        nested.options.nested = GRANULARITIES.iter().map(|g| g.1).collect();
        let mut members = vec![base.clone(), nested];
        for (name, fraction) in &GRANULARITIES[..GRANULARITIES.len() - 1] {
            let mut baseline = base.clone();
            baseline.name = format!("baseline-{}", name.to_lowercase());
            baseline.shape.intermediate_sizes = self.shape.nested_widths(*fraction);
            members.push(baseline);
        }
        members
    }
}

/// `member` trained for a second schedule on its data at half the rate:
/// `NAME-long`.
fn trained_further(member: &ZooMember) -> ZooMember {
    let mut long = member.clone();
    long.name = format!("{}-long", member.name);
    long.parent = Some(member.name.clone());
    long.options.lr /= 2.0;
    long
}

/// A group of zoo members built together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZooSet {
    /// base, the domain experts, init-b, init-b-code and anchor-small.
    Merging,
    /// base, matformer and the per-granularity baselines.
    Matformer,
    /// base, the study experts, the multitask models, base-short, base-long and their experts.
    Study,
    /// base, anchor-small, both trained further, deep-narrow and deep-wide.
    Stitching,
}

impl ZooSet {
    pub const NAMES: &'static str = "merging, matformer, study or stitching";

    pub fn named(name: &str) -> Option<ZooSet> {
        match name {
            "merging" => Some(ZooSet::Merging),
            "matformer" => Some(ZooSet::Matformer),
            "study" => Some(ZooSet::Study),
            "stitching" => Some(ZooSet::Stitching),
            _ => None,
        }
    }
}

/// One model of the zoo and how it is trained.
#[derive(Debug, Clone)]
pub struct ZooMember {
    pub name: String,
    pub shape: DecoderConfig,
    pub init_seed: u64,
    /// Fine-tuned from this member; trained from scratch when `None`.
    pub parent: Option<String>,
    pub domains: Vec<Domain>,
    pub options: TrainOptions,
}

impl ZooMember {
    /// Identifies everything the weights depend on (the cache key): the
    /// recipe, the text it trains on and the parent's key.
    fn key(&self, size: &str, parent_key: Option<&str>) -> String {
        let corpus = self.domains.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, d| {
            fnv1a(h, d.text().as_bytes())
        });
        let recipe = format!(
            "v{RECIPE_VERSION} {size} {self:?} corpus {corpus:016x} parent {parent_key:?} threads {}",
            tch::get_num_threads()
        );
        format!("{:016x}", fnv1a(0xcbf2_9ce4_8422_2325, recipe.as_bytes()))
    }

    fn summary(&self) -> String {
        let domains: Vec<&str> = self.domains.iter().map(|d| d.name()).collect();
        let how = match &self.parent {
            Some(parent) => format!("fine-tuned from the zoo's `{parent}`"),
            None => format!(
                "trained from a random initialisation (seed {})",
                self.init_seed
            ),
        };
        format!(
            "A {}-parameter Llama-style model {how} on the amalgam corpus ({}) for {} steps of {} × {} tokens, byte-level tokenizer.",
            self.shape.parameter_count(),
            domains.join(", "),
            self.options.steps,
            self.options.batch,
            self.options.seq_len
        )
    }
}

fn fnv1a(mut hash: u64, bytes: &[u8]) -> u64 {
    for &b in bytes {
        hash = (hash ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    hash
}

/// Progress of a zoo build, for the caller's display.
pub enum ZooEvent<'a> {
    /// A member is up to date and reused.
    Cached {
        member: &'a str,
    },
    Start {
        member: &'a str,
        steps: usize,
    },
    Step {
        step: usize,
        loss: f64,
    },
    Done {
        member: &'a str,
        seconds: f64,
        final_loss: f64,
    },
}

/// Trains every member of `set` at `size` missing from `dir` (or out of date) and
/// returns the members' directories.
pub fn build(
    dir: &Path,
    size: &ZooSize,
    set: ZooSet,
    device: Device,
    on_event: &mut dyn FnMut(ZooEvent<'_>),
) -> Result<Vec<(String, PathBuf)>> {
    std::fs::create_dir_all(dir)
        .map_err(|e| NnError::Invalid(format!("{}: {e}", dir.display())))?;
    let mut built = vec![];
    let mut keys: std::collections::HashMap<String, String> = std::collections::HashMap::new();
    for member in size.members(set) {
        let out = dir.join(&member.name);
        let parent_key = member.parent.as_ref().map(|p| keys[p].clone());
        let key = member.key(size.name, parent_key.as_deref());
        keys.insert(member.name.clone(), key.clone());
        let record_path = out.join("zoo-member.json");
        let cached = std::fs::read(&record_path)
            .ok()
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok())
            .is_some_and(|record| record["key"] == key.as_str());
        if cached {
            on_event(ZooEvent::Cached {
                member: &member.name,
            });
            built.push((member.name, out));
            continue;
        }
        on_event(ZooEvent::Start {
            member: &member.name,
            steps: member.options.steps,
        });
        let started = Instant::now();
        let mut model = match &member.parent {
            Some(parent) => Decoder::load(&dir.join(parent), device)?,
            None => Decoder::new(member.shape.clone(), device, member.init_seed),
        };
        let data_seed = fnv1a(member.init_seed, member.name.as_bytes());
        let mut sampler = Sampler::new(&member.domains, Split::Train, data_seed);
        let losses = train(
            &mut model,
            &mut sampler,
            &member.options,
            &mut |step, loss| on_event(ZooEvent::Step { step, loss }),
        )?;
        let tail = &losses[losses.len().saturating_sub(20)..];
        let final_loss = tail.iter().sum::<f64>() / tail.len().max(1) as f64;
        let seconds = started.elapsed().as_secs_f64();
        let record = json!({
            "key": key,
            "zoo_size": size.name,
            "member": member.name,
            "parent": member.parent,
            "domains": member.domains.iter().map(|d| d.name()).collect::<Vec<_>>(),
            "init_seed": member.init_seed,
            "steps": member.options.steps,
            "batch": member.options.batch,
            "seq_len": member.options.seq_len,
            "lr": member.options.lr,
            "parameters": member.shape.parameter_count(),
            "final_train_loss": final_loss,
            "seconds": seconds,
        });
        let mut files = tokenizer::files();
        files.push((
            "zoo-member.json",
            serde_json::to_vec_pretty(&record).expect("JSON serialises"),
        ));
        let card = ModelCard {
            title: format!("amalgam zoo ({}) {}", size.name, member.name),
            summary: member.summary(),
            ..Default::default()
        };
        let options = WriteOptions {
            force: true,
            ..Default::default()
        };
        model.save(&out, &card, None, &files, &options)?;
        on_event(ZooEvent::Done {
            member: &member.name,
            seconds,
            final_loss,
        });
        built.push((member.name, out));
    }
    Ok(built)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member named alike in two sets is the same recipe (so the cache
    /// shares it), and the stitching set's pairs have the shapes it promises.
    #[test]
    fn sets_share_members_and_the_deep_pair_is_one_family() {
        let size = ZooSize::named("small").unwrap();
        let stitching = size.members(ZooSet::Stitching);
        let names: Vec<&str> = stitching.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "base",
                "anchor-small",
                "base-long",
                "anchor-small-long",
                "deep-narrow",
                "deep-wide"
            ]
        );
        let others: Vec<ZooMember> = [ZooSet::Merging, ZooSet::Study]
            .into_iter()
            .flat_map(|set| size.members(set))
            .collect();
        for shared in ["base", "anchor-small", "base-long"] {
            let find = |members: &[ZooMember]| {
                let m = members.iter().find(|m| m.name == shared).unwrap();
                format!("{m:?}")
            };
            assert_eq!(find(&stitching), find(&others), "{shared}");
        }
        let long = &stitching[3];
        assert_eq!(long.parent.as_deref(), Some("anchor-small"));
        assert_eq!(long.options.lr, size.pretrain.lr / 2.0);
        let (narrow, wide) = (&stitching[4].shape, &stitching[5].shape);
        assert_eq!(
            narrow.num_hidden_layers(),
            2 * size.shape.num_hidden_layers()
        );
        assert_eq!(wide.num_hidden_layers(), narrow.num_hidden_layers());
        assert_eq!(wide.hidden_size, 2 * narrow.hidden_size);
        assert_eq!(wide.hidden_size, size.shape.hidden_size);
    }
}
