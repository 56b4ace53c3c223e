//! SN-Net stitching on real forward passes: a stitch from an anchor to itself
//! at the same block, through the identity, is the anchor (bit for bit); the
//! streamed calibration gives the least squares of the whole-model streams,
//! on every family, whichever anchor's streams it keeps, asking its sources
//! for one block at a time.

use std::cell::RefCell;

use amalgam_checkpoint::ModelConfig;
use amalgam_elastic::stitch::{
    calibrate, family_routes, members, stitched_logits, CalibrationPlan, Network, Route, Stitch,
    StitchedFamily,
};
use amalgam_nn::calibration::CalibrationText;
use amalgam_nn::eval::LanguageModel;
use amalgam_nn::least_squares::NormalEquations;
use amalgam_nn::{supported_model_types, Decoder, DecoderConfig, Part};
use amalgam_zoo::ZooSize;
use tch::{Device, Kind, Tensor};

fn ids(vocab: i64) -> Tensor {
    let ids: Vec<i64> = (0..3 * 24).map(|i| (i * 53 + 7) % vocab).collect();
    Tensor::from_slice(&ids).view([3, 24])
}

/// A small config of `family`: `hidden` wide (heads of 8), `layers` deep.
fn family_config(family: &str, hidden: usize, layers: usize) -> DecoderConfig {
    let heads = hidden / 8;
    let serde_json::Value::Object(fields) = serde_json::json!({
        "model_type": family,
        "hidden_size": hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": heads,
        "num_key_value_heads": if family == "gpt_neox" { heads } else { heads / 2 },
        "head_dim": 8,
        "intermediate_size": 2 * hidden,
        "vocab_size": 96,
        "max_position_embeddings": 64,
        "tie_word_embeddings": false,
    }) else {
        unreachable!("an object")
    };
    DecoderConfig::from_model_config(
        &ModelConfig::from_json(fields),
        std::path::Path::new("config.json"),
    )
    .unwrap_or_else(|e| panic!("{family}: {e}"))
}

/// Streamed calibration of every route between `anchors`, each asked only
/// for its embeddings or a single block (checked).
fn streamed(
    anchors: &[Decoder; 2],
    batches: &[Tensor],
    ridge: f64,
) -> (CalibrationPlan, Vec<Stitch>) {
    let configs = [&anchors[0].config, &anchors[1].config];
    let routes = family_routes(configs.map(DecoderConfig::num_hidden_layers));
    let plan = CalibrationPlan::new(configs, [Kind::Float; 2], routes, 3, 24, 1);
    let asked = RefCell::new(vec![]);
    let source = |a: usize| {
        let asked = &asked;
        move |part: &Part| {
            assert!(
                !part.head && (part.embedding != (part.layers.len() == 1)),
                "{part:?}"
            );
            asked.borrow_mut().push(part.clone());
            Ok(anchors[a].part(part))
        }
    };
    let (first, second) = (source(0), source(1));
    let stitches = calibrate(&plan, [&first, &second], batches, ridge, &mut || {}).unwrap();
    assert_eq!(asked.borrow().len(), 2 + plan.blocks());
    (plan, stitches)
}

/// The same stitches from the whole models' residual streams, all tokens at once.
fn whole(anchors: &[Decoder; 2], routes: &[Route], ids: &Tensor, ridge: f64) -> Vec<Stitch> {
    let streams: Vec<Vec<Tensor>> = tch::no_grad(|| {
        anchors
            .iter()
            .map(|a| {
                let (_, taps) = a.forward_taps(ids);
                taps.residual
                    .iter()
                    .map(|r| r.reshape([-1, r.size()[2]]))
                    .collect()
            })
            .collect()
    });
    routes
        .iter()
        .map(|r| {
            let (x, y) = (&streams[r.front][r.cut], &streams[r.end][r.resume]);
            let (inputs, outputs) = (x.size()[1] as usize, y.size()[1] as usize);
            let mut equations =
                NormalEquations::new(inputs, outputs, true, Kind::Double, Device::Cpu);
            equations.add(x, y);
            let linear = equations
                .solve([inputs, 0, 0], [outputs, 0, 0], ridge)
                .unwrap();
            Stitch::from_linear(linear)
        })
        .collect()
}

