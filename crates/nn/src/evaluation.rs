//! An evaluation run: models scored on the corpus' held-out windows or on
//! text files (each tokenized with the model's own tokenizer), optionally
//! against a reference model, every model's memory estimated and checked
//! before it is loaded. `amalgam eval` parses its arguments into one, hands
//! it each model and reports the scores.

use std::path::{Path, PathBuf};

use amalgam_checkpoint::memory::{MemoryEstimate, MemoryLimit};
use amalgam_checkpoint::{hub, kind_from_dtype, Checkpoint, Dtype};
use tch::Device;

use crate::data::{Domain, Split};
use crate::eval::{
    check_vocabulary, corpus_windows, same_tokens, score_text, try_score_windows, DomainScore,
    EvalOptions, LanguageModel, TextOptions, Window,
};
use crate::text::{TextFile, TextTokenizer, CHUNKING};
use crate::{Decoder, DecoderConfig, NnError, Result};

/// What models are scored on.
pub enum Material {
    /// Corpus domains cut into windows, under their names.
    Corpus(Vec<(String, Vec<Window>)>),
    /// Text files, under their labels: checked whole when the run is set
    /// up, read again (a stretch at a time) for each model, as their tokens
    /// depend on its tokenizer.
    Texts(Vec<(String, TextFile)>),
}

impl Material {
    /// The `split` of corpus domains (see [`corpus_domains`]), cut into
    /// windows; a window longer than a domain's text is refused (no window
    /// would be scored: a loss of 0 over nothing).
    pub fn corpus(domains: &[Domain], split: Split, options: &EvalOptions) -> Result<Self> {
        let windows = corpus_domain_windows(domains, split, options)?;
        let names = domains.iter().map(|d| d.name().to_owned());
        Ok(Material::Corpus(names.zip(windows).collect()))
    }

