//! `amalgam eval MODEL...`: per-domain loss, perplexity and next-token
//! accuracy on the corpus' held-out splits, for checkpoints and the networks
//! of stitched families — or on any text file (`--text`), tokenized with each
//! model's own tokenizer.

use std::path::{Path, PathBuf};

use anyhow::{anyhow, Context, Result};
use clap::Args as ClapArgs;

use amalgam_checkpoint::memory::MemoryEstimate;
use amalgam_checkpoint::{hub, kind_from_dtype, Checkpoint};
use amalgam_elastic::stitch::{Network, StitchedFamily};
use amalgam_nn::data::{Domain, Split};
use amalgam_nn::eval::{
    check_vocabulary, same_tokens, score_text, try_score_windows, DomainScore, EvalOptions,
    LanguageModel, TextOptions, Window,
};
use amalgam_nn::text::{TextFile, TextTokenizer, CHUNKING};
use amalgam_nn::{Decoder, DecoderConfig, NnError};
use amalgam_recipe::FloatDtype;

/// A corpus domain's windows, under its name.
struct Scored {
    label: String,
    windows: Vec<Window>,
}

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
    let domains = crate::corpus::domains(&names, split)?;
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
    let device = args.device.resolve()?;
    let dtype = args.dtype.safetensors();
    let options = EvalOptions {
        seq_len,
        max_windows: args.max_windows.unwrap_or(CORPUS_WINDOWS),
        batch: args.windows.batch.max(1),
    };
    let text_options = TextOptions {
        seq_len,
        stride: args.stride,
        batch: options.batch,
        max_windows: args.max_windows,
        chunking: CHUNKING,
    };
    // What is scored: the corpus's held-out domains, or the text files —
    // checked whole here, read again (a stretch at a time) for each model,
    // as their tokens depend on its tokenizer.
    let texts = args
        .text
        .iter()
        .map(|path| {
            let label = path.display().to_string();
            let file = TextFile::scan(path, &args.field)?;
            if file.document_bytes == 0 {
                return Err(anyhow!("{label}: no text to score"));
            }
            Ok((label, file))
        })
        .collect::<Result<Vec<_>>>()?;
    let corpus: Vec<Scored> = match texts.is_empty() {
        true => crate::corpus::windows(&domains, split, &options)?
            .into_iter()
            .zip(&names)
            .map(|(windows, name)| Scored {
                label: name.clone(),
                windows,
            })
            .collect(),
        false => Vec::new(),
    };
    // Reading, tokenizing and holding windows of the largest text file.
    let text_bytes = |reference: bool| {
        texts
            .iter()
            .map(|(_, file)| text_options.memory_bytes(file, reference))
            .max()
            .unwrap_or(0)
    };
    // Windows are scored `batch` at a time.
    let batch = options.batch;
    let kind = kind_from_dtype(dtype).expect("a float dtype");
    // What the reference holds while each model is scored beside it.
    let resident = std::cell::Cell::new(0u64);
    let load = |path: &PathBuf| -> Result<(Decoder, PathBuf)> {
        let path = &hub::locate(&path.to_string_lossy())?;
        let checkpoint = Checkpoint::open(path)?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &path.join("config.json"))?;
        let model_bytes = (config.weight_bytes() / 32 * dtype.bitsize() as u64)
            .saturating_add(config.forward_bytes(batch, seq_len));
        let memory = MemoryEstimate::new()
            .held("the reference model", resident.get())
            .held("the text", text_bytes(args.reference.is_some()))
            .phase("the model with one batch's forward pass", model_bytes);
        args.max_memory.check(
            &memory,
            &format!(
                "evaluating {} at --batch {batch} --seq-len {seq_len}",
                path.display(),
            ),
        )?;
        let model = Decoder::load_as(path, device, kind)
            .with_context(|| format!("loading {}", path.display()))?;
        if texts.is_empty() {
            check_vocabulary(&model).with_context(|| path.display().to_string())?;
        }
        if resident.get() == 0 && args.reference.is_some() {
            resident.set(model_bytes); // the first model loaded is the reference
        }
        Ok((model, path.clone()))
    };
    // A model's tokenizer (for text), from the directory `dir`.
    let tokenizer_of = |dir: &Path| -> Result<Option<TextTokenizer>> {
        if texts.is_empty() {
            return Ok(None);
        }
        let tokenizer = TextTokenizer::load(dir)?;
        if tokenizer.prefix_token().is_none() {
            return Err(anyhow!(
                "{}: its tokenizer names no BOS or EOS token to start a document from",
                dir.display()
            ));
        }
        Ok(Some(tokenizer))
    };
    let reference = args.reference.as_ref().map(load).transpose()?;
    let reference = match reference {
        Some((model, dir)) => {
            let tokenizer = tokenizer_of(&dir)?;
            Some((model, tokenizer))
        }
        None => None,
    };
    let mut results: Vec<Evaluated> = vec![];
    let mut score = |name: String,
                     model: &dyn LanguageModel,
                     tokenizer: Option<&TextTokenizer>,
                     (dir, parameters): (&Path, usize),
                     stitched: Option<(u64, &'static str)>|
     -> Result<()> {
        let differ = || {
            anyhow!(
                "{name}: its tokenizer splits the text differently from the reference's; \
                 --reference compares models that share a tokenizer"
            )
        };
        if let Some((reference, theirs)) = &reference {
            if reference.config.vocab_size != model.vocab_size() {
                // Text split differently is the more telling difference.
                if let (Some(ours), Some(theirs)) = (tokenizer, theirs) {
                    for (_, file) in &texts {
                        if !same_tokens(ours, theirs, file, CHUNKING)? {
                            return Err(differ());
                        }
                    }
                }
                return Err(anyhow!(
                    "{name}: vocabulary of {} tokens, the reference has {}",
                    model.vocab_size(),
                    reference.config.vocab_size
                ));
            }
        }
        let scores = match tokenizer {
            None => {
                let reference = reference.as_ref().map(|(r, _)| r as &dyn LanguageModel);
                let total: usize = corpus.iter().map(|s| s.windows.len()).sum();
                let bar = crate::progress::steps(total as u64, &name, quiet);
                let scores = corpus
                    .iter()
                    .map(|s| {
                        try_score_windows(model, reference, &s.label, &s.windows, batch, &mut |n| {
                            bar.inc(n as u64)
                        })
                        .with_context(|| format!("{name}: scoring {}", s.label))
                    })
                    .collect::<Result<Vec<_>>>()?;
                bar.finish_and_clear();
                scores
            }
            Some(tokenizer) => {
                let reference = reference.as_ref().map(|(r, t)| {
                    (
                        r as &dyn LanguageModel,
                        t.as_ref().expect("a text reference has a tokenizer"),
                    )
                });
                let total = texts.iter().map(|(_, f)| f.file_bytes).sum();
                let bar = crate::progress::bytes(total, &name, quiet);
                let mut done = 0;
                let mut scores = Vec::new();
                for (label, file) in &texts {
                    let score = score_text(
                        model,
                        tokenizer,
                        reference,
                        file,
                        label,
                        &text_options,
                        &mut |read| bar.set_position(done + read),
                    )
                    .map_err(|e| match e {
                        NnError::TokenizersDiffer => differ(),
                        NnError::OutsideVocabulary { .. } => anyhow!("{}: {e}", dir.display()),
                        e => anyhow!(e).context(format!("{name}: scoring {label}")),
                    })?;
                    done += file.file_bytes;
                    scores.push(score);
                }
                bar.finish_and_clear();
                scores
            }
        };
        results.push(Evaluated {
            model: name,
            parameters,
            stitched,
            scores,
        });
        Ok(())
    };
    for path in &args.models {
        if StitchedFamily::is_family(path) {
            let family = StitchedFamily::load(path, device, kind)?;
            // Every network reads and writes the anchors' shared tokens.
            if texts.is_empty() {
                check_vocabulary(&family.anchors[0]).with_context(|| path.display().to_string())?;
            }
            let tokenizer = tokenizer_of(&family.dirs[0])?;
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
                    tokenizer.as_ref(),
                    (&family.dirs[0], member.parameters as usize),
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
        let tokenizer = tokenizer_of(&dir)?;
        score(
            path.display().to_string(),
            &model,
            tokenizer.as_ref(),
            (&dir, model.config.parameter_count()),
            None,
        )?;
    }
    let reference = reference.map(|(model, _)| model);
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
