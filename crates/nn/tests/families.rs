//! The forward pass refuses what it cannot run: a `model_type` that is not a
//! decoder family, and tensors the family's description does not place.

use std::path::Path;

use amalgam_checkpoint::ModelCard;
use amalgam_nn::{tokenizer, Architecture, Decoder, DecoderConfig};
use tch::Device;

fn tiny_llama() -> DecoderConfig {
    DecoderConfig {
        vocab_size: tokenizer::VOCAB_SIZE,
        hidden_size: 16,
        intermediate_sizes: vec![32; 2],
        num_attention_heads: 2,
        num_key_value_heads: 2,
        head_dim: 8,
        norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: None,
        tie_word_embeddings: true,
        max_position_embeddings: 64,
        bos_token_id: None,
        eos_token_id: None,
        architecture: Architecture::llama(),
    }
}

fn edit_config(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("config.json");
    let mut config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
    edit(&mut config);
    std::fs::write(&path, serde_json::to_vec(&config).unwrap()).unwrap();
}

#[test]
fn unknown_families_and_unplaced_tensors_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("model");
    Decoder::new(tiny_llama(), Device::Cpu, 1)
        .save_with_tokenizer(&dir, &ModelCard::default())
        .unwrap();
    Decoder::load(&dir, Device::Cpu).unwrap();

    edit_config(&dir, |c| {
        c["model_type"] = "falcon".into();
        c["architectures"] = serde_json::json!(["FalconForCausalLM"]);
    });
    let error = Decoder::load(&dir, Device::Cpu).err().unwrap().to_string();
    assert!(
        error.contains("model_type `falcon` (FalconForCausalLM) is not a decoder family"),
        "{error}"
    );
    for family in [
        "llama",
        "mistral",
        "qwen2",
        "qwen3",
        "gemma",
        "gemma2",
        "gemma3_text",
    ] {
        assert!(error.contains(family), "{error} lists {family}");
    }
    assert!(error.contains("phi3") && error.contains("gpt_neox") && error.contains("olmo2"));

    // A Qwen2 config over Llama weights: its q/k/v biases are missing.
    edit_config(&dir, |c| c["model_type"] = "qwen2".into());
    let error = Decoder::load(&dir, Device::Cpu).err().unwrap().to_string();
    assert!(
        error.contains("no tensor model.layers.0.self_attn.k_proj.bias, which a qwen2 model"),
        "{error}"
    );

    // A Gemma config over Llama weights: nothing is missing, but the layout
    // is Gemma's (scaled embeddings, (1 + w) norms, GeGLU), so it runs differently.
    edit_config(&dir, |c| {
        c["model_type"] = "gemma".into();
        c["hidden_act"] = "gelu_pytorch_tanh".into();
    });
    let gemma = Decoder::load(&dir, Device::Cpu).unwrap();
    let layout = gemma.config.architecture.layout;
    assert!(layout.embedding_scaled);
    assert_eq!(
        layout.norm,
        amalgam_checkpoint::decoder::NormKind::RmsUnitOffset
    );
}
