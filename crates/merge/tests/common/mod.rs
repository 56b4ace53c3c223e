//! Helpers shared by the PLeaS tests: random Llama models with structure.
#![allow(dead_code)] // each test binary uses its own subset

use amalgam_merge::pleas::permutation::DecoderShape;
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

/// The permutation-relevant shape of a config.
pub fn shape(c: &DecoderConfig) -> DecoderShape {
    DecoderShape {
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        ffn: c.intermediate_sizes.clone(),
        untied_head: !c.tie_word_embeddings,
        rms_norm_eps: c.norm_eps,
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