#[test]
fn streamed_calibration_is_the_whole_model_least_squares_on_every_family() {
    let ids = ids(96);
    let batches: Vec<Tensor> = (0..3).map(|i| ids.narrow(0, i, 1)).collect();
    for family in supported_model_types() {
        // Both orders: the narrower, shallower anchor's streams are kept
        // whether it comes first or second.
        let narrow = Decoder::new(family_config(family, 16, 2), Device::Cpu, 1);
        let wide = Decoder::new(family_config(family, 32, 3), Device::Cpu, 2);
        for (anchors, kept) in [
            (
                [narrow.part(&Part::whole(2)), wide.part(&Part::whole(3))],
                0,
            ),
            (
                [wide.part(&Part::whole(3)), narrow.part(&Part::whole(2))],
                1,
            ),
        ] {
            let (plan, stitches) = streamed(&anchors, &batches, 1e-4);
            assert_eq!(plan.kept, kept, "{family}");
            let expected = whole(&anchors, &plan.routes, &ids, 1e-4);
            for ((route, got), want) in plan.routes.iter().zip(&stitches).zip(&expected) {
                for (g, w) in [(&got.weight, &want.weight), (&got.bias, &want.bias)] {
                    let scale = w.abs().max().double_value(&[]);
                    let error = (g - w).abs().max().double_value(&[]);
                    assert!(
                        error <= 1e-4 * scale.max(1.0),
                        "{family} {route:?}: off by {error} (scale {scale})"
                    );
                }
                let logits = tch::no_grad(|| stitched_logits(&anchors, *route, got, &ids));
                assert_eq!(logits.size(), [3, 24, 96]);
                assert_eq!(
                    logits.isfinite().all().int64_value(&[]),
                    1,
                    "{family} {route:?}"
                );
            }
        }
    }
}

#[test]
fn an_identity_stitch_from_an_anchor_to_itself_is_the_anchor() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.intermediate_sizes = vec![96; 4];
    let anchor = Decoder::new(shape.clone(), Device::Cpu, 5);
    let ids = ids(258);
    let expected = tch::no_grad(|| anchor.forward(&ids));
    let anchors = [anchor];
    let identity = Stitch::identity(shape.hidden_size);
    for cut in 0..=4 {
        let route = Route {
            front: 0,
            cut,
            end: 0,
            resume: cut,
        };
        let logits = tch::no_grad(|| stitched_logits(&anchors, route, &identity, &ids));
        assert!(
            logits.equal(&expected),
            "cut {cut}: not the anchor's logits"
        );
    }
}

#[test]
fn calibrated_routes_join_two_anchors_both_ways() {
    let micro = ZooSize::named("micro").unwrap();
    let (mut small, mut large) = (micro.small_anchor.clone(), micro.shape.clone());
    small.intermediate_sizes = vec![48; 2];
    large.intermediate_sizes = vec![96; 3];
    let routes = family_routes([2, 3]);
    let route = |front, cut, end, resume| Route {
        front,
        cut,
        end,
        resume,
    };
    // 2 → 3 blocks: cut 1 sits at relative depth 1.5 → blocks 2 and 1;
    // 3 → 2: cuts 1 and 2 both sit nearest end block 1.
    assert_eq!(
        routes,
        [
            route(0, 1, 1, 1),
            route(0, 1, 1, 2),
            route(1, 1, 0, 1),
            route(1, 2, 0, 1)
        ]
    );
    // A stitch between an anchor and an exact copy of it, at one block, is
    // the identity.
    let anchor = Decoder::new(micro.shape.clone(), Device::Cpu, 3);
    let same = [anchor.part(&Part::whole(4)), anchor.part(&Part::whole(4))];
    let (plan, stitches) = streamed(&same, &[ids(258)], 0.0);
    let at_one = plan
        .routes
        .iter()
        .position(|r| r.cut == 1 && r.resume == 1)
        .unwrap();
    let eye = Tensor::eye(32, (Kind::Float, Device::Cpu));
    let error = (&stitches[at_one].weight - eye)
        .abs()
        .max()
        .double_value(&[]);
    assert!(error < 1e-3, "identity off by {error}");
}

