//! One file per merge method. The task-vector family shares its engine in
//! [`task_vector`]; each member's file only says how it sparsifies and votes.

pub mod arcee_fusion;
pub mod breadcrumbs;
pub mod breadcrumbs_ties;
pub mod dare_linear;
pub mod dare_ties;
pub mod della;
pub mod della_linear;
pub mod karcher;
pub mod linear;
pub mod model_stock;
pub mod multislerp;
pub mod nearswap;
pub mod nuslerp;
pub mod passthrough;
pub mod ram;
pub mod ramplus_tl;
pub mod sce;
pub mod slerp;
pub mod task_arithmetic;
pub mod task_vector;
pub mod ties;

use amalgam_recipe::{BasePolicy, MethodSpec, ParamKind, ParamScope, ParamSpec, Scalar};
use tch::Kind;

/// A numeric parameter; `default: None` makes it required.
pub(crate) fn number(name: &'static str, scope: ParamScope, default: Option<f64>) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Number,
        scope,
        default: default.map(Scalar::Number),
        check: None,
        warn: None,
    }
}

/// A shared true/false parameter.
pub(crate) fn flag(name: &'static str, default: bool) -> ParamSpec {
    ParamSpec {
        name,
        kind: ParamKind::Bool,
        scope: ParamScope::Shared,
        default: Some(Scalar::Bool(default)),
        check: None,
        warn: None,
    }
}

/// The fraction of a delta's entries kept, in (0, 1].
pub(crate) fn density() -> ParamSpec {
    ParamSpec {
        check: Some(|value| match value.as_f64() {
            Some(d) if d > 0.0 && d <= 1.0 => Ok(()),
            _ => Err(format!("density must be in (0, 1], got {value}")),
        }),
        ..number("density", ParamScope::PerNonBase, Some(1.0))
    }
}

/// A per-model `weight` (required).
pub(crate) fn weight(scope: ParamScope) -> ParamSpec {
    number("weight", scope, None)
}

/// The kind slerp-like methods compute in: f32, or f64 for f64 inputs.
pub(crate) fn at_least_f32(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// The spec of a method between the base and one other model at a required `t`.
pub(crate) fn base_and_one_other_at_t(name: &'static str) -> MethodSpec {
    MethodSpec {
        name,
        base: BasePolicy::Required,
        params: vec![number("t", ParamScope::Shared, None)],
        min_models: 1,
        max_models: Some(1),
    }
}
