//! Differential test: the forward pass of every supported family against
//! transformers' on random-weight checkpoints transformers builds from
//! published configs scaled down (`tests/oracles/family_forward.py`): logits
//! and the residual stream entering every block, F32, within 1e-4 of the
//! values' scale; the same from the legacy-style config published checkpoints
//! carry; BF16 checkpoints upcast (against transformers in F32 on the same
//! weights) and computed in BF16 (against transformers in BF16).

use crate::common;

use std::collections::HashMap;
use std::path::Path;

use amalgam_nn::{supported_model_types, Decoder};
use common::python_json;
use tch::{Device, Kind, Tensor};

/// The largest difference between `ours` and `theirs`, over `theirs`' largest
/// magnitude (at least 1).
fn relative_diff(ours: &Tensor, theirs: &Tensor) -> f64 {
    let ours = ours.to_kind(Kind::Float);
    let diff = (&ours - theirs).abs().max().double_value(&[]);
    diff / theirs.abs().max().double_value(&[]).max(1.0)
}

fn expected(case: &Path) -> HashMap<String, Tensor> {
    Tensor::read_safetensors(case.join("expected.safetensors"))
        .unwrap()
        .into_iter()
        .collect()
}

#[test]
fn every_family_matches_transformers() {
    let tmp = tempfile::tempdir().unwrap();
    let cases: Vec<String> = serde_json::from_value(python_json(
        "tests/oracles/family_forward.py",
        &[tmp.path()],
    ))
    .unwrap();
    assert!(cases.len() >= 10, "{cases:?}");
    let mut families = std::collections::BTreeSet::new();
    for name in &cases {
        let case = tmp.path().join(name);
        let expected = expected(&case);
        let ids = &expected["ids"];
        let logits_std = expected["logits"].std(true).double_value(&[]);
        assert!(logits_std > 0.5, "{name}: the logits move ({logits_std})");
        for variant in ["model", "legacy"] {
            let model = Decoder::load(&case.join(variant), Device::Cpu)
                .unwrap_or_else(|e| panic!("{name}/{variant}: {e}"));
            families.insert(model.config.architecture.model_type.clone());
            let (logits, taps) = tch::no_grad(|| model.forward_taps(ids));
            let diff = relative_diff(&logits, &expected["logits"]);
            eprintln!("{name}/{variant}: logits within {diff:e} of transformers'");
            assert!(diff <= 1e-4, "{name}/{variant}: logits differ by {diff:e}");
            // A forward pass changes nothing: the second gives the same logits.
            let again = tch::no_grad(|| model.forward(ids));
            assert!(
                again.equal(&logits),
                "{name}/{variant}: a second pass differs"
            );
            for i in 0..model.config.num_hidden_layers() {
                let diff = relative_diff(&taps.residual[i], &expected[&format!("hidden.{i}")]);
                assert!(
                    diff <= 1e-4,
                    "{name}/{variant}: residual entering block {i} differs by {diff:e}"
                );
            }
        }
        let upcast = Decoder::load(&case.join("bf16"), Device::Cpu).unwrap();
        let logits = tch::no_grad(|| upcast.forward(ids));
        let diff = relative_diff(&logits, &expected["bf16_logits_f32"]);
        assert!(
            diff <= 1e-4,
            "{name}: BF16 weights in F32 differ by {diff:e}"
        );
        let bf16 = Decoder::load_as(&case.join("bf16"), Device::Cpu, Kind::BFloat16).unwrap();
        let logits = tch::no_grad(|| bf16.forward(ids));
        assert_eq!(logits.kind(), Kind::BFloat16, "{name}: BF16 math");
        // The same roundings as transformers (identical on the machines tried).
        let diff = relative_diff(&logits, &expected["bf16_logits"]);
        eprintln!("{name}: BF16 math within {diff:e} of transformers'");
        assert!(diff <= 1e-2, "{name}: BF16 math differs by {diff:e}");
    }
    let supported: std::collections::BTreeSet<String> = supported_model_types()
        .into_iter()
        .map(String::from)
        .collect();
    assert_eq!(families, supported, "every supported family is tested");
}
