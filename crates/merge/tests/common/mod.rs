//! Helpers shared by the PLeaS tests: random Llama models with structure.
#![allow(dead_code)] // each test binary uses its own subset

use amalgam_merge::pleas::permutation::DecoderShape;
use amalgam_nn::{Llama, LlamaConfig};
use tch::{Device, Kind, Tensor};

/// The permutation-relevant shape of a config.
pub fn shape(c: &LlamaConfig) -> DecoderShape {
    DecoderShape {
        hidden: c.hidden_size,
        heads: c.num_attention_heads,
        kv_heads: c.num_key_value_heads,
        head_dim: c.head_dim,
        ffn: c.intermediate_sizes.clone(),
        untied_head: !c.tie_word_embeddings,
        rms_norm_eps: c.rms_norm_eps,
    }
}

/// A random model with weights `scale` times the init and norm scales that
/// differ per channel, so every part moves the logits and a misplaced norm shows.
pub fn structured_model(config: LlamaConfig, seed: u64, scale: f64) -> Llama {
    let model = Llama::new(config, Device::Cpu, seed);
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
