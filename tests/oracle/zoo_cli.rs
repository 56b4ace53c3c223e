//! End to end: `amalgam zoo build --size micro` trains every zoo member, each
//! loads in transformers, a second build reuses them, `amalgam eval` scores
//! them per domain, `amalgam stitch` joins the two anchors (and the
//! stitching set's deep pair, trained, gives routes between its anchors), and
//! PLeaS merges the two differently initialised models.

use crate::common;

use common::*;
use serde_json::Value;
use std::ffi::OsStr;
use std::path::Path;

/// `amalgam eval DIRS --json --seq-len 65 EXTRA`, parsed.
fn eval_json<P: AsRef<Path>>(dirs: &[P], extra: &[&str]) -> Value {
    let mut args: Vec<&OsStr> = vec!["eval".as_ref()];
    args.extend(dirs.iter().map(|d| d.as_ref().as_os_str()));
    args.extend(["--json", "--seq-len", "65"].map(OsStr::new));
    args.extend(extra.iter().map(OsStr::new));
    serde_json::from_str(&ok(args)).unwrap()
}

/// An `eval --json` entry's loss averaged over its domains.
fn mean_loss(entry: &Value) -> f64 {
    let losses: Vec<f64> = entry["domains"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["loss"].as_f64().unwrap())
        .collect();
    losses.iter().sum::<f64>() / losses.len() as f64
}

#[test]
fn micro_zoo_builds_loads_in_transformers_and_evaluates() {
    let tmp = tempfile::tempdir().unwrap();
    let (micro, members) = micro_zoo(None);
    assert_eq!(
        members,
        [
            "base",
            "expert-prose",
            "expert-code",
            "expert-legal",
            "init-b",
            "init-b-code",
            "anchor-small"
        ]
    );
    let record = |m: &str| std::fs::read(micro.join(m).join("zoo-member.json")).unwrap();
    let before: Vec<Vec<u8>> = members.iter().map(|m| record(m)).collect();

    // Up to date: nothing retrained (records unchanged, not rewritten).
    micro_zoo(None);
    let after: Vec<Vec<u8>> = members.iter().map(|m| record(m)).collect();
    assert_eq!(before, after);

    let dirs: Vec<_> = members.iter().map(|m| micro.join(m)).collect();
    let oracle = hf_oracle(&dirs.iter().map(|d| d.as_path()).collect::<Vec<_>>(), false);
    for d in &dirs {
        let report = &oracle[d.to_str().unwrap()];
        assert!(
            report["parameters"].as_u64().unwrap() > 0,
            "{}: {report}",
            d.display()
        );
    }

    let scores = eval_json(&dirs, &["--max-windows", "16"]);
    let loss = |model: &str, domain: &str| -> f64 {
        let entry = scores
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"].as_str().unwrap().ends_with(model))
            .unwrap();
        let score = entry["domains"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["domain"] == domain)
            .unwrap();
        let accuracy = score["accuracy"].as_f64().unwrap();
        assert!((0.0..=1.0).contains(&accuracy));
        score["loss"].as_f64().unwrap()
    };
    stitch_the_anchors(&micro, tmp.path());
    pleas_merges_base_and_init_b(&micro, tmp.path());
    let uniform = (amalgam_nn::tokenizer::VOCAB_SIZE as f64).ln();
    for domain in ["prose", "code", "legal"] {
        let base = loss("base", domain);
        assert!(
            base < uniform - 1.0,
            "{domain}: the base learned something ({base} vs {uniform})"
        );
        let expert = loss(&format!("expert-{domain}"), domain);
        assert!(
            expert < base,
            "{domain}: its expert ({expert}) beats the base ({base})"
        );
    }
}

