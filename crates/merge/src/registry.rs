//! Every merge method by name: per-tensor methods (one output tensor at a
//! time, run by the executor) and whole-model methods (PLeaS). Adding a
//! method: one file, one line here.

use amalgam_recipe::{Recipe, RecipeError};

use crate::methods::*;
use crate::{MergeMethod, WholeModelMethod};

/// All methods, in the order the book's method reference lists them.
pub static METHODS: &[&dyn MergeMethod] = &[
    &linear::Linear,
    &task_arithmetic::TASK_ARITHMETIC,
    &ties::TIES,
    &dare_linear::DARE_LINEAR,
    &dare_ties::DARE_TIES,
    &breadcrumbs::BREADCRUMBS,
    &breadcrumbs_ties::BREADCRUMBS_TIES,
    &della::DELLA,
    &della_linear::DELLA_LINEAR,
    &slerp::Slerp,
    &nuslerp::Nuslerp,
    &multislerp::Multislerp,
    &karcher::Karcher,
    &model_stock::ModelStock,
    &sce::Sce,
    &nearswap::Nearswap,
    &ram::Ram,
    &ramplus_tl::RamplusTl,
    &arcee_fusion::ArceeFusion,
    &passthrough::Passthrough,
];

/// Methods that need whole models at once.
pub static WHOLE_MODEL_METHODS: &[&dyn WholeModelMethod] = &[&crate::pleas::Pleas];

/// A method of either kind.
#[derive(Clone, Copy)]
pub enum Method {
    PerTensor(&'static dyn MergeMethod),
    WholeModel(&'static dyn WholeModelMethod),
}

/// The method called `name` (mergekit's spelling).
pub fn get(name: &str) -> Option<Method> {
    per_tensor(name).map(Method::PerTensor).or_else(|| {
        WHOLE_MODEL_METHODS
            .iter()
            .copied()
            .find(|m| m.name() == name)
            .map(Method::WholeModel)
    })
}

/// The method a recipe's `merge_method` names; an unknown name is an error
/// at its line, listing the known ones.
pub fn of_recipe(recipe: &Recipe) -> Result<Method, RecipeError> {
    get(&recipe.merge_method).ok_or_else(|| {
        recipe.error(
            recipe.merge_method_at,
            format!(
                "unknown merge method `{}` (known: {})",
                recipe.merge_method,
                names().join(", ")
            ),
        )
    })
}

/// The per-tensor method called `name`.
pub fn per_tensor(name: &str) -> Option<&'static dyn MergeMethod> {
    METHODS.iter().copied().find(|m| m.spec().name == name)
}

/// Every method name, for messages.
pub fn names() -> Vec<&'static str> {
    METHODS
        .iter()
        .map(|m| m.spec().name)
        .chain(WHOLE_MODEL_METHODS.iter().map(|m| m.name()))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recipe_names_its_method_or_an_error_at_its_line() {
        let recipe = |method: &str| {
            Recipe::parse(
                &format!("models:\n  - model: a\nmerge_method: {method}\n"),
                "r.yml",
            )
            .unwrap()
        };
        assert!(matches!(
            of_recipe(&recipe("ties")),
            Ok(Method::PerTensor(_))
        ));
        assert!(matches!(
            of_recipe(&recipe("pleas")),
            Ok(Method::WholeModel(_))
        ));
        let error = of_recipe(&recipe("tiez")).err().unwrap().to_string();
        assert!(
            error.starts_with("r.yml:3:15: unknown merge method `tiez` (known: linear,"),
            "{error}"
        );
    }
}
