//! `amalgam eval MODEL...`: per-domain loss, perplexity and next-token
//! accuracy on the corpus' held-out splits, for checkpoints and the networks
//! of stitched families — or on any text file (`--text`), tokenized with each
//! model's own tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Args as ClapArgs;

use amalgam_checkpoint::{hub, kind_from_dtype, parse_dtype, Checkpoint, Dtype};
use amalgam_elastic::stitch::{Family, Network};
use amalgam_nn::data::{Domain, Split};
use amalgam_nn::eval::{
    check_vocabulary, corpus_windows, rolling_windows, score_windows, DomainScore, EvalOptions,
    LanguageModel, Window,
};
use amalgam_nn::text::{read_documents, TextTokenizer};
use amalgam_nn::{Decoder, DecoderConfig};

/// What one model is scored on under one label: a corpus domain or a text file.
#[derive(Clone)]
struct Scored {
    label: String,
    windows: Vec<Window>,
    /// The text's UTF-8 bytes (for bits per byte).
    bytes: Option<usize>,
}

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
    /// Reports loss, perplexity and bits per byte per file.
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
    /// Tokens per evaluation window (the model reads all but the last).
    #[arg(long, default_value_t = 129)]
    seq_len: usize,
    /// At most this many windows per domain of the corpus (--text scores
    /// every document whole).
    #[arg(long, default_value_t = 256)]
    max_windows: usize,
    #[arg(long, default_value_t = 32)]
    batch: usize,
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
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Compute in this dtype: float32, or bfloat16/float16 for half the
    /// weights' memory (a BF16 checkpoint too big for F32).
    #[arg(long, default_value = "float32")]
    dtype: String,
    /// Refuse models whose weights and forward pass are estimated to need
    /// more than this, e.g. 8GB (default: the memory available).
    #[arg(long)]
    max_memory: Option<String>,
}