/// `amalgam stitch` on the micro zoo's two anchors: a family of both anchors
/// and one stitched route each way, which `eval` scores; its anchors score as
/// the checkpoints they came from.
fn stitch_the_anchors(micro: &Path, tmp: &Path) {
    let recipe = tmp.join("stitch.yml");
    std::fs::write(
        &recipe,
        format!(
            "kind: stitch\nanchors: [{}, {}]\ncalibration: {{samples: 8, seq_len: 65}}\n",
            micro.join("anchor-small").display(),
            micro.join("base").display()
        ),
    )
    .unwrap();
    let family = tmp.join("family");
    ok(["stitch".as_ref(), recipe.as_os_str(), family.as_os_str()]);
    const ONE_DOMAIN: [&str; 4] = ["--max-windows", "4", "--domains", "code"];
    let eval_dir = |dir: &Path, extra: &[&str]| -> Value {
        eval_json(&[dir], &[extra, &ONE_DOMAIN[..]].concat())
    };
    let eval = |extra: &[&str]| eval_dir(&family, extra);
    let all = eval(&[]);
    let names: Vec<&str> = all
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["model"].as_str().unwrap().rsplit('#').next().unwrap())
        .collect();
    assert_eq!(names, ["anchor-0", "anchor-1", "0:1-1:1", "1:1-0:1"]);
    let base = eval_dir(&micro.join("base"), &[]);
    assert_eq!(
        all[1]["domains"], base[0]["domains"],
        "anchor-1 is the base"
    );
    assert_eq!(all[1]["parameters"], base[0]["parameters"]);
    for route in &all.as_array().unwrap()[2..] {
        assert!(route["flops_per_token"].as_u64().unwrap() > 0);
        assert!(route["domains"][0]["loss"].as_f64().unwrap().is_finite());
    }
    let one = eval(&["--route", "1:1-0:1"]);
    assert_eq!(one.as_array().unwrap().len(), 1);
    assert_eq!(one[0]["domains"], all[3]["domains"]);
    let message = fails([
        "eval".as_ref(),
        family.as_os_str(),
        "--route".as_ref(),
        "9:9-9:9".as_ref(),
    ]);
    assert!(
        message.contains("no route \"9:9-9:9\"") && message.contains("0:1-1:1"),
        "{message}"
    );
    let message = fails(["stitch".as_ref(), recipe.as_os_str(), family.as_os_str()]);
    assert!(message.contains("not empty"), "{message}");
    // One route exported alone is the same network: same scores and size.
    let exported = tmp.join("route");
    ok([
        "stitch".as_ref(),
        "export".as_ref(),
        "1:1-0:1".as_ref(),
        family.as_os_str(),
        exported.as_os_str(),
    ]);
    let alone = eval_dir(&exported, &[]);
    assert_eq!(alone.as_array().unwrap().len(), 1);
    assert_eq!(alone[0]["domains"], all[3]["domains"]);
    assert_eq!(alone[0]["parameters"], all[3]["parameters"]);
    let message = fails([
        "stitch".as_ref(),
        "export".as_ref(),
        "anchor-0".as_ref(),
        family.as_os_str(),
        tmp.join("x").as_os_str(),
    ]);
    assert!(message.contains("is an anchor"), "{message}");
    // A family is never written over, into or around an anchor it reads:
    // an export into its own family, a family inside an anchor.
    let before = listing(&family);
    let message = fails([
        "stitch".as_ref(),
        "export".as_ref(),
        "1:1-0:1".as_ref(),
        family.as_os_str(),
        family.as_os_str(),
        "--force".as_ref(),
    ]);
    assert!(
        message.contains("refusing to write over input"),
        "{message}"
    );
    assert_eq!(listing(&family), before, "the family is untouched");
    let inside = micro.join("base").join("family");
    let message = fails(["stitch".as_ref(), recipe.as_os_str(), inside.as_os_str()]);
    assert!(
        message.contains("refusing to write over input"),
        "{message}"
    );
    assert!(!inside.exists(), "nothing left inside the anchor");
    // The shipped example recipes are valid stitching recipes.
    let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes/stitch");
    for entry in std::fs::read_dir(examples).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        amalgam_recipe::StitchRecipe::parse(&text, &path.display().to_string())
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

