//! Helpers shared by the PLeaS tests: random Llama models with structure.
#![allow(dead_code)] // each test binary uses its own subset

use amalgam_checkpoint::ModelConfig;
use amalgam_nn::{tokenizer, Architecture, Decoder, DecoderConfig};
use tch::{Device, Kind, Tensor};

/// A small decoder over the byte vocabulary: 2 layers of FFN widths `ffn`,
/// 6 query heads in 2 KV groups.
pub fn config(tied: bool, ffn: Vec<usize>) -> DecoderConfig {
    DecoderConfig {
        vocab_size: tokenizer::VOCAB_SIZE,
        hidden_size: 24,
        intermediate_sizes: ffn,
        num_attention_heads: 6,
        num_key_value_heads: 2,
        head_dim: 8,
        norm_eps: 1e-5,
        rope_theta: 500.0,
        rope_scaling: None,
        tie_word_embeddings: tied,
        max_position_embeddings: 64,
        bos_token_id: None,
        eos_token_id: None,
        architecture: Architecture::llama(),
    }
}

/// A random model with weights `scale` times the init and norm scales that
/// differ per channel, so every part moves the logits and a misplaced norm shows.
pub fn structured_model(config: DecoderConfig, seed: u64, scale: f64) -> Decoder {
    let model = Decoder::new(config, Device::Cpu, seed);
    tch::no_grad(|| {
        for (name, mut var) in model.vs.variables() {
            if name.ends_with("norm.weight") {
                let n = var.size()[0];
                let ramp = Tensor::arange(n, (Kind::Float, Device::Cpu)) / n as f64;
                var.copy_(&(ramp * 0.5 + 0.75));
            } else {
                let _ = var.g_mul_scalar_(scale);
            }
        }
    });
    model
}

/// A small config of `family` (a supported `model_type`): 2 layers, hidden
/// 32, 4 query heads of 8 dimensions in 2 KV groups (GPT-NeoX: 4 KV heads,
/// it has no GQA), FFN 48, vocabulary 96; every other field the family's
/// default.
pub fn family_config(family: &str, tied: bool) -> DecoderConfig {
    let mut fields = serde_json::json!({
        "model_type": family,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 8,
        "intermediate_size": 48,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "tie_word_embeddings": tied,
    });
    if family == "gpt_neox" {
        fields["num_key_value_heads"] = 4.into();
    }
    let serde_json::Value::Object(fields) = fields else {
        unreachable!("an object")
    };
    let config = ModelConfig::from_json(fields);
    DecoderConfig::from_model_config(&config, std::path::Path::new("config.json"))
        .unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// A model of `config` with every parameter (biases and norms included)
/// drawn uniformly from [-0.5, 0.5) (a seeded stream, not libtorch's global
/// generator): distinct values everywhere, so a misplaced bias or norm shows
/// in the logits.
pub fn random_model(config: &DecoderConfig, seed: u64) -> Decoder {
    use rand::{Rng, SeedableRng};
    let model = Decoder::new(config.clone(), Device::Cpu, seed);
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let mut variables: Vec<(String, Tensor)> = model.vs.variables().into_iter().collect();
    variables.sort_by(|a, b| a.0.cmp(&b.0));
    tch::no_grad(|| {
        for (_, mut var) in variables {
            let values: Vec<f32> = (0..var.numel())
                .map(|_| rng.random_range(-0.5..0.5))
                .collect();
            var.copy_(&Tensor::from_slice(&values).view(var.size().as_slice()));
        }
    });
    model
}
