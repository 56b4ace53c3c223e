//! Differential test: our Llama forward pass against transformers'
//! `LlamaForCausalLM` on generated F32 checkpoints (logits within 1e-4, and
//! the residual stream the taps return), covering GQA, tied and untied
//! embeddings, an explicit head_dim and both RoPE scalings.

use crate::common;

use amalgam_checkpoint::ModelCard;
use amalgam_nn::{tokenizer, Architecture, Decoder, DecoderConfig, RopeScaling};
use common::python_json;
use tch::{Device, Kind, Tensor};

fn config(
    heads: usize,
    kv: usize,
    head_dim: usize,
    tied: bool,
    rope: Option<RopeScaling>,
) -> DecoderConfig {
    DecoderConfig {
        vocab_size: tokenizer::VOCAB_SIZE,
        hidden_size: 48,
        intermediate_sizes: vec![80; 3],
        num_attention_heads: heads,
        num_key_value_heads: kv,
        head_dim,
        norm_eps: 1e-5,
        rope_theta: 500.0,
        rope_scaling: rope,
        tie_word_embeddings: tied,
        max_position_embeddings: 64,
        bos_token_id: Some(tokenizer::BOS),
        eos_token_id: Some(tokenizer::EOS),
        architecture: Architecture::llama(),
    }
}

/// A model with weights large enough that every part of the network moves
/// the logits (the N(0, 0.02²) init would leave them near zero).
fn random_model(config: DecoderConfig, seed: i64) -> Decoder {
    tch::manual_seed(seed);
    let model = Decoder::new(config, Device::Cpu, seed as u64);
    tch::no_grad(|| {
        for (name, var) in model.vs.variables() {
            let noise = Tensor::randn(var.size(), (Kind::Float, Device::Cpu));
            let value = if name.ends_with("norm.weight") {
                noise * 0.2 + 1.0
            } else {
                noise * 0.15
            };
            var.shallow_clone().copy_(&value);
        }
    });
    model
}

/// Text for the tokenizer check: spaces, newlines, tabs and multi-byte UTF-8.
const SAMPLE: &str = "def f(x):\n\treturn x ≥ 0  # «naïve» — ok\n";

#[test]
fn logits_and_residual_stream_match_transformers() {
    let cases = [
        ("gqa_tied", config(6, 2, 8, true, None)),
        ("mha_untied_head_dim", config(4, 4, 16, false, None)),
        (
            "gqa_llama3_rope",
            config(
                4,
                1,
                12,
                true,
                Some(RopeScaling::Llama3 {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_position_embeddings: 16.0,
                }),
            ),
        ),
        (
            "linear_rope",
            config(6, 3, 8, false, Some(RopeScaling::Linear { factor: 2.0 })),
        ),
    ];
    let tmp = tempfile::tempdir().unwrap();
    for (k, (name, config)) in cases.into_iter().enumerate() {
        let model = random_model(config, k as i64);
        let dir = tmp.path().join(name);
        model
            .save_with_tokenizer(&dir, &ModelCard::default())
            .unwrap();
        // Loading our own output must give the same model.
        let loaded = Decoder::load(&dir, Device::Cpu).unwrap();
        let ids = Tensor::randint(
            tokenizer::VOCAB_SIZE as i64,
            [2, 40],
            (Kind::Int64, Device::Cpu),
        );
        let (logits, taps) = tch::no_grad(|| loaded.forward_taps(&ids));
        assert!(
            logits.equal(&tch::no_grad(|| model.forward(&ids))),
            "{name}: reload"
        );
        let mut tensors = vec![("ids".to_string(), ids), ("logits".to_string(), logits)];
        for (i, r) in taps.residual.iter().enumerate() {
            tensors.push((format!("residual.{i}"), r.shallow_clone()));
        }
        let case = tmp.path().join(format!("{name}.safetensors"));
        Tensor::write_safetensors(&tensors, &case).unwrap();
        let report = python_json(
            "tests/oracles/hf_logits.py",
            &[dir.as_os_str(), case.as_os_str(), SAMPLE.as_ref()],
        );
        let diff = report["max_logit_diff"].as_f64().unwrap();
        assert!(diff <= 1e-4, "{name}: logits differ by {diff}: {report}");
        assert!(
            report["logit_std"].as_f64().unwrap() > 0.5,
            "{name}: the logits move: {report}"
        );
        for (i, d) in report["max_hidden_diff"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
        {
            assert!(
                d.as_f64().unwrap() <= 1e-4,
                "{name}: residual before block {i}: {report}"
            );
        }
        let expected: Vec<i64> = tokenizer::encode(SAMPLE);
        let theirs: Vec<i64> = serde_json::from_value(report["tokenizer_ids"].clone()).unwrap();
        assert_eq!(theirs, expected, "{name}: AutoTokenizer encodes like ours");
        assert_eq!(report["tokenizer_decoded"], SAMPLE);
        assert_eq!(taps.ffn_hidden.len(), 3);
        assert_eq!(taps.ffn_hidden[0].size(), [2, 40, 80]);
        assert_eq!(
            taps.attention_heads[0].size()[2..],
            [
                loaded.config.num_attention_heads as i64,
                loaded.config.head_dim as i64
            ]
        );
    }
}