#[test]
fn eval_and_zoo_refuse_bad_arguments_by_name() {
    let message = fails(["eval", "/nonexistent/model"]);
    assert!(message.contains("/nonexistent/model"), "{message}");
    assert_eq!(
        message.matches("is not a local directory").count(),
        1,
        "the cause once: {message}"
    );
    let message = fails(["eval", "x", "--domains", "prose,french"]);
    assert!(message.contains("unknown domain \"french\""), "{message}");
    let message = fails(["eval", "x", "--seq-len", "10000000"]);
    assert!(
        message.contains("longer than the prose held-out text (pass a smaller --seq-len)"),
        "{message}"
    );
    let message = fails(["zoo", "build", "--size", "huge"]);
    assert!(message.contains("unknown zoo size \"huge\""), "{message}");
}

/// `merge_method: pleas` on `base` and `init-b` (same data, different
/// initialisations): naive averaging is far worse than either model, aligning
/// first helps, least squares helps more, and a larger budget more again; the
/// 1× and 2× outputs are checkpoints transformers computes as we do.
fn pleas_merges_base_and_init_b(micro: &Path, tmp: &Path) {
    let merge = |name: &str, parameters: &str| {
        let recipe = tmp.join(format!("pleas-{name}.yml"));
        std::fs::write(
            &recipe,
            format!(
                "merge_method: pleas\nmodels:\n  - model: {}\n  - model: {}\nparameters:\n  seq_len: 64\n{parameters}",
                micro.join("base").display(),
                micro.join("init-b").display()
            ),
        )
        .unwrap();
        let out = tmp.join(format!("pleas-{name}"));
        ok(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
        out
    };
    let naive = merge("naive", "  matching: none\n  least_squares: false\n");
    let aligned = merge("aligned", "  least_squares: false\n");
    let pleas = merge("1x", "  budget: 1\n");
    let wider = merge("2x", "  budget: 2\n");
    // `--dry-run` states the plan — the widths the merge then wrote — and its
    // peak memory, and writes nothing; a budget below the estimate refuses.
    let recipe = tmp.join("pleas-2x.yml");
    let planned = tmp.join("pleas-planned");
    let args = |extra: &[&str]| {
        let mut args = vec![
            "merge".into(),
            recipe.clone().into_os_string(),
            planned.clone().into_os_string(),
        ];
        args.extend(extra.iter().map(std::ffi::OsString::from));
        args
    };
    let plan = ok(args(&["--dry-run"]));
    assert!(!planned.exists(), "{plan}");
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(wider.join("config.json")).unwrap()).unwrap();
    for expected in [
        format!(": hidden {} (", config["hidden_size"]),
        format!(", {} KV heads (", config["num_key_value_heads"]),
        "two passes".to_string(),
        "peak memory ≈".to_string(),
    ] {
        assert!(plan.contains(&expected), "{expected:?} not in {plan}");
    }
    let refused = fails(args(&["--max-memory", "100MB"]));
    assert!(refused.contains("this PLeaS merge"), "{refused}");
    assert!(!planned.exists());
    let weight = merge("weight", "  matching: weight\n  calibration: random\n");
    // Same recipe, same threads: the same bytes.
    let again = merge("2x-again", "  budget: 2\n");
    let weights = |dir: &Path| std::fs::read(dir.join("model.safetensors")).unwrap();
    assert!(weights(&wider) == weights(&again), "a second run differs");

    // Wider: every group grew (KV heads first), widths uniform across layers.
    let config: Value =
        serde_json::from_slice(&std::fs::read(wider.join("config.json")).unwrap()).unwrap();
    assert!(config["hidden_size"].as_u64().unwrap() > 32, "{config}");
    assert_eq!(config["num_key_value_heads"], 4, "{config}");
    assert_eq!(config["num_attention_heads"], 8, "{config}");
    assert!(
        config["intermediate_size"].as_u64().unwrap() > 96,
        "{config}"
    );

    // transformers computes our logits on the 1x and the 2x merge.
    let ids: Vec<i64> = (0..2 * 40).map(|i| (i * 37 + 5) % 258).collect();
    let ids = tch::Tensor::from_slice(&ids).view([2, 40]);
    for merged in [&pleas, &wider] {
        let ours = amalgam_nn::Decoder::load(merged, tch::Device::Cpu).unwrap();
        let logits = tch::no_grad(|| ours.forward(&ids));
        let (diff, report) = transformers_logit_diff(merged, &ids, &logits, tmp);
        assert!(
            diff <= 1e-4,
            "{}: transformers differs by {diff}: {report}",
            merged.display()
        );
    }

    let dirs = [
        micro.join("base"),
        micro.join("init-b"),
        naive,
        aligned,
        pleas,
        wider,
        weight,
    ];
    let scores = eval_json(&dirs, &["--max-windows", "16"]);
    let loss_of = |dir: &Path| -> f64 {
        let entry = scores
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["model"].as_str().unwrap() == dir.to_str().unwrap())
            .unwrap();
        mean_loss(entry)
    };
    let [base, init_b, naive, aligned, pleas, wider, weight] = dirs.map(|d| loss_of(&d));
    let table = format!(
        "base {base:.3}, init-b {init_b:.3}, naive {naive:.3}, aligned {aligned:.3}, \
         pleas 1x {pleas:.3}, 2x {wider:.3}, weight-matched (random calibration) {weight:.3}"
    );
    assert!(
        naive > base.max(init_b) + 0.5,
        "naive averaging is far worse: {table}"
    );
    assert!(aligned < naive - 0.15, "aligning first helps: {table}");
    assert!(pleas < aligned - 0.1, "least squares help: {table}");
    assert!(wider < pleas - 0.1, "a larger budget helps: {table}");
    assert!(
        weight < aligned,
        "data-free PLeaS beats permute-then-average: {table}"
    );
}

