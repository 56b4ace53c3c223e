//! SN-Net stitching on real forward passes: a stitch from an anchor to itself
//! at the same block, through the identity, is the anchor (bit for bit); a
//! least-squares stitch between two anchors fits the end anchor's stream.

use amalgam_elastic::stitch::{calibrate, family_routes, stitched_logits, Route, Stitch};
use amalgam_nn::zoo::ZooSize;
use amalgam_nn::Decoder;
use tch::{Device, Tensor};

fn ids() -> Tensor {
    let ids: Vec<i64> = (0..3 * 24).map(|i| (i * 53 + 7) % 258).collect();
    Tensor::from_slice(&ids).view([3, 24])
}

#[test]
fn an_identity_stitch_from_an_anchor_to_itself_is_the_anchor() {
    let mut shape = ZooSize::named("micro").unwrap().shape;
    shape.intermediate_sizes = vec![96; 4];
    let anchor = Decoder::new(shape.clone(), Device::Cpu, 5);
    let ids = ids();
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
fn a_least_squares_stitch_fits_the_end_anchors_stream() {
    let micro = ZooSize::named("micro").unwrap();
    let (small, large) = (
        Decoder::new(micro.small_anchor.clone(), Device::Cpu, 1),
        Decoder::new(micro.shape.clone(), Device::Cpu, 2),
    );
    let ids = ids();
    let (x, y) = tch::no_grad(|| {
        (
            small.blocks(small.embed(&ids), 0..1),
            large.blocks(large.embed(&ids), 0..1),
        )
    });
    let flat = |t: &Tensor| t.reshape([-1, t.size()[2]]);
    let stitch = Stitch::fit(&flat(&x), &flat(&y), 0.0).unwrap();
    assert_eq!(stitch.weight.size(), [32, 16]);
    let residual = |s: &Stitch| {
        (s.apply(&flat(&x)) - flat(&y))
            .square()
            .mean(tch::Kind::Double)
            .double_value(&[])
    };
    // Better than any other map tried: the zero map, and the fit perturbed.
    let zero = Stitch {
        weight: Tensor::zeros([32, 16], (tch::Kind::Float, Device::Cpu)),
        bias: Tensor::zeros([32], (tch::Kind::Float, Device::Cpu)),
    };
    let nudged = Stitch {
        weight: &stitch.weight + 0.01,
        bias: stitch.bias.shallow_clone(),
    };
    assert!(residual(&stitch) < residual(&zero));
    assert!(residual(&stitch) < residual(&nudged));
}

#[test]
fn calibrated_routes_join_two_anchors_both_ways() {
    let micro = ZooSize::named("micro").unwrap();
    let (mut small, mut large) = (micro.small_anchor.clone(), micro.shape.clone());
    small.intermediate_sizes = vec![48; 2];
    large.intermediate_sizes = vec![96; 3];
    let anchors = [
        Decoder::new(small, Device::Cpu, 1),
        Decoder::new(large, Device::Cpu, 2),
    ];
    let routes = family_routes(&anchors);
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
    let stitches = calibrate(&anchors, &routes, &ids(), 1e-6).unwrap();
    assert_eq!(stitches.len(), routes.len());
    for (route, stitch) in routes.iter().zip(&stitches) {
        let logits = tch::no_grad(|| stitched_logits(&anchors, *route, stitch, &ids()));
        assert_eq!(logits.size(), [3, 24, 258]);
        assert!(logits.isfinite().all().int64_value(&[]) == 1, "{route:?}");
    }
    // Calibrating a stitch from an anchor to itself at one block finds the identity.
    let same = [Decoder::new(micro.shape.clone(), Device::Cpu, 3)];
    let route = Route {
        front: 0,
        cut: 1,
        end: 0,
        resume: 1,
    };
    let stitch = &calibrate(&same, &[route], &ids(), 0.0).unwrap()[0];
    let eye = Tensor::eye(32, (tch::Kind::Float, Device::Cpu));
    let error = (&stitch.weight - eye).abs().max().double_value(&[]);
    assert!(error < 1e-3, "identity off by {error}");
}

#[test]
fn training_routes_lowers_their_loss_and_leaves_frozen_anchors_alone() {
    use amalgam_elastic::stitch::{Family, Network};
    use amalgam_recipe::StitchTraining;
    let micro = ZooSize::named("micro").unwrap();
    let family = || {
        let anchors = vec![
            Decoder::new(micro.small_anchor.clone(), Device::Cpu, 1),
            Decoder::new(micro.shape.clone(), Device::Cpu, 2),
        ];
        Family::fit(anchors, &ids(), 1e-4).unwrap()
    };
    let options = |steps, anchor_lr_scale| StitchTraining {
        steps,
        batch: 4,
        seq_len: 33,
        lr: 1e-2,
        anchor_lr_scale,
        seed: 0,
    };
    // Untrained anchors know nothing: training everything, the loss falls.
    let losses = family().train(&options(80, 1.0), &mut |_, _| {}).unwrap();
    let mean = |s: &[f64]| s.iter().sum::<f64>() / s.len() as f64;
    assert!(
        mean(&losses[60..]) < mean(&losses[..20]) - 0.3,
        "{:.3} → {:.3}",
        mean(&losses[..20]),
        mean(&losses[60..])
    );
    // Frozen anchors: only the stitching layers move.
    let mut frozen = family();
    let snapshot = |f: &Family| -> (Vec<Tensor>, Vec<Tensor>) {
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
    frozen.train(&options(10, 0.0), &mut |_, _| {}).unwrap();
    let after = snapshot(&frozen);
    assert!(
        before.0.iter().zip(&after.0).all(|(a, b)| a.equal(b)),
        "frozen anchors changed"
    );
    assert!(
        before.1.iter().zip(&after.1).any(|(a, b)| !a.equal(b)),
        "no stitch moved"
    );
}
