//! Multi-stage recipes (mergekit-multi's format): several YAML documents
//! separated by `---`, each a merge recipe with a `name:`, later ones using
//! earlier ones as models by that name; at most one document without a name,
//! the final merge. [`Stages::parse`] orders them so that every stage runs
//! after the stages it uses.

use crate::{Location, Recipe, RecipeError};

/// One stage: its recipe (with paths as written) and the stages it uses.
#[derive(Debug, Clone)]
pub struct Stage {
    pub recipe: Recipe,
    /// Indices (into [`Stages::run_order`]) of the stages this one uses.
    pub uses: Vec<usize>,
}

impl Stage {
    pub fn name(&self) -> Option<&str> {
        self.recipe.name.as_ref().map(|(n, _)| n.as_str())
    }
}

/// A recipe file's stages, in an order that runs each after its inputs.
#[derive(Debug, Clone)]
pub struct Stages {
    pub run_order: Vec<Stage>,
}

impl Stages {
    /// Parses every document of `text`. One document without a `name` is an
    /// ordinary recipe: one stage, using none.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let error = |at: Location, message: String| RecipeError {
            source_name: source_name.into(),
            at,
            message,
        };
        let documents = documents(text);
        if documents.is_empty() {
            return Err(error(
                Location { line: 1, column: 1 },
                "no merge here: the recipe is empty (only comments, blank lines or `---` \
                 separators); it needs at least `merge_method` and `models`"
                    .into(),
            ));
        }
        let mut recipes = vec![];
        for (first_line, document) in documents {
            // Earlier lines padded out, so positions are the file's.
            let padded = format!("{}{document}", "\n".repeat(first_line));
            let mut recipe = Recipe::parse(&padded, source_name)?;
            recipe.text = document.to_owned();
            recipes.push(recipe);
        }
        for (name, at) in recipes.iter().filter_map(|r| r.name.as_ref()) {
            if !is_stage_name(name) {
                return Err(error(
                    *at,
                    format!(
                        "stage name {name:?} is not a plain name: a stage's output is kept as \
                         a directory of that name under the intermediate directory, so it may \
                         not be empty, hold `/`, `\\` or NUL, or be `.` or `..`"
                    ),
                ));
            }
        }
        let names: Vec<Option<&str>> = recipes
            .iter()
            .map(|r| r.name.as_ref().map(|(n, _)| n.as_str()))
            .collect();
        for (i, recipe) in recipes.iter().enumerate() {
            match &recipe.name {
                Some((name, at)) if names[..i].contains(&Some(name.as_str())) => {
                    return Err(error(*at, format!("a second stage named `{name}`")))
                }
                None if names[..i].contains(&None) => {
                    return Err(error(
                        recipe.merge_method_at,
                        "a second stage without a `name`: only the final merge may be unnamed"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        // Which stages each uses: a model whose path (before any `+ADAPTER`) is a stage's name.
        let uses: Vec<Vec<usize>> = recipes
            .iter()
            .map(|recipe| {
                let mut used = vec![];
                for model in recipe.referenced_models() {
                    let base = model.path.split('+').next().unwrap_or_default();
                    if let Some(j) = names.iter().position(|n| *n == Some(base)) {
                        if !used.contains(&j) {
                            used.push(j);
                        }
                    }
                }
                used
            })
            .collect();
        // Kahn's order, document order among the ready.
        let mut order = vec![];
        let mut done = vec![false; recipes.len()];
        while order.len() < recipes.len() {
            let Some(next) =
                (0..recipes.len()).find(|&i| !done[i] && uses[i].iter().all(|&j| done[j]))
            else {
                let stuck = (0..recipes.len()).find(|&i| !done[i]).expect("some left");
                let recipe = &recipes[stuck];
                let at = recipe
                    .name
                    .as_ref()
                    .map_or(recipe.merge_method_at, |(_, at)| *at);
                return Err(error(
                    at,
                    "the stages use each other in a cycle; each stage may use only stages that \
                     do not use it"
                        .into(),
                ));
            };
            done[next] = true;
            order.push(next);
        }
        let position = |i: usize| order.iter().position(|&o| o == i).expect("ordered");
        let mut slots: Vec<Option<Recipe>> = recipes.into_iter().map(Some).collect();
        let run_order = order
            .iter()
            .map(|&i| Stage {
                recipe: slots[i].take().expect("each once"),
                uses: uses[i].iter().map(|&j| position(j)).collect(),
            })
            .collect();
        Ok(Self { run_order })
    }

    /// The stage whose output is the run's output: the unnamed one, else the last to run.
    pub fn final_stage(&self) -> usize {
        self.run_order
            .iter()
            .position(|s| s.recipe.name.is_none())
            .unwrap_or(self.run_order.len() - 1)
    }

    /// Whether this is an ordinary one-document recipe.
    pub fn is_single(&self) -> bool {
        self.run_order.len() == 1
    }
}

/// A stage name that is one directory entry: never a path out of the
/// intermediate directory.
fn is_stage_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains(['/', '\\', '\0'])
        && name.len() <= 255
}

/// The documents of a YAML stream, split at `---` lines: (index of the
/// document's first line, its text). Documents holding only comments and
/// blank lines (a leading `---`, a trailing one) are skipped.
pub(crate) fn documents(text: &str) -> Vec<(usize, &str)> {
    // (first line, first byte) of each document, then the end.
    let mut starts = vec![(0, 0)];
    let mut ends = vec![];
    let mut offset = 0;
    for (index, line) in text.split_inclusive('\n').enumerate() {
        let bare = line.trim_end();
        if bare == "---" || bare.starts_with("--- ") {
            ends.push(offset);
            starts.push((index + 1, offset + line.len()));
        }
        offset += line.len();
    }
    ends.push(text.len());
    starts
        .into_iter()
        .zip(ends)
        .map(|((line, from), to)| (line, &text[from..to]))
        .filter(|(_, document)| {
            document.lines().any(|l| {
                let t = l.trim();
                !t.is_empty() && !t.starts_with('#') && t != "..."
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const STAGE_A: &str = "name: a\nmerge_method: linear\nmodels:\n  - model: x\n  - model: y\n";

    #[test]
    fn stages_run_after_the_stages_they_use() {
        let text = format!(
            "merge_method: linear\nmodels:\n  - model: a\n  - model: b+lora\n---\nname: b\n\
             merge_method: linear\nmodels:\n  - model: a\n  - model: z\n---\n{STAGE_A}"
        );
        let stages = Stages::parse(&text, "m.yml").unwrap();
        let names: Vec<_> = stages.run_order.iter().map(Stage::name).collect();
        assert_eq!(names, [Some("a"), Some("b"), None]);
        assert_eq!(stages.run_order[2].uses, [0, 1]);
        assert_eq!(stages.final_stage(), 2);
        assert_eq!(stages.run_order[0].recipe.text, STAGE_A);
    }

    #[test]
    fn one_document_is_one_stage() {
        let stages = Stages::parse(
            "---\nmerge_method: linear\nmodels:\n  - model: x\n",
            "r.yml",
        )
        .unwrap();
        assert!(stages.is_single());
        assert_eq!(stages.run_order[0].uses, Vec::<usize>::new());
    }

    #[test]
    fn errors_point_into_the_right_document() {
        let err = |text: &str| Stages::parse(text, "m.yml").unwrap_err().to_string();
        let second_bad = format!("{STAGE_A}---\nname: b\nmerge_method: linear\nmodls: []\n");
        assert!(
            err(&second_bad).starts_with("m.yml:9:1:"),
            "{}",
            err(&second_bad)
        );
        let twice = format!("{STAGE_A}---\n{STAGE_A}");
        assert!(
            err(&twice).contains("m.yml:7:7: a second stage named `a`"),
            "{}",
            err(&twice)
        );
        let cycle = "name: a\nmerge_method: linear\nmodels:\n  - model: b\n---\n\
                     name: b\nmerge_method: linear\nmodels:\n  - model: a\n";
        assert!(err(cycle).contains("cycle"), "{}", err(cycle));
        let unnamed = "merge_method: linear\nmodels:\n  - model: x\n---\n\
                       merge_method: linear\nmodels:\n  - model: y\n";
        assert!(err(unnamed).contains("only the final merge may be unnamed"));
    }

    #[test]
    fn empty_recipes_are_errors() {
        for empty in [
            "",
            "\n\n",
            "# only a comment\n",
            "---\n---\n",
            "---\n# c\n---\n...\n",
        ] {
            let err = Stages::parse(empty, "e.yml").unwrap_err().to_string();
            assert!(
                err.starts_with("e.yml:1:1:") && err.contains("empty"),
                "{empty:?}: {err}"
            );
        }
    }

    #[test]
    fn stage_names_are_names_not_paths() {
        for bad in ["/tmp/x", "../x", "a/b", "..", ".", "a\\\\b", "\"\""] {
            let text = format!(
                "name: {bad}\nmerge_method: linear\nmodels:\n  - model: x\n---\n\
                 merge_method: linear\nmodels:\n  - model: y\n"
            );
            let err = Stages::parse(&text, "m.yml").unwrap_err().to_string();
            assert!(
                err.starts_with("m.yml:1:7:") && err.contains("not a plain name"),
                "{bad}: {err}"
            );
        }
        assert!(Stages::parse(
            &format!("{STAGE_A}---\nmerge_method: linear\nmodels:\n  - model: a\n"),
            "m.yml"
        )
        .is_ok());
    }
}