/// The zoo's stitching set: its deep pair (one depth, two widths), stitched by
/// least squares and then trained with distillation, gives routes between
/// the anchors on the FLOPs–loss plane, as `scripts/stitch-table.sh` shows
/// at the small size; training lowers every route's loss far below least
/// squares'.
#[test]
fn deep_anchors_of_one_family_give_routes_between_them() {
    let tmp = tempfile::tempdir().unwrap();
    let (micro, members) = micro_zoo(Some("stitching"));
    assert_eq!(
        members,
        [
            "base",
            "anchor-small",
            "base-long",
            "anchor-small-long",
            "deep-narrow",
            "deep-wide"
        ]
    );
    let family = |name: &str, train: &str| -> Vec<(String, u64, f64)> {
        let recipe = tmp.path().join(format!("{name}.yml"));
        std::fs::write(
            &recipe,
            format!(
                "kind: stitch\nanchors: [{}, {}]\ncalibration: {{samples: 64, seq_len: 65}}\n{train}",
                micro.join("deep-narrow").display(),
                micro.join("deep-wide").display()
            ),
        )
        .unwrap();
        let out = tmp.path().join(name);
        ok(["stitch".as_ref(), recipe.as_os_str(), out.as_os_str()]);
        eval_json(&[&out], &["--max-windows", "16"])
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let name = e["model"].as_str().unwrap().rsplit('#').next().unwrap();
                (
                    name.to_owned(),
                    e["flops_per_token"].as_u64().unwrap(),
                    mean_loss(e),
                )
            })
            .collect()
    };
    let least_squares = family("deep", "");
    let distilled = family(
        "deep-distilled",
        "train: {steps: 4000, batch: 16, seq_len: 65, lr: 0.001, anchor_lr_scale: 0.1, distill: 0.5}\n",
    );
    let routes = amalgam_elastic::stitch::family_routes([4, 4]);
    assert_eq!(distilled.len(), 2 + routes.len());
    let mean_route =
        |f: &[(String, u64, f64)]| f[2..].iter().map(|r| r.2).sum::<f64>() / (f.len() - 2) as f64;
    let (before, after) = (mean_route(&least_squares), mean_route(&distilled));
    assert!(
        after < before - 0.2,
        "training lowers the routes' mean loss: {before:.4} → {after:.4}"
    );
    let (small, large) = (&distilled[0], &distilled[1]);
    let between: Vec<&(String, u64, f64)> = distilled[2..]
        .iter()
        .filter(|r| small.1 < r.1 && r.1 < large.1)
        .filter(|r| large.2 + 0.01 < r.2 && r.2 < small.2 - 0.05)
        .collect();
    assert!(
        !between.is_empty(),
        "a route lies between the anchors {small:?} and {large:?}: {distilled:?}"
    );
}
