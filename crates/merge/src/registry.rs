//! Every merge method by name. Adding a method: one file in `methods/`, one line here.

use crate::methods::*;
use crate::MergeMethod;

/// All methods, in the order the README lists them.
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

/// The method called `name` (mergekit's spelling).
pub fn get(name: &str) -> Option<&'static dyn MergeMethod> {
    METHODS.iter().copied().find(|m| m.spec().name == name)
}

/// Every method name, for messages.
pub fn names() -> Vec<&'static str> {
    METHODS.iter().map(|m| m.spec().name).collect()
}