/// Domains by name; an unknown one is an error listing the known ones.
pub fn parse_domains(names: &[String]) -> Result<Vec<Domain>> {
    names
        .iter()
        .map(|name| {
            Domain::parse(name)
                .ok_or_else(|| anyhow!("unknown domain {name:?} (known: {})", Domain::names()))
        })
        .collect()
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let domains = if args.domains.is_empty() {
        Domain::GENERAL.to_vec()
    } else {
        parse_domains(&args.domains)?
    };
    let split = if args.split == "validation" {
        Split::Validation
    } else {
        Split::Eval
    };
    for domain in &domains {
        domain.check_split(split)?;
    }
    if args.seq_len < 2 {
        return Err(anyhow!("--seq-len must be at least 2"));
    }
    if args.max_windows == 0 {
        return Err(anyhow!(
            "--max-windows must be at least 1 (it is how many windows each domain scores)"
        ));
    }
    let device = crate::device::parse(&args.device)?;
    let dtype = parse_dtype(&args.dtype)
        .filter(|d| matches!(d, Dtype::F32 | Dtype::BF16 | Dtype::F16))
        .ok_or_else(|| {
            anyhow!(
                "unknown --dtype {:?} (use float32, bfloat16 or float16)",
                args.dtype
            )
        })?;
    let options = EvalOptions {
        seq_len: args.seq_len,
        max_windows: args.max_windows,
        batch: args.batch.max(1),
    };
    // What is scored: the corpus's held-out domains, or the text files (their
    // tokens depend on each model's tokenizer, so they are made per model).
    let corpus: Vec<Scored> = domains
        .iter()
        .map(|d| Scored {
            label: d.name().to_owned(),
            windows: corpus_windows(&d.tokens(split), &options),
            bytes: None,
        })
        .collect();
    let texts = args
        .text
        .iter()
        .map(|path| {
            let documents = read_documents(path, &args.field)?;
            Ok((path.display().to_string(), documents))
        })
        .collect::<Result<Vec<_>>>()?;
    if args.stride == 0 {
        return Err(anyhow!("--stride must be at least 1"));
    }
    let streams_for = |dir: &Path, vocab: usize| -> Result<Vec<Scored>> {
        if texts.is_empty() {
            return Ok(corpus.clone());
        }
        let tokenizer = TextTokenizer::load(dir)?;
        let prefix = tokenizer.prefix_token().ok_or_else(|| {
            anyhow!(
                "{}: its tokenizer names no BOS or EOS token to start a document from",
                dir.display()
            )
        })?;
        texts
            .iter()
            .map(|(label, documents)| {
                let mut windows = Vec::new();
                for document in documents {
                    let tokens = tokenizer.encode(document, false)?;
                    if let Some(id) = tokens.iter().find(|&&id| id < 0 || id as usize >= vocab) {
                        return Err(anyhow!(
                            "{}: its tokenizer gives id {id}, outside the model's \
                             {vocab}-token vocabulary",
                            dir.display()
                        ));
                    }
                    windows.extend(rolling_windows(
                        &tokens,
                        prefix,
                        args.seq_len - 1,
                        args.stride,
                    ));
                }
                if windows.is_empty() {
                    return Err(anyhow!("{label}: no text to score"));
                }
                let bytes = documents.iter().map(String::len).sum();
                Ok(Scored {
                    label: label.clone(),
                    windows,
                    bytes: Some(bytes),
                })
            })
            .collect()
    };
    if texts.is_empty() {
        if let Some(scored) = corpus.iter().find(|s| s.windows.is_empty()) {
            return Err(anyhow!(
                "--seq-len {} is longer than the {} held-out text",
                args.seq_len,
                scored.label,
            ));
        }
    }
    // Windows are scored `batch` at a time.
    let batch = options.batch;
    let kind = kind_from_dtype(dtype).expect("a float dtype");
    let load = |path: &PathBuf| -> Result<(Decoder, PathBuf)> {
        let path = &hub::locate(&path.to_string_lossy())?;
        let checkpoint = Checkpoint::open(path)?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &path.join("config.json"))?;
        crate::resources::check_memory(
            (config.weight_bytes() / 32 * dtype.bitsize() as u64)
                .saturating_add(config.forward_bytes(batch, args.seq_len)),
            args.max_memory.as_deref(),
            "--max-memory",
            &format!(
                "evaluating {} at --batch {batch} --seq-len {}",
                path.display(),
                args.seq_len
            ),
        )?;
        let model = Decoder::load_as(path, device, kind)
            .with_context(|| format!("loading {}", path.display()))?;
        if texts.is_empty() {
            check_vocabulary(&model).with_context(|| path.display().to_string())?;
        }
        Ok((model, path.clone()))
    };
    let reference = args.reference.as_ref().map(load).transpose()?;
    let reference_streams = match &reference {
        Some((model, dir)) => Some(streams_for(dir, model.config.vocab_size)?),
        None => None,
    };
    let reference = reference.map(|(model, _)| model);
    let mut results: Vec<Evaluated> = vec![];
    let mut score = |name: String,
                     model: &dyn LanguageModel,
                     streams: Vec<Scored>,
                     parameters: usize,
                     stitched: Option<(u64, &'static str)>|
     -> Result<()> {
        if let Some(theirs) = &reference_streams {
            if theirs
                .iter()
                .map(|s| &s.windows)
                .ne(streams.iter().map(|s| &s.windows))
            {
                return Err(anyhow!(
                    "{name}: its tokenizer splits the text differently from the reference's; \
                     --reference compares models that share a tokenizer"
                ));
            }
        }
        if let Some(reference) = &reference {
            if reference.config.vocab_size != model.vocab_size() {
                return Err(anyhow!(
                    "{name}: vocabulary of {} tokens, the reference has {}",
                    model.vocab_size(),
                    reference.config.vocab_size
                ));
            }
        }
        let reference = reference.as_ref().map(|r| r as &dyn LanguageModel);
        let total: usize = streams.iter().map(|s| s.windows.len()).sum();
        let bar = crate::progress::steps(total as u64, &name, quiet);
        let scores = streams
            .iter()
            .map(|s| {
                let mut score =
                    score_windows(model, reference, &s.label, &s.windows, batch, &mut |n| {
                        bar.inc(n as u64)
                    });
                score.bits_per_byte = s.bytes.map(|bytes| {
                    score.loss * score.tokens as f64 / (bytes as f64 * std::f64::consts::LN_2)
                });
                score
            })
            .collect();
        bar.finish_and_clear();
        results.push(Evaluated {
            model: name,
            parameters,
            stitched,
            scores,
        });
        Ok(())
    };
    for path in &args.models {
        if Family::is_family(path) {
            let family = Family::load(path, device, kind)?;
            // Every network reads and writes the anchors' shared tokens.
            if texts.is_empty() {
                check_vocabulary(&family.anchors[0]).with_context(|| path.display().to_string())?;
            }
            let streams = streams_for(&family.dirs[0], family.anchors[0].config.vocab_size)?;
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
                score(
                    format!("{}#{name}", path.display()),
                    &family.scorer(member),
                    streams.clone(),
                    member.parameters as usize,
                    Some((
                        member.flops_per_token,
                        match member.network {
                            Network::Anchor(_) => "anchors",
                            Network::Stitched(..) => "stitched routes",
                        },
                    )),
                )?;
            }
            continue;
        }
        if !args.route.is_empty() {
            return Err(anyhow!(
                "{}: --route needs a stitched family (amalgam stitch)",
                path.display()
            ));
        }
        let (model, dir) = load(path)?;
        let streams = streams_for(&dir, model.config.vocab_size)?;
        score(
            path.display().to_string(),
            &model,
            streams,
            model.config.parameter_count(),
            None,
        )?;
    }
    if args.json {
        let value: Vec<serde_json::Value> = results
            .iter()
            .map(|r| {
                let mut entry = serde_json::json!({
                    "model": r.model,
                    "parameters": r.parameters,
                    "domains": r.scores,
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
    let compared = reference.is_some();
    let text = !texts.is_empty();
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
        for s in &r.scores {
            println!(
                "| {} | {} | {:.4} | {:.3} |{} {:.4} | {} |{}",
                r.model,
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

/// One model's scores.
struct Evaluated {
    model: String,
    parameters: usize,
    /// For the networks of a stitched family: FLOPs per token, and
    /// `anchors` or `stitched routes`.
    stitched: Option<(u64, &'static str)>,
    scores: Vec<DomainScore>,
}

/// The agreement and KL cells, when scored against a reference.
fn consistency(s: &DomainScore) -> String {
    match (s.agreement, s.kl) {
        (Some(agreement), Some(kl)) => format!(" {agreement:.4} | {kl:.4} |"),
        _ => String::new(),
    }
}

fn print_by_model(results: &[Evaluated]) {
    let domains: Vec<&str> = results[0]
        .scores
        .iter()
        .map(|s| s.domain.as_str())
        .collect();
    let compared = results[0].scores[0].agreement.is_some();
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
    for r in results {
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
