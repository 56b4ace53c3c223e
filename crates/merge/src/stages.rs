//! Multi-stage recipes: where each named stage writes (in a scratch or
//! intermediate directory, the final stage at the output), how later
//! stages' references to earlier ones become those paths, what an earlier
//! run left at a stage's output (reused when its recipe is unchanged), and
//! the rule that no stage writes over a model any stage reads.

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use amalgam_checkpoint::IoContext as _;
use amalgam_recipe::{Recipe, Stages, MAX_RECIPE_BYTES};

use crate::executor::MergeJob;
use crate::registry::{self, Method};
use crate::{MergeError, Result};

/// Every stage's method known, and every stage that reads no other stage
/// prepared (its models opened and planned): a multi-stage run's mistakes
/// in its first stages show before anything is written.
pub fn check_stages(stages: &Stages) -> Result<()> {
    for stage in &stages.run_order {
        if let (Method::PerTensor(method), true) =
            (registry::of_recipe(&stage.recipe)?, stage.uses.is_empty())
        {
            MergeJob::prepare(stage.recipe.clone(), method)?;
        }
    }
    Ok(())
}

/// Marks a directory as a stage output amalgam wrote (so a later run may
/// reuse or replace it); a file inside it, never read as part of the model.
const STAGE_MARKER: &str = ".amalgam-stage";

/// Where the stages of a recipe write, in run order.
#[derive(Debug, Clone)]
pub struct StageOutputs {
    /// Each stage's name (`None`: the final, unnamed stage).
    pub names: Vec<Option<String>>,
    /// Each stage's output: `dir/NAME`, the final stage's `out`.
    pub outputs: Vec<PathBuf>,
    /// The final stage's index.
    pub final_stage: usize,
}

/// What a run does at a stage's output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// The final stage: the run's own output, written as the run's options say.
    Final,
    /// Left as it is: amalgam wrote it from this same recipe.
    Reuse,
    /// Written (and then marked as a stage output); `replace`: over a stage
    /// output amalgam wrote from another recipe.
    Write { replace: bool },
}

impl StageOutputs {
    /// The outputs of `stages` with the intermediate ones under `dir`.
    pub fn new(stages: &Stages, dir: &Path, out: &Path) -> Self {
        let final_stage = stages.final_stage();
        let names: Vec<Option<String>> = stages
            .run_order
            .iter()
            .map(|s| s.name().map(str::to_owned))
            .collect();
        let outputs = names
            .iter()
            .enumerate()
            .map(|(i, name)| match name {
                Some(name) if i != final_stage => dir.join(name),
                _ => out.to_path_buf(),
            })
            .collect();
        StageOutputs {
            names,
            outputs,
            final_stage,
        }
    }

    /// A stage's references to other stages (`NAME`, `NAME+ADAPTER`) as
    /// the paths those stages write.
    pub fn resolve_models(&self, recipe: &mut Recipe) {
        recipe.rename_models(|path| {
            let (base, adapter) = match path.split_once('+') {
                Some((base, adapter)) => (base, Some(adapter)),
                None => (path, None),
            };
            let j = self.names.iter().position(|n| n.as_deref() == Some(base))?;
            let out = self.outputs[j].display().to_string();
            Some(adapter.map_or(out.clone(), |a| format!("{out}+{a}")))
        });
    }

    /// The stage `i`'s name, for messages (`(final)` for the unnamed one).
    pub fn label(&self, i: usize) -> &str {
        self.names[i].as_deref().unwrap_or("(final)")
    }

