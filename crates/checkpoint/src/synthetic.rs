//! Synthetic Llama-family checkpoints for tests and benchmarks: a base model
//! plus K fine-tunes with structured deltas, exact Hugging Face tensor names
//! and a `config.json` that transformers loads. Deterministic by seed: every
//! value comes from a generator seeded by (seed, tensor name, stream), so the
//! output does not depend on thread count or order.
//!
//! Values: base weights are N(0, 0.02²) (norm weights 1 + N(0, 0.02²)). The
//! delta of fine-tune k (1-based) is `0.002 · (shared + specific_k + conflict_k)`:
//! * `shared`: one N(0, 0.3²) draw per entry, the same for every fine-tune (agreement);
//! * `specific_k`: an independent N(0, 1) draw on a random 30% of entries;
//! * `conflict_k`: on a fixed random 10% of entries, `±2|z|` with the sign
//!   `+` for odd k and `−` for even k, so fine-tunes 1 and 2 disagree in sign
//!   there (what TIES' sign election is for).

use std::path::{Path, PathBuf};

use rand::{Rng, SeedableRng};
use rand_distr::StandardNormal;
use rand_xoshiro::Xoshiro256PlusPlus;
use rayon::prelude::*;
use safetensors::Dtype;
use serde_json::json;

use crate::decoder::{MlpInput, Projections};
use crate::{
    dtype_name, family, stream_seed, CheckpointWriter, Error, Finish, ModelCard, ModelConfig,
    Result, TensorSpec, WriteOptions,
};

const BASE_STD: f32 = 0.02;
const DELTA_STD: f32 = 0.002;
const SPECIFIC_DENSITY: f64 = 0.3;
const CONFLICT_DENSITY: f64 = 0.1;

/// The shape of a Llama-family decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LlamaShape {
    pub hidden: usize,
    pub layers: usize,
    pub intermediate: usize,
    pub vocab: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub tied: bool,
}

impl LlamaShape {
    /// Small enough for unit tests, with grouped-query attention.
    pub const TINY: Self = Self {
        hidden: 64,
        layers: 4,
        intermediate: 160,
        vocab: 384,
        heads: 4,
        kv_heads: 2,
        tied: false,
    };

    /// TinyLlama-1.1B: 201 tensors, 1,100,048,384 parameters.
    pub const TINYLLAMA: Self = Self {
        hidden: 2048,
        layers: 22,
        intermediate: 5632,
        vocab: 32000,
        heads: 32,
        kv_heads: 4,
        tied: false,
    };

    /// Mistral-7B (v0.1's config; Llama tensor names): 291 tensors,
    /// 7,241,732,096 parameters, 14.5 GB in BF16 — the scale the merge's
    /// memory bound is measured at.
    pub const MISTRAL_7B: Self = Self {
        hidden: 4096,
        layers: 32,
        intermediate: 14336,
        vocab: 32000,
        heads: 32,
        kv_heads: 8,
        tied: false,
    };

    pub fn by_name(name: &str) -> Option<Self> {
        match name {
            "tiny" => Some(Self::TINY),
            "tinyllama" => Some(Self::TINYLLAMA),
            "mistral-7b" => Some(Self::MISTRAL_7B),
            _ => None,
        }
    }

    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// Every tensor, named as `families/llama.json` names them and ordered
    /// as transformers' `LlamaForCausalLM` saves them.
    pub fn specs(&self, dtype: Dtype) -> Vec<TensorSpec> {
        let (h, f, kv) = (
            self.hidden,
            self.intermediate,
            self.kv_heads * self.head_dim(),
        );
        let llama = family::llama_decoder();
        let Projections::Separate([q, k, v]) = &llama.attention.qkv else {
            unreachable!("Llama's q, k and v are separate tensors")
        };
        let MlpInput::Gated([gate, up]) = &llama.mlp.input else {
            unreachable!("Llama's MLP is gated")
        };
        let (Some(attention_norm), Some(mlp_norm)) =
            (&llama.norms.attention_input, &llama.norms.mlp_input)
        else {
            unreachable!("Llama normalises the attention's and the MLP's inputs")
        };
        let mut specs = vec![TensorSpec::new(
            format!("{}.weight", llama.embedding),
            dtype,
            vec![self.vocab, h],
        )];
        for i in 0..self.layers {
            for (part, shape) in [
                (q, vec![h, h]),
                (k, vec![kv, h]),
                (v, vec![kv, h]),
                (&llama.attention.output, vec![h, h]),
                (gate, vec![f, h]),
                (up, vec![f, h]),
                (&llama.mlp.output, vec![h, f]),
                (attention_norm, vec![h]),
                (mlp_norm, vec![h]),
            ] {
                let name = format!("{}.weight", llama.layer_tensor(i, part));
                specs.push(TensorSpec::new(name, dtype, shape));
            }
        }
        let norm = format!("{}.weight", llama.final_norm);
        specs.push(TensorSpec::new(norm, dtype, vec![h]));
        if !self.tied {
            specs.push(TensorSpec::new(
                format!("{}.weight", llama.head[0]),
                dtype,
                vec![self.vocab, h],
            ));
        }
        specs
    }

