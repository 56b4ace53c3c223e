//! `passthrough` — copy the single source of each tensor, optionally times a
//! per-source `scale`: layer stacking ("frankenmerges") with `slices:`.

use amalgam_recipe::{BasePolicy, MethodSpec, ParamKind, ParamScope, ParamSpec, Scalar};
use tch::Tensor;

use crate::{MergeContext, MergeMethod, Result};

pub struct Passthrough;

impl MergeMethod for Passthrough {
    fn spec(&self) -> MethodSpec {
        MethodSpec {
            name: "passthrough",
            base: BasePolicy::Ignored,
            params: vec![ParamSpec {
                name: "scale",
                kind: ParamKind::Number,
                scope: ParamScope::PerModel,
                default: Some(Scalar::Number(1.0)),
                check: None,
                warn: None,
            }],
            min_models: 1,
            max_models: Some(1),
        }
    }

    fn merge(&self, cx: &MergeContext<'_>) -> Result<Tensor> {
        let scale = cx.input_number(0, "scale");
        if scale == 1.0 {
            return Ok(cx.inputs[0].shallow_clone());
        }
        Ok(&cx.inputs[0] * scale)
    }
}
