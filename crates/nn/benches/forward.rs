//! Evaluation throughput: our forward pass vs transformers' LlamaForCausalLM
//! on the same CPU, same checkpoint (the small zoo's shape, random weights),
//! same batch, in one run. Prints a table.
//!
//!     cargo bench -p amalgam-nn --bench forward

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::Instant;

use amalgam_checkpoint::ModelCard;
use amalgam_nn::zoo::ZooSize;
use amalgam_nn::{tokenizer, Llama};
use tch::{Device, Kind, Tensor};

const BATCH: i64 = 32;
const SEQ: i64 = 128;
const ITERS: usize = 7;

fn main() {
    let size = ZooSize::named("small").expect("the small zoo");
    let model = Llama::new(size.shape.clone(), Device::Cpu, 0);
    let tmp = tempfile::tempdir().expect("a temporary directory");
    let dir = tmp.path().join("model");
    model
        .save_with_tokenizer(&dir, &ModelCard::default())
        .expect("saved");
    let ids = Tensor::randint(
        tokenizer::VOCAB_SIZE as i64,
        [BATCH, SEQ],
        (Kind::Int64, Device::Cpu),
    );
    let mut times: Vec<f64> = tch::no_grad(|| {
        drop(model.forward(&ids));
        (0..ITERS)
            .map(|_| {
                let started = Instant::now();
                drop(model.forward(&ids));
                started.elapsed().as_secs_f64()
            })
            .collect()
    });
    times.sort_by(f64::total_cmp);
    let ours = (BATCH * SEQ) as f64 / times[ITERS / 2];
    let mut args = vec![dir.clone().into_os_string()];
    args.extend([BATCH, SEQ, ITERS as i64].map(|n| n.to_string().into()));
    let theirs = common::python_json("benches/hf_forward.py", &args);
    let theirs_rate = theirs["tokens_per_s"].as_f64().expect("a rate");
    println!(
        "Forward pass, F32, no grad: {} parameters, batch {BATCH} × {SEQ} tokens, median of {ITERS} calls",
        size.shape.parameter_count()
    );
    println!();
    println!("| implementation | threads | tokens / s |");
    println!("|---|---|---|");
    println!(
        "| amalgam-nn (tch) | {} | {ours:.0} |",
        tch::get_num_threads()
    );
    println!(
        "| transformers LlamaForCausalLM (sdpa) | {} | {theirs_rate:.0} |",
        theirs["threads"]
    );
    println!();
    println!("amalgam / transformers: {:.2}×", ours / theirs_rate);
}