#[test]
fn training_routes_lowers_their_loss_and_leaves_frozen_anchors_alone() {
    use amalgam_recipe::StitchTraining;
    let micro = ZooSize::named("micro").unwrap();
    let family = || {
        let anchors = [
            Decoder::new(micro.small_anchor.clone(), Device::Cpu, 1),
            Decoder::new(micro.shape.clone(), Device::Cpu, 2),
        ];
        let (plan, stitches) = streamed(&anchors, &[ids(258)], 1e-4);
        let members = members(
            [&anchors[0].config, &anchors[1].config],
            &plan.routes,
            stitches,
        );
        StitchedFamily {
            anchors: anchors.into(),
            members,
            dirs: vec![],
        }
    };
    let options = |steps, anchor_lr_scale| StitchTraining {
        steps,
        batch: 4,
        seq_len: 33,
        lr: 1e-2,
        anchor_lr_scale,
        distill: 0.0,
        temperature: 1.0,
        seed: 0,
    };
    let text = || CalibrationText::open("mixture", "text", 258, &[], 33, 0).unwrap();
    // Untrained anchors know nothing: training everything, the loss falls.
    let losses = family()
        .train(&options(80, 1.0), &mut text(), &mut |_, _| {})
        .unwrap();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(
        mean(&losses[60..]) < mean(&losses[..20]) - 0.3,
        "{:.3} → {:.3}",
        mean(&losses[..20]),
        mean(&losses[60..])
    );
    // Frozen anchors: only the stitching layers move.
    let mut frozen = family();
    let snapshot = |f: &StitchedFamily| -> (Vec<Tensor>, Vec<Tensor>) {
        // Sorted by name: each variables() call is a new HashMap.
        let sorted = |a: &Decoder| {
            let mut vars: Vec<(String, Tensor)> = a.vs.variables().into_iter().collect();
            vars.sort_by(|x, y| x.0.cmp(&y.0));
            vars.into_iter().map(|(_, t)| t.copy())
        };
        let anchors = f.anchors.iter().flat_map(sorted).collect();
        let stitches = f
            .members
            .iter()
            .filter_map(|m| match &m.network {
                Network::Stitched(_, s) => Some(s.weight.copy()),
                Network::Anchor(_) => None,
            })
            .collect();
        (anchors, stitches)
    };
    let before = snapshot(&frozen);
    frozen
        .train(&options(10, 0.0), &mut text(), &mut |_, _| {})
        .unwrap();
    let after = snapshot(&frozen);
    assert!(
        before.0.iter().zip(&after.0).all(|(a, b)| a.equal(b)),
        "frozen anchors changed"
    );
    assert!(
        before.1.iter().zip(&after.1).any(|(a, b)| !a.equal(b)),
        "no stitch moved"
    );

    // Distillation alone, anchors frozen: the routes' predictions move toward
    // the larger anchor's (anchor 1), by more than next-token training moves them.
    let probe = text().batch(8, 33);
    let kl_to_teacher = |f: &StitchedFamily| -> f64 {
        let teacher = f.anchors[1].forward(&probe).log_softmax(-1, Kind::Float);
        let routes: Vec<f64> = f
            .members
            .iter()
            .filter(|m| matches!(m.network, Network::Stitched(..)))
            .map(|m| {
                let route = f.scorer(m).logits(&probe).log_softmax(-1, Kind::Float);
                let kl = teacher.exp() * (&teacher - route);
                kl.sum(Kind::Float).double_value(&[]) / (8.0 * 33.0)
            })
            .collect();
        mean(&routes)
    };
    let start = kl_to_teacher(&family());
    let trained = |distill| {
        let mut f = family();
        let options = StitchTraining {
            distill,
            ..options(40, 0.0)
        };
        f.train(&options, &mut text(), &mut |_, _| {}).unwrap();
        tch::no_grad(|| kl_to_teacher(&f))
    };
    let (plain, distilled) = (trained(0.0), trained(1.0));
    assert!(
        distilled < start * 0.8 && distilled < plain,
        "KL(teacher ‖ routes): untrained {start:.4}, next-token training {plain:.4}, distilled {distilled:.4}"
    );
}

/// What must not be written or run: no calibration batches, a family that
/// does not say where its anchors' files are, a stitch holding NaN.
#[test]
fn broken_inputs_and_outputs_are_errors() {
    use amalgam_elastic::stitch::{save_family, AnchorOut};
    let micro = ZooSize::named("micro").unwrap();
    let anchors = [
        Decoder::new(micro.small_anchor.clone(), Device::Cpu, 1),
        Decoder::new(micro.shape.clone(), Device::Cpu, 2),
    ];
    {
        let configs = [&anchors[0].config, &anchors[1].config];
        let routes = family_routes(configs.map(DecoderConfig::num_hidden_layers));
        let plan = CalibrationPlan::new(configs, [Kind::Float; 2], routes, 1, 24, 1);
        let source = |a: usize| {
            let anchors = &anchors;
            move |part: &Part| Ok(anchors[a].part(part))
        };
        let (first, second) = (source(0), source(1));
        let error = calibrate(&plan, [&first, &second], &[], 0.0, &mut || {})
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("no calibration batches"), "{error}");
    }

    let (plan, stitches) = streamed(&anchors, &[ids(258)], 1e-4);
    let tmp = tempfile::tempdir().unwrap();
    let configs = [&anchors[0].config, &anchors[1].config];
    let family = StitchedFamily {
        members: members(configs, &plan.routes, vec![]),
        anchors: anchors.into(),
        dirs: vec![],
    };
    let error = family
        .save(&tmp.path().join("f"), false, &Default::default())
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("does not say where its anchors"), "{error}");

    let _ = stitches[0].weight.get(0).get(0).fill_(f64::NAN);
    let configs = [&family.anchors[0].config, &family.anchors[1].config];
    let broken = members(configs, &plan.routes, stitches);
    let out = tmp.path().join("broken");
    let error = save_family(
        &out,
        false,
        &[AnchorOut::Checkpoint(tmp.path())],
        &broken,
        &Default::default(),
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        error.contains("NaN or infinite") && error.contains(&broken[2].name),
        "{error}"
    );
    assert!(!out.exists(), "nothing written");
}
