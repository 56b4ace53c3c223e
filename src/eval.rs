//! `amalgam eval MODEL...`: per-domain loss, perplexity and next-token
//! accuracy on the corpus' held-out splits.

use std::path::PathBuf;

use anyhow::{anyhow, Context, Result};
use clap::Args as ClapArgs;

use amalgam_nn::data::{Domain, Split};
use amalgam_nn::eval::{check_vocabulary, evaluate, window_count, DomainScore, EvalOptions};
use amalgam_nn::Llama;

#[derive(ClapArgs)]
pub struct Args {
    /// Model directories (Hugging Face Llama checkpoints).
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Comma-separated domains (default: all).
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Tokens per evaluation window.
    #[arg(long, default_value_t = 129)]
    seq_len: usize,
    /// At most this many windows per domain.
    #[arg(long, default_value_t = 256)]
    max_windows: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// One row per model (loss and accuracy per domain, mean loss) instead of
    /// one row per model and domain.
    #[arg(long, conflicts_with = "json")]
    by_model: bool,
    #[arg(long, default_value = "cpu")]
    device: String,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let domains = if args.domains.is_empty() {
        Domain::ALL.to_vec()
    } else {
        args.domains
            .iter()
            .map(|name| {
                Domain::parse(name)
                    .ok_or_else(|| anyhow!("unknown domain {name:?} (prose, code or legal)"))
            })
            .collect::<Result<_>>()?
    };
    if args.seq_len < 2 {
        return Err(anyhow!("--seq-len must be at least 2"));
    }
    let device = crate::device::parse(&args.device)?;
    let options = EvalOptions {
        seq_len: args.seq_len,
        max_windows: args.max_windows,
        batch: args.batch.max(1),
    };
    let counts: Vec<usize> = domains.iter().map(|&d| window_count(d, &options)).collect();
    if let Some((domain, _)) = domains.iter().zip(&counts).find(|(_, &n)| n == 0) {
        return Err(anyhow!(
            "--seq-len {} is longer than the {} held-out text ({} tokens)",
            args.seq_len,
            domain.name(),
            domain.tokens(Split::Eval).len()
        ));
    }
    let total: usize = counts.iter().sum();
    let mut results: Vec<(String, Vec<DomainScore>)> = vec![];
    for path in &args.models {
        let model =
            Llama::load(path, device).with_context(|| format!("loading {}", path.display()))?;
        check_vocabulary(&model).with_context(|| path.display().to_string())?;
        let bar = crate::progress::steps(total as u64, &path.display().to_string(), quiet);
        let scores = domains
            .iter()
            .map(|&d| evaluate(&model, d, &options, &mut |n| bar.inc(n as u64)))
            .collect();
        bar.finish_and_clear();
        results.push((path.display().to_string(), scores));
    }
    if args.json {
        let value: Vec<serde_json::Value> = results
            .iter()
            .map(|(model, scores)| serde_json::json!({"model": model, "domains": scores}))
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if args.by_model {
        print_by_model(&results);
        return Ok(());
    }
    println!("| model | domain | loss | perplexity | accuracy | tokens |");
    println!("|---|---|---|---|---|---|");
    for (model, scores) in &results {
        for s in scores {
            println!(
                "| {model} | {} | {:.4} | {:.3} | {:.4} | {} |",
                s.domain, s.loss, s.perplexity, s.accuracy, s.tokens
            );
        }
    }
    Ok(())
}

fn print_by_model(results: &[(String, Vec<DomainScore>)]) {
    let domains: Vec<&str> = results[0].1.iter().map(|s| s.domain).collect();
    let mut header = String::from("| model |");
    for d in &domains {
        header += &format!(" {d} loss | {d} acc |");
    }
    println!("{header} mean loss |");
    println!("|---|{}---|", "---|---|".repeat(domains.len()));
    for (model, scores) in results {
        let mut row = format!("| {model} |");
        for s in scores {
            row += &format!(" {:.4} | {:.4} |", s.loss, s.accuracy);
        }
        let mean = scores.iter().map(|s| s.loss).sum::<f64>() / scores.len() as f64;
        println!("{row} {mean:.4} |");
    }
}
