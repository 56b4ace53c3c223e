//! Evaluation throughput: our forward pass vs transformers' on the same CPU,
//! same checkpoint, same batch, in one run, for two shapes: the small zoo's
//! (a Llama amalgam builds) and Qwen2.5-0.5B's (random weights that
//! transformers builds). Prints a table.
//!
//!     cargo bench -p amalgam-nn --bench forward

/// The shared helpers may call Python here (transformers is the comparison).
const ORACLE_TIER: bool = true;

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::Instant;

use amalgam_checkpoint::ModelCard;
use amalgam_nn::Decoder;
use amalgam_zoo::ZooSize;
use tch::{Device, Kind, Tensor};

/// Tokens per second of our forward pass on `dir`'s model (median of `iters`
/// calls after a warm-up) and transformers' on the same checkpoint.
fn measure(dir: &Path, batch: i64, seq: i64, iters: usize) -> (usize, f64, serde_json::Value) {
    let model = Decoder::load(dir, Device::Cpu).expect("loads");
    let ids = Tensor::randint(
        model.config.vocab_size as i64,
        [batch, seq],
        (Kind::Int64, Device::Cpu),
    );
    let mut times: Vec<f64> = tch::no_grad(|| {
        drop(model.forward(&ids));
        (0..iters)
            .map(|_| {
                let started = Instant::now();
                drop(model.forward(&ids));
                started.elapsed().as_secs_f64()
            })
            .collect()
    });
    times.sort_by(f64::total_cmp);
    let ours = (batch * seq) as f64 / times[iters / 2];
    let parameters = model.config.parameter_count();
    drop(model);
    let mut args = vec![dir.as_os_str().to_owned()];
    args.extend([batch, seq, iters as i64].map(|n| n.to_string().into()));
    let theirs = common::python_json("benches/hf_forward.py", &args);
    (parameters, ours, theirs)
}

fn main() {
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let small = tmp.path().join("small");
    let size = ZooSize::named("small").expect("the small zoo");
    Decoder::new(size.shape.clone(), Device::Cpu, 0)
        .save_with_tokenizer(&small, &ModelCard::default())
        .expect("saved");
    let qwen = tmp.path().join("qwen2-0.5b");
    common::python_json(
        "benches/hf_forward.py",
        &["--build-qwen2-0.5b".as_ref(), qwen.as_os_str()],
    );
    println!("Forward pass, F32, no grad, median of the timed calls, same run:");
    println!();
    println!("| shape | parameters | batch × tokens | amalgam-nn tokens/s | transformers (sdpa) tokens/s | ratio | threads (ours/theirs) |");
    println!("|---|---|---|---|---|---|---|");
    for (label, dir, batch, seq, iters) in [
        ("small zoo (Llama)", &small, 32, 128, 7),
        ("Qwen2.5-0.5B (random weights)", &qwen, 1, 512, 3),
    ] {
        let (parameters, ours, theirs) = measure(dir, batch, seq, iters);
        let theirs_rate = theirs["tokens_per_s"].as_f64().expect("a rate");
        println!(
            "| {label} | {parameters} | {batch} × {seq} | {ours:.0} | {theirs_rate:.0} | {:.2}× | {}/{} |",
            ours / theirs_rate,
            tch::get_num_threads(),
            theirs["threads"]
        );
    }
}