    pub fn config(&self, dtype: Dtype) -> ModelConfig {
        let llama = family::llama();
        let value = json!({
            "architectures": llama.architectures,
            "model_type": llama.model_type,
            "hidden_size": self.hidden,
            "intermediate_size": self.intermediate,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim(),
            "vocab_size": self.vocab,
            "max_position_embeddings": 2048,
            "rms_norm_eps": 1e-5,
            "rope_theta": 10000.0,
            "hidden_act": "silu",
            "attention_bias": false,
            "mlp_bias": false,
            "initializer_range": 0.02,
            "tie_word_embeddings": self.tied,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "use_cache": true,
            "torch_dtype": dtype_name(dtype),
        });
        ModelConfig::from_json(value.as_object().expect("an object").clone())
    }
}

/// What [`generate_family`] makes.
#[derive(Debug, Clone)]
pub struct FamilyOptions {
    pub shape: LlamaShape,
    pub dtype: Dtype,
    pub seed: u64,
    /// Number of fine-tunes besides the base.
    pub finetunes: usize,
    pub write: WriteOptions,
}

/// The directory names [`generate_family`] writes under its root.
pub fn member_names(finetunes: usize) -> Vec<String> {
    std::iter::once("base".to_owned())
        .chain((1..=finetunes).map(|k| format!("finetune-{k}")))
        .collect()
}

/// Writes `root/base` and `root/finetune-1..=K`; `progress` is called with the
/// bytes written after each tensor. Returns the member directories.
pub fn generate_family(
    root: &Path,
    options: &FamilyOptions,
    progress: &(dyn Fn(u64) + Sync),
) -> Result<Vec<PathBuf>> {
    if !matches!(options.dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
        return Err(Error::Write {
            path: root.into(),
            message: format!(
                "synthetic checkpoints are F32, F16 or BF16, not {:?}",
                options.dtype
            ),
        });
    }
    let specs = options.shape.specs(options.dtype);
    let dirs: Vec<PathBuf> = member_names(options.finetunes)
        .iter()
        .map(|n| root.join(n))
        .collect();
    let writers = dirs
        .iter()
        .map(|dir| CheckpointWriter::create(dir, specs.clone(), &options.write))
        .collect::<Result<Vec<_>>>()?;

    specs.par_iter().try_for_each(|spec| -> Result<()> {
        let members = generate_tensor(spec, options);
        for (writer, bytes) in writers.iter().zip(&members) {
            writer.write_bytes(&spec.name, bytes)?;
            progress(bytes.len() as u64);
        }
        Ok(())
    })?;

    let config = options.shape.config(options.dtype);
    let generation = serde_json::to_vec_pretty(&json!({"bos_token_id": 1, "eos_token_id": 2}))
        .expect("JSON serialises");
    let extra = [("generation_config.json", generation)];
    for (k, (writer, name)) in writers
        .into_iter()
        .zip(member_names(options.finetunes))
        .enumerate()
    {
        let summary = if k == 0 {
            format!("Synthetic Llama base model, seed {}.", options.seed)
        } else {
            format!(
                "Synthetic fine-tune {k} of the base (structured delta with sign conflicts), seed {}.",
                options.seed
            )
        };
        let card = ModelCard {
            title: format!("synthetic {name}"),
            summary,
            ..Default::default()
        };
        writer.finish(Finish {
            config: &config,
            tokenizer_source: None,
            chat_template: None,
            extra_files: &extra,
            card: &card,
        })?;
    }
    Ok(dirs)
}