    /// What a run does at stage `i`'s output, to run `recipe` (references
    /// resolved) there: an intermediate stage's output is reused when
    /// amalgam wrote it from the same recipe, replaced when amalgam wrote it
    /// from another, and never replaced when amalgam did not write it (an
    /// input, a user's directory, a file, a link), whatever the options.
    pub fn placement(&self, i: usize, recipe: &Recipe) -> Result<Placement> {
        if i == self.final_stage {
            return Ok(Placement::Final);
        }
        let out = &self.outputs[i];
        match StageOutput::at(out)? {
            StageOutput::Absent => Ok(Placement::Write { replace: false }),
            StageOutput::Ours { recipe: kept } if kept.as_deref() == Some(&recipe.text) => {
                Ok(Placement::Reuse)
            }
            StageOutput::Ours { .. } => Ok(Placement::Write { replace: true }),
            StageOutput::Foreign => Err(MergeError::Stage {
                path: out.clone(),
                message: format!(
                    "stage `{}`: exists and is not a stage output amalgam wrote; refusing to \
                     replace it, even where replacing outputs is allowed: name the stage \
                     differently or write the stages to another directory",
                    self.label(i)
                ),
            }),
        }
    }

    /// No stage output (the final one included) may be, hold or sit inside
    /// a model some stage reads: a later stage would replace what an
    /// earlier one reads.
    pub fn refuse_outputs_over_inputs(&self, stages: &Stages) -> Result<()> {
        let mut inputs = vec![];
        for stage in &stages.run_order {
            for model in stage.recipe.referenced_models() {
                for part in model.path.split('+') {
                    if self.names.iter().any(|n| n.as_deref() == Some(part)) {
                        continue;
                    }
                    if let Ok(dir) = amalgam_checkpoint::hub::locate(part) {
                        if let Ok(dir) = std::fs::canonicalize(&dir) {
                            inputs.push(dir);
                        }
                    }
                }
            }
        }
        for out in &self.outputs {
            let absolute = absolute(out);
            if let Some(input) = inputs
                .iter()
                .find(|i| absolute.starts_with(i) || i.starts_with(&absolute))
            {
                return Err(MergeError::Stage {
                    path: out.clone(),
                    message: format!(
                        "refusing to write a stage output over input {}, even where replacing outputs \
                         is allowed",
                        input.display()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// What is at an intermediate stage's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StageOutput {
    Absent,
    /// A stage output amalgam wrote, with the recipe it was written from.
    Ours {
        recipe: Option<String>,
    },
    /// Anything else: an input, a user's directory, a file, a link.
    Foreign,
}

impl StageOutput {
    /// What is at `out`.
    pub fn at(out: &Path) -> Result<Self> {
        let Ok(meta) = std::fs::symlink_metadata(out) else {
            return Ok(StageOutput::Absent);
        };
        let marked = meta.is_dir()
            && std::fs::symlink_metadata(out.join(STAGE_MARKER)).is_ok_and(|m| m.is_file());
        if !marked {
            return Ok(StageOutput::Foreign);
        }
        let kept = out.join("mergekit_config.yml");
        let recipe = match std::fs::symlink_metadata(&kept) {
            Ok(_) => {
                let bytes = amalgam_checkpoint::read_regular(&kept, MAX_RECIPE_BYTES, "a recipe")?;
                Some(String::from_utf8(bytes).map_err(|e| MergeError::Stage {
                    path: kept.clone(),
                    message: format!("not UTF-8 text: {e}"),
                })?)
            }
            Err(_) => None,
        };
        Ok(StageOutput::Ours { recipe })
    }

    /// Marks `out`, just written, as a stage output amalgam wrote.
    pub fn mark(out: &Path) -> Result<()> {
        let marker = out.join(STAGE_MARKER);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&marker)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"written by amalgam as a stage\n"))
            .at(&marker)
            .map_err(MergeError::from)
    }
}

/// `path` made absolute through its deepest existing ancestor, symlinks resolved.
fn absolute(path: &Path) -> PathBuf {
    let mut missing = vec![];
    let mut existing = path.to_path_buf();
    loop {
        if let Ok(real) = std::fs::canonicalize(&existing) {
            return missing.into_iter().rev().fold(real, |p, name| p.join(name));
        }
        match (existing.file_name(), existing.parent()) {
            (Some(name), Some(parent)) => {
                missing.push(name.to_owned());
                existing = if parent.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    parent.to_path_buf()
                };
            }
            _ => return path.to_path_buf(),
        }
    }
}
