//! `amalgam inspect`: what a checkpoint holds.

use std::collections::BTreeMap;
use std::path::PathBuf;

use amalgam_checkpoint::{arch, hub, Checkpoint};
use anyhow::Result;
use rayon::prelude::*;
use serde::Serialize;
use sha2::{Digest, Sha256};

/// Show a checkpoint's architecture, parameter count, dtypes, shards and tensors.
#[derive(clap::Args)]
#[command(
    after_help = "Examples:\n  amalgam inspect work/models/base\n  amalgam inspect work/models/base --json --hashes | jq '.tensors[0]'"
)]
pub struct Args {
    /// A Hugging Face checkpoint directory.
    dir: PathBuf,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Add each tensor's SHA-256 (of its stored bytes); reads all the data.
    #[arg(long)]
    hashes: bool,
}

#[derive(Serialize)]
struct Report {
    path: PathBuf,
    architecture: Option<String>,
    model_type: Option<String>,
    layers: usize,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    vocab_size: Option<usize>,
    tie_word_embeddings: bool,
    parameters: u64,
    tensor_count: usize,
    dtypes: BTreeMap<String, DtypeSummary>,
    shards: Vec<ShardSummary>,
    tensors: Vec<TensorRow>,
}

#[derive(Serialize, Default)]
struct DtypeSummary {
    tensors: usize,
    parameters: u64,
    bytes: u64,
}

#[derive(Serialize)]
struct ShardSummary {
    file: String,
    tensors: usize,
    bytes: u64,
}

#[derive(Serialize)]
struct TensorRow {
    name: String,
    dtype: String,
    shape: Vec<usize>,
    shard: String,
    byte_range: [u64; 2],
    #[serde(skip_serializing_if = "Option::is_none")]
    sha256: Option<String>,
}

pub fn run(args: Args) -> Result<()> {
    let checkpoint = Checkpoint::open(hub::locate(&args.dir.to_string_lossy())?)?;
    let report = report(&checkpoint, args.hashes)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_tables(&report);
    }
    Ok(())
}

fn report(checkpoint: &Checkpoint, hashes: bool) -> Result<Report> {
    let config = checkpoint.config();
    let shard_names: Vec<String> = checkpoint.shard_names().map(str::to_owned).collect();
    let mut dtypes: BTreeMap<String, DtypeSummary> = BTreeMap::new();
    let mut shards: Vec<ShardSummary> = shard_names
        .iter()
        .map(|file| ShardSummary {
            file: file.clone(),
            tensors: 0,
            bytes: 0,
        })
        .collect();
    for entry in checkpoint.tensors() {
        let bytes = entry.byte_range.end - entry.byte_range.start;
        let summary = dtypes.entry(format!("{:?}", entry.dtype)).or_default();
        summary.tensors += 1;
        summary.parameters += entry.numel();
        summary.bytes += bytes;
        shards[entry.shard].tensors += 1;
        shards[entry.shard].bytes += bytes;
    }
    let tensors = checkpoint
        .tensors()
        .par_iter()
        .map(|entry| {
            let sha256 = match hashes {
                true => Some(
                    Sha256::digest(checkpoint.read_bytes(entry)?)
                        .iter()
                        .map(|b| format!("{b:02x}"))
                        .collect(),
                ),
                false => None,
            };
            Ok(TensorRow {
                name: entry.name.clone(),
                dtype: format!("{:?}", entry.dtype),
                shape: entry.shape.clone(),
                shard: shard_names[entry.shard].clone(),
                byte_range: [entry.byte_range.start, entry.byte_range.end],
                sha256,
            })
        })
        .collect::<amalgam_checkpoint::Result<_>>()?;
    Ok(Report {
        path: checkpoint.dir().to_path_buf(),
        architecture: config.architecture().map(str::to_owned),
        model_type: config.model_type().map(str::to_owned),
        layers: arch::layer_count(checkpoint.tensors().iter().map(|t| t.name.as_str())),
        hidden_size: config.usize("hidden_size"),
        intermediate_size: config.usize("intermediate_size"),
        vocab_size: config.usize("vocab_size"),
        tie_word_embeddings: checkpoint.is_tied(),
        parameters: checkpoint.parameter_count(),
        tensor_count: checkpoint.tensors().len(),
        dtypes,
        shards,
        tensors,
    })
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

fn print_tables(r: &Report) {
    let opt = |v: Option<usize>| v.map_or("?".to_owned(), |v| v.to_string());
    println!("checkpoint    {}", r.path.display());
    println!(
        "architecture  {} ({})",
        r.architecture.as_deref().unwrap_or("unknown"),
        r.model_type.as_deref().unwrap_or("?")
    );
    println!(
        "shape         {} layers, hidden {}, FFN {}, vocab {}, tied embeddings: {}",
        r.layers,
        opt(r.hidden_size),
        opt(r.intermediate_size),
        opt(r.vocab_size),
        if r.tie_word_embeddings { "yes" } else { "no" }
    );
    println!("parameters    {}", thousands(r.parameters));
    println!("tensors       {}", r.tensor_count);
    for (dtype, s) in &r.dtypes {
        println!(
            "dtype {dtype:<7} {} tensors, {} parameters, {} bytes",
            s.tensors,
            thousands(s.parameters),
            thousands(s.bytes)
        );
    }
    println!("shards        {}", r.shards.len());
    for s in &r.shards {
        println!(
            "  {:<36} {:>5} tensors {:>16} bytes",
            s.file,
            s.tensors,
            thousands(s.bytes)
        );
    }
    let width = r
        .tensors
        .iter()
        .map(|t| t.name.len())
        .max()
        .unwrap_or(4)
        .max(4);
    println!();
    println!(
        "{:<width$}  {:<6} {:<16} {:<8} shard",
        "name", "dtype", "shape", "MB"
    );
    for t in &r.tensors {
        let shape = format!("{:?}", t.shape);
        let mb = (t.byte_range[1] - t.byte_range[0]) as f64 / 1e6;
        print!(
            "{:<width$}  {:<6} {:<16} {:<8.2} {}",
            t.name, t.dtype, shape, mb, t.shard
        );
        match &t.sha256 {
            Some(h) => println!("  {h}"),
            None => println!(),
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn thousands_groups_digits() {
        assert_eq!(super::thousands(1_100_048_384), "1,100,048,384");
        assert_eq!(super::thousands(999), "999");
        assert_eq!(super::thousands(1000), "1,000");
    }
}