/// The encoded bytes of one tensor for the base and every fine-tune.
fn generate_tensor(spec: &TensorSpec, options: &FamilyOptions) -> Vec<Vec<u8>> {
    let numel = spec.numel() as usize;
    let is_norm = spec.shape.len() == 1;
    let rng = |stream: u64| {
        Xoshiro256PlusPlus::seed_from_u64(stream_seed(options.seed, &spec.name, stream))
    };
    let mut base_rng = rng(0);
    let mut shared_rng = rng(1);
    let mut specific_rngs: Vec<_> = (1..=options.finetunes as u64).map(|k| rng(1 + k)).collect();
    let width = spec.dtype.bitsize() / 8;
    let mut members = vec![Vec::with_capacity(numel * width); options.finetunes + 1];
    for _ in 0..numel {
        let noise: f32 = base_rng.sample(StandardNormal);
        let base = if is_norm { 1.0 } else { 0.0 } + BASE_STD * noise;
        encode(base, spec.dtype, &mut members[0]);
        if options.finetunes == 0 {
            continue;
        }
        let shared: f32 = 0.3 * shared_rng.sample::<f32, _>(StandardNormal);
        let in_conflict = shared_rng.random_bool(CONFLICT_DENSITY);
        let conflict: f32 = 2.0 * shared_rng.sample::<f32, _>(StandardNormal).abs();
        for (k, rng) in specific_rngs.iter_mut().enumerate() {
            let specific: f32 = if rng.random_bool(SPECIFIC_DENSITY) {
                rng.sample(StandardNormal)
            } else {
                0.0
            };
            let sign = if k % 2 == 0 { 1.0 } else { -1.0 };
            let conflict = if in_conflict { sign * conflict } else { 0.0 };
            let value = base + DELTA_STD * (shared + specific + conflict);
            encode(value, spec.dtype, &mut members[k + 1]);
        }
    }
    members
}

fn encode(value: f32, dtype: Dtype, out: &mut Vec<u8>) {
    match dtype {
        Dtype::F32 => out.extend_from_slice(&value.to_le_bytes()),
        Dtype::F16 => out.extend_from_slice(&half::f16::from_f32(value).to_le_bytes()),
        Dtype::BF16 => out.extend_from_slice(&half::bf16::from_f32(value).to_le_bytes()),
        other => unreachable!("checked by generate_family: {other:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tinyllama_shape_has_201_tensors_and_1_1b_parameters() {
        let specs = LlamaShape::TINYLLAMA.specs(Dtype::BF16);
        assert_eq!(specs.len(), 201);
        // 2·32000·2048 (embed, head) + 2048 (norm)
        // + 22 · (2·2048² + 2·256·2048 + 3·2048·5632 + 2·2048) per layer
        let per_layer = 2 * 2048 * 2048 + 2 * 256 * 2048 + 3 * 2048 * 5632 + 2 * 2048;
        let expected = 2 * 32000 * 2048 + 2048 + 22 * per_layer;
        assert_eq!(specs.iter().map(TensorSpec::numel).sum::<u64>(), expected);
        assert_eq!(expected, 1_100_048_384);
    }

    #[test]
    fn mistral_shape_has_mistral_7bs_parameter_count() {
        let specs = LlamaShape::MISTRAL_7B.specs(Dtype::BF16);
        assert_eq!(specs.len(), 3 + 32 * 9);
        // Mistral-7B-v0.1's published count.
        assert_eq!(
            specs.iter().map(TensorSpec::numel).sum::<u64>(),
            7_241_732_096
        );
    }

    #[test]
    fn fine_tunes_one_and_two_conflict_in_sign_on_some_entries() {
        let spec = TensorSpec::new(
            "model.layers.0.mlp.up_proj.weight",
            Dtype::F32,
            vec![64, 64],
        );
        let options = FamilyOptions {
            shape: LlamaShape::TINY,
            dtype: Dtype::F32,
            seed: 7,
            finetunes: 2,
            write: WriteOptions::default(),
        };
        let members = generate_tensor(&spec, &options);
        let values = |m: &Vec<u8>| -> Vec<f32> {
            m.chunks(4)
                .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                .collect()
        };
        let (base, one, two) = (
            values(&members[0]),
            values(&members[1]),
            values(&members[2]),
        );
        let n = base.len() as f64;
        let opposite = (0..base.len())
            .filter(|&i| (one[i] - base[i]) * (two[i] - base[i]) < 0.0)
            .count() as f64;
        // Conflicts (10%) and independent specific parts make a sizeable share opposite…
        assert!(opposite / n > 0.1, "opposite fraction {}", opposite / n);
        // …while the shared part keeps most entries in agreement.
        assert!(opposite / n < 0.5, "opposite fraction {}", opposite / n);
        assert_eq!(generate_tensor(&spec, &options), members, "deterministic");
    }
}