    /// Text files (plain: one document; `.jsonl`: the string at `field` of
    /// each line), each checked to hold text.
    pub fn texts(paths: &[PathBuf], field: &str) -> Result<Self> {
        let texts = paths
            .iter()
            .map(|path| {
                let label = path.display().to_string();
                let file = TextFile::scan(path, field)?;
                if file.document_bytes == 0 {
                    return Err(NnError::Invalid(format!("{label}: no text to score")));
                }
                Ok((label, file))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Material::Texts(texts))
    }
}

/// Corpus domains by name, each with the `split` asked for; an unknown one
/// is an error listing the known ones.
pub fn corpus_domains(names: &[String], split: Split) -> Result<Vec<Domain>> {
    let domains = names
        .iter()
        .map(|name| {
            Domain::parse(name).ok_or_else(|| {
                NnError::Invalid(format!(
                    "unknown domain {name:?} (known: {})",
                    Domain::names()
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    for domain in &domains {
        domain.check_split(split)?;
    }
    Ok(domains)
}

/// Each domain's `split` cut into windows; a window longer than a domain's
/// text is refused.
pub fn corpus_domain_windows(
    domains: &[Domain],
    split: Split,
    options: &EvalOptions,
) -> Result<Vec<Vec<Window>>> {
    domains
        .iter()
        .map(|domain| {
            let windows = corpus_windows(&domain.tokens(split), options);
            if windows.is_empty() {
                return Err(NnError::WindowTooLong {
                    seq_len: options.seq_len,
                    text: format!("{} held-out text", domain.name()),
                });
            }
            Ok(windows)
        })
        .collect()
}

/// How models are scored.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Windows of the corpus.
    pub corpus: EvalOptions,
    /// Windows of text files.
    pub text: TextOptions,
    pub device: Device,
    /// The dtype models compute in (a float dtype).
    pub dtype: Dtype,
    /// Refuse a model whose estimated memory exceeds this.
    pub memory_limit: Option<MemoryLimit>,
}

/// How much work scoring one model is, for progress.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Work {
    Windows(u64),
    Bytes(u64),
}

/// One scored model or network.
#[derive(Debug, Clone)]
pub struct Evaluated {
    pub model: String,
    pub parameters: usize,
    pub scores: Vec<DomainScore>,
}

/// The reference the models are compared with.
struct Reference {
    model: Decoder,
    tokenizer: Option<TextTokenizer>,
    /// What it holds while the others are scored beside it.
    bytes: u64,
}

/// Models scored on one material with one set of settings.
pub struct Evaluation {
    material: Material,
    settings: Settings,
    reference: Option<Reference>,
}

impl Evaluation {
    pub fn new(material: Material, settings: Settings) -> Self {
        Self {
            material,
            settings,
            reference: None,
        }
    }

    /// Whether the material is text files (scored with each model's
    /// tokenizer, with bits per byte) rather than the corpus.
    pub fn is_text(&self) -> bool {
        matches!(self.material, Material::Texts(_))
    }

    /// Whether models are compared with a reference.
    pub fn has_reference(&self) -> bool {
        self.reference.is_some()
    }

    /// What scoring one model takes: windows of the corpus, or bytes of text.
    pub fn work(&self) -> Work {
        match &self.material {
            Material::Corpus(domains) => {
                Work::Windows(domains.iter().map(|(_, w)| w.len() as u64).sum())
            }
            Material::Texts(texts) => Work::Bytes(texts.iter().map(|(_, f)| f.file_bytes).sum()),
        }
    }

    /// Compares every model scored from now on with the checkpoint at
    /// `path` (next-token agreement and KL); it must share their tokenizer.
    pub fn set_reference(&mut self, path: &Path) -> Result<()> {
        let (model, dir, bytes) = self.load_sized(path, true)?;
        let tokenizer = self.tokenizer(&dir)?;
        self.reference = Some(Reference {
            model,
            tokenizer,
            bytes,
        });
        Ok(())
    }

    /// Loads the checkpoint `path` (a directory or a Hub cache reference) to
    /// be scored, in the settings' dtype: its memory, beside the reference's
    /// and the text's, checked first; for the corpus, its vocabulary checked.
    pub fn load(&self, path: &Path) -> Result<(Decoder, PathBuf)> {
        self.load_sized(path, false)
            .map(|(model, dir, _)| (model, dir))
    }

    fn load_sized(&self, path: &Path, reference: bool) -> Result<(Decoder, PathBuf, u64)> {
        let Settings {
            corpus,
            text,
            device,
            dtype,
            memory_limit,
        } = &self.settings;
        let path = &hub::locate(&path.to_string_lossy())?;
        let checkpoint = Checkpoint::open(path)?;
        let config =
            DecoderConfig::from_model_config(checkpoint.config(), &path.join("config.json"))?;
        let (batch, seq_len) = (corpus.batch, corpus.seq_len);
        let model_bytes = (config.weight_bytes() / 32 * dtype.bitsize() as u64)
            .saturating_add(config.forward_bytes(batch, seq_len));
        let text_bytes = match &self.material {
            Material::Texts(texts) => texts
                .iter()
                .map(|(_, file)| text.memory_bytes(file, reference || self.reference.is_some()))
                .max()
                .unwrap_or(0),
            Material::Corpus(_) => 0,
        };
        let memory = MemoryEstimate::new()
            .held(
                "the reference model",
                self.reference.as_ref().map_or(0, |r| r.bytes),
            )
            .held("the text", text_bytes)
            .phase("the model with one batch's forward pass", model_bytes);
        if let Some(limit) = memory_limit {
            limit
                .check(
                    &memory,
                    &format!(
                        "evaluating {} in batches of {batch} windows of {seq_len} tokens",
                        path.display(),
                    ),
                )
                .map_err(NnError::Memory)?;
        }
        let kind = kind_from_dtype(*dtype).ok_or_else(|| {
            NnError::Invalid(format!("{dtype:?} is not a dtype models compute in"))
        })?;
        let model = Decoder::load_as(path, *device, kind)
            .map_err(|e| e.within(format!("loading {}", path.display())))?;
        self.check_vocabulary(&model, path)?;
        Ok((model, path.clone(), model_bytes))
    }

    /// For the corpus (byte-tokenized), that `model` reads its ids; `dir`
    /// names it in the error. Nothing to check for text.
    pub fn check_vocabulary(&self, model: &Decoder, dir: &Path) -> Result<()> {
        match self.material {
            Material::Corpus(_) => {
                check_vocabulary(model).map_err(|e| e.within(dir.display().to_string()))
            }
            Material::Texts(_) => Ok(()),
        }
    }

    /// For text, the tokenizer of the model in `dir` (it must name a token
    /// to start documents from); `None` for the corpus.
    pub fn tokenizer(&self, dir: &Path) -> Result<Option<TextTokenizer>> {
        if !self.is_text() {
            return Ok(None);
        }
        let tokenizer = TextTokenizer::load(dir)?;
        if tokenizer.prefix_token().is_none() {
            return Err(NnError::Invalid(format!(
                "{}: its tokenizer names no BOS or EOS token to start a document from",
                dir.display()
            )));
        }
        Ok(Some(tokenizer))
    }

    /// Loads and scores the checkpoint at `path`; `progress` as in
    /// [`Evaluation::score`].
    pub fn checkpoint(&self, path: &Path, progress: &mut dyn FnMut(u64)) -> Result<Evaluated> {
        let (model, dir) = self.load(path)?;
        let tokenizer = self.tokenizer(&dir)?;
        let name = path.display().to_string();
        let scores = self.score(&name, &model, tokenizer.as_ref(), &dir, progress)?;
        Ok(Evaluated {
            model: name,
            parameters: model.config.parameter_count(),
            scores,
        })
    }

    /// Scores `model` (called `name`; its tokenizer, for text, from `dir`)
    /// on every domain or text file, against the reference when there is
    /// one; `progress(n)` as n more windows (corpus) or bytes (text) are done.
    pub fn score(
        &self,
        name: &str,
        model: &dyn LanguageModel,
        tokenizer: Option<&TextTokenizer>,
        dir: &Path,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Vec<DomainScore>> {
        let differ = || {
            NnError::Invalid(format!(
                "{name}: its tokenizer splits the text differently from the reference's; a \
                 model is compared only with a reference that shares its tokenizer"
            ))
        };
        if let Some(reference) = &self.reference {
            let theirs = reference.model.config.vocab_size;
            if theirs != model.vocab_size() {
                // Text split differently is the more telling difference.
                if let (Some(ours), Some(reference), Material::Texts(texts)) =
                    (tokenizer, &reference.tokenizer, &self.material)
                {
                    for (_, file) in texts {
                        if !same_tokens(ours, reference, file, CHUNKING)? {
                            return Err(differ());
                        }
                    }
                }
                return Err(NnError::Invalid(format!(
                    "{name}: vocabulary of {} tokens, the reference has {theirs}",
                    model.vocab_size(),
                )));
            }
        }
        match &self.material {
            Material::Corpus(domains) => {
                let reference = self
                    .reference
                    .as_ref()
                    .map(|r| &r.model as &dyn LanguageModel);
                domains
                    .iter()
                    .map(|(label, windows)| {
                        try_score_windows(
                            model,
                            reference,
                            label,
                            windows,
                            self.settings.corpus.batch,
                            &mut |n| progress(n as u64),
                        )
                        .map_err(|e| e.within(format!("{name}: scoring {label}")))
                    })
                    .collect()
            }
            Material::Texts(texts) => {
                let tokenizer = tokenizer.ok_or_else(|| {
                    NnError::Invalid(format!("{name}: text is scored with a tokenizer"))
                })?;
                let reference = self.reference.as_ref().map(|r| {
                    (
                        &r.model as &dyn LanguageModel,
                        r.tokenizer
                            .as_ref()
                            .expect("a text reference has a tokenizer"),
                    )
                });
                let mut scores = Vec::new();
                for (label, file) in texts {
                    let mut reported = 0;
                    let score = score_text(
                        model,
                        tokenizer,
                        reference,
                        file,
                        label,
                        &self.settings.text,
                        &mut |read| {
                            progress(read.saturating_sub(reported));
                            reported = reported.max(read);
                        },
                    )
                    .map_err(|e| match e {
                        NnError::TokenizersDiffer => differ(),
                        NnError::OutsideVocabulary { .. } => e.within(dir.display().to_string()),
                        e => e.within(format!("{name}: scoring {label}")),
                    })?;
                    progress(file.file_bytes.saturating_sub(reported));
                    scores.push(score);
                }
                Ok(scores)
            }
        }
    }
}
