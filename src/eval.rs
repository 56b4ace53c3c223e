//! `amalgam eval MODEL...`: per-domain loss, perplexity and next-token
//! accuracy on the corpus' held-out splits, for checkpoints and the networks
//! of stitched families — or on any text file (`--text`), tokenized with each
//! model's own tokenizer.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::Args as ClapArgs;

use amalgam_checkpoint::kind_from_dtype;
use amalgam_elastic::stitch::{Network, StitchedFamily};
use amalgam_nn::data::{Domain, Split};
use amalgam_nn::eval::{DomainScore, EvalOptions, TextOptions};
use amalgam_nn::evaluation::{corpus_domains, Evaluated, Evaluation, Material, Settings, Work};
use amalgam_nn::text::CHUNKING;
use amalgam_recipe::FloatDtype;

/// The windows scored per corpus domain when --max-windows is not given.
const CORPUS_WINDOWS: usize = 256;

#[derive(ClapArgs)]
pub struct Args {
    /// Model directories (Hugging Face checkpoints of a supported family, or
    /// stitched families).
    #[arg(required = true)]
    models: Vec<PathBuf>,
    /// Comma-separated domains (default: the general ones, prose, code and
    /// legal; the study domains are german, spanish, italian, c, perl, cpp).
    #[arg(long, value_delimiter = ',')]
    domains: Vec<String>,
    /// Which split of the corpus to score: eval (held out from everything)
    /// or validation (the study domains' split for choosing settings).
    #[arg(long, default_value = "eval", value_parser = ["eval", "validation"])]
    split: String,
    /// Score these text files instead of the corpus, each tokenized with
    /// each model's own tokenizer and scored whole as lm-evaluation-harness's
    /// rolling log-likelihood scores a document: a plain file is one
    /// document, a `.jsonl` file one per line (the string at `--field`).
    /// Reports loss, perplexity and bits per byte per file. Files are read,
    /// tokenized and scored a stretch at a time, in memory independent of
    /// their size (a `.jsonl` line is held whole).
    #[arg(long, num_args = 1.., conflicts_with_all = ["domains", "route"])]
    text: Vec<PathBuf>,
    /// The field of each `.jsonl` line that holds its document.
    #[arg(long, default_value = "text")]
    field: String,
    /// With --text: each window after a document's first sees this many
    /// tokens before its first prediction (1: disjoint windows, as
    /// lm-evaluation-harness scores Hugging Face models).
    #[arg(long, default_value_t = 1)]
    stride: usize,
    #[command(flatten)]
    windows: crate::options::Windows,
    /// At most this many windows per domain of the corpus (default 256), or
    /// per text file (default: all of it; the text after them is not read,
    /// and bits per byte count the bytes scored).
    #[arg(long)]
    max_windows: Option<usize>,
    /// With a stitched family: only these routes (default: every network).
    #[arg(long)]
    route: Vec<String>,
    /// Also compare each model's next-token predictions with this model's
    /// (agreement and KL(reference ‖ model)), e.g. a submodel against the
    /// full model it was cut from.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
    /// One row per model (loss and accuracy per domain, mean loss) instead of
    /// one row per model and domain.
    #[arg(long, conflicts_with = "json")]
    by_model: bool,
    #[command(flatten)]
    device: crate::options::DeviceOption,
    /// Compute in this dtype: float32, or bfloat16/float16 for half the
    /// weights' memory (a BF16 checkpoint too big for F32).
    #[arg(long, default_value = "float32")]
    dtype: FloatDtype,
    #[command(flatten)]
    max_memory: crate::options::MaxMemory,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let split = if args.split == "validation" {
        Split::Validation
    } else {
        Split::Eval
    };
    let names = match args.domains.is_empty() {
        true => Domain::GENERAL
            .iter()
            .map(|d| d.name().to_owned())
            .collect(),
        false => args.domains.clone(),
    };
    let domains = corpus_domains(&names, split)?;
    let seq_len = args.windows.seq_len;
    if seq_len < 2 {
        return Err(anyhow!("--seq-len must be at least 2"));
    }
    if args.max_windows == Some(0) {
        return Err(anyhow!(
            "--max-windows must be at least 1 (it is how many windows each domain scores)"
        ));
    }
    if args.stride == 0 {
        return Err(anyhow!("--stride must be at least 1"));
    }
    let corpus = EvalOptions {
        seq_len,
        max_windows: args.max_windows.unwrap_or(CORPUS_WINDOWS),
        batch: args.windows.batch.max(1),
    };
    let settings = Settings {
        text: TextOptions {
            seq_len,
            stride: args.stride,
            batch: corpus.batch,
            max_windows: args.max_windows,
            chunking: CHUNKING,
        },
        device: args.device.resolve()?,
        dtype: args.dtype.safetensors(),
        memory_limit: args.max_memory.limit(),
        corpus,
    };
    let material = match args.text.is_empty() {
        true => Material::corpus(&domains, split, &settings.corpus)?,
        false => Material::texts(&args.text, &args.field)?,
    };
    let kind = kind_from_dtype(settings.dtype).expect("a float dtype");
    let device = settings.device;
    let mut evaluation = Evaluation::new(material, settings);
    if let Some(reference) = &args.reference {
        evaluation.set_reference(reference)?;
    }
    let bar = |name: &str| match evaluation.work() {
        Work::Windows(n) => crate::progress::steps(n, name, quiet),
        Work::Bytes(n) => crate::progress::bytes(n, name, quiet),
    };
    let mut results: Vec<Reported> = vec![];
    for path in &args.models {
        if StitchedFamily::is_family(path) {
            let family = StitchedFamily::load(path, device, kind)?;
            // Every network reads and writes the anchors' shared tokens.
            evaluation.check_vocabulary(&family.anchors[0], path)?;
            let tokenizer = evaluation.tokenizer(&family.dirs[0])?;
            let names: Vec<&str> = if args.route.is_empty() {
                family.members.iter().map(|m| m.name.as_str()).collect()
            } else {
                args.route.iter().map(String::as_str).collect()
            };
            for name in names {
                let member = family.member(name).ok_or_else(|| {
                    anyhow!(
                        "{}: no route {name:?} (the family has: {})",
                        path.display(),
                        family
                            .members
                            .iter()
                            .map(|m| m.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
                let name = format!("{}#{name}", path.display());
                let bar = bar(&name);
                let scores = evaluation.score(
                    &name,
                    &family.scorer(member),
                    tokenizer.as_ref(),
                    &family.dirs[0],
                    &mut |n| bar.inc(n),
                )?;
                bar.finish_and_clear();
                results.push(Reported {
                    evaluated: Evaluated {
                        model: name,
                        parameters: member.parameters as usize,
                        scores,
                    },
                    stitched: Some((
                        member.flops_per_token,
                        match member.network {
                            Network::Anchor(_) => "anchors",
                            Network::Stitched(..) => "stitched routes",
                        },
                    )),
                });
            }
            continue;
        }
        if !args.route.is_empty() {
            return Err(anyhow!(
                "{}: --route needs a stitched family (amalgam stitch)",
                path.display()
            ));
        }
        let bar = bar(&path.display().to_string());
        let evaluated = evaluation.checkpoint(path, &mut |n| bar.inc(n))?;
        bar.finish_and_clear();
        results.push(Reported {
            evaluated,
            stitched: None,
        });
    }
    if args.json {
        let value: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut entry = serde_json::json!({
                    "model": r.evaluated.model,
                    "parameters": r.evaluated.parameters,
                    "domains": r.evaluated.scores,
                });
                if let Some((flops, group)) = &r.stitched {
                    entry["flops_per_token"] = (*flops).into();
                    entry["group"] = (*group).into();
                }
                entry
            })
            .collect();
        println!("{}", serde_json::to_string_pretty(&value)?);
        return Ok(());
    }
    if args.by_model {
        print_by_model(&results);
        return Ok(());
    }
    let compared = evaluation.has_reference();
    let text = evaluation.is_text();
    println!(
        "| model | {} | loss | perplexity |{} accuracy | tokens |{}",
        if text { "text" } else { "domain" },
        if text { " bits/byte |" } else { "" },
        if compared { " agreement | KL |" } else { "" }
    );
    println!(
        "|---|---|---|---|{}---|---|{}",
        if text { "---|" } else { "" },
        if compared { "---|---|" } else { "" }
    );
    for r in &results {
        for s in &r.evaluated.scores {
            println!(
                "| {} | {} | {:.4} | {:.3} |{} {:.4} | {} |{}",
                r.evaluated.model,
                s.domain,
                s.loss,
                s.perplexity,
                s.bits_per_byte
                    .map(|b| format!(" {b:.4} |"))
                    .unwrap_or_default(),
                s.accuracy,
                s.tokens,
                consistency(s)
            );
        }
    }
    Ok(())
}

/// One model's scores, as reported.
struct Reported {
    evaluated: Evaluated,
    /// For the networks of a stitched family: FLOPs per token, and
    /// `anchors` or `stitched routes`.
    stitched: Option<(u64, &'static str)>,
}

/// The agreement and KL cells, when scored against a reference.
fn consistency(s: &DomainScore) -> String {
    match (s.agreement, s.kl) {
        (Some(agreement), Some(kl)) => format!(" {agreement:.4} | {kl:.4} |"),
        _ => String::new(),
    }
}

fn print_by_model(results: &[Reported]) {
    let domains: Vec<&str> = results[0]
        .evaluated
        .scores
        .iter()
        .map(|s| s.domain.as_str())
        .collect();
    let compared = results[0].evaluated.scores[0].agreement.is_some();
    let mut header = String::from("| model | parameters |");
    for d in &domains {
        header += &format!(" {d} loss | {d} acc |");
    }
    let extra = if compared { " agreement | KL |" } else { "" };
    println!("{header} mean loss |{extra}");
    println!(
        "|---|---:|{}---|{}",
        "---|---|".repeat(domains.len()),
        if compared { "---|---|" } else { "" }
    );
    for Reported { evaluated: r, .. } in results {
        let mut row = format!("| {} | {} |", r.model, r.parameters);
        for s in &r.scores {
            row += &format!(" {:.4} | {:.4} |", s.loss, s.accuracy);
        }
        let n = r.scores.len() as f64;
        let mean = |f: &dyn Fn(&DomainScore) -> Option<f64>| -> Option<f64> {
            r.scores.iter().map(f).sum::<Option<f64>>().map(|s| s / n)
        };
        let loss = mean(&|s| Some(s.loss)).unwrap_or_default();
        let tail = match (mean(&|s| s.agreement), mean(&|s| s.kl)) {
            (Some(a), Some(kl)) => format!(" {a:.4} | {kl:.4} |"),
            _ => String::new(),
        };
        println!("{row} {loss:.4} |{tail}");
    }
}
