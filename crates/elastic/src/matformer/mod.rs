//! MatFormer submodels: keep the first m hidden units of each layer's FFN
//! (`gate_proj`/`up_proj` rows, `down_proj` columns) and drop whole layers.
//!
//! recipe ([`ExtractRecipe`]) → [`resolve`] (a [`SliceSpec`]: kept layers
//! and widths) → [`Extraction::plan`] (output tensors, rewritten config) →
//! [`Extraction::write`].

mod extract;
mod layout;
pub mod mixnmatch;
pub mod slicing_table;

use std::path::Path;

use amalgam_checkpoint::Checkpoint;
use amalgam_nn::{nested_width, GRANULARITIES};
use amalgam_recipe::{Budget, ExtractRecipe, Location, RecipeError, Width, WidthChoice};

pub use extract::{Extraction, SliceSpec};
pub use layout::ModelLayout;

use crate::{ElasticError, Result};
use layout::Part;

/// The width a granularity name (`S`, `M`, `L`, `XL`, any case) gives an FFN
/// `full` units wide.
pub fn granularity_width(name: &str, full: usize) -> Option<usize> {
    GRANULARITIES
        .iter()
        .find(|(g, _)| g.eq_ignore_ascii_case(name))
        .map(|&(_, fraction)| nested_width(full, fraction))
}

/// Resolves a recipe's layer and width choice against the model. Paths in
/// the recipe (the model, a slicing table) are relative to the working
/// directory, as in merge recipes.
pub fn resolve(
    recipe: &ExtractRecipe,
    checkpoint: &Checkpoint,
    layout: &ModelLayout,
) -> Result<SliceSpec> {
    let at_error = |at: Location, message: String| {
        ElasticError::Recipe(RecipeError {
            source_name: recipe.source_name.clone(),
            at,
            message,
        })
    };
    let layers = layout.layers();
    let mut skip: Vec<(usize, Option<Location>)> = recipe
        .skip_layers
        .iter()
        .map(|&(l, at)| (l, Some(at)))
        .collect();
    let mut table_widths = None;
    if let WidthChoice::SlicingTable { csv, slice, .. } = &recipe.widths {
        let row = slicing_table::read(Path::new(csv), slice)?;
        skip = row.skip.iter().map(|&l| (l, None)).collect();
        table_widths = Some(row);
    }
    // Errors about a table row have no recipe line; they name the row.
    let row_error = |message: String| match &recipe.widths {
        WidthChoice::SlicingTable { csv, slice, at } => {
            at_error(*at, format!("{csv}, row {slice:?}: {message}"))
        }
        _ => at_error(recipe.model_at, message),
    };
    for &(layer, at) in &skip {
        let message = if layer >= layers {
            format!(
                "layer {layer} does not exist (the model has {layers} layers, 0–{})",
                layers - 1
            )
        } else if layout.kv_producers.contains(&layer) {
            format!(
                "layer {layer} computes the KV cache that the last layers reuse; it cannot be \
                 skipped (KV-producing layers: {:?})",
                layout.kv_producers
            )
        } else {
            continue;
        };
        return Err(match at {
            Some(at) => at_error(at, message),
            None => row_error(message),
        });
    }
    let kept: Vec<usize> = (0..layers)
        .filter(|l| !skip.iter().any(|(s, _)| s == l))
        .collect();
    if kept.is_empty() {
        return Err(at_error(recipe.model_at, "every layer is skipped".into()));
    }
    let full: Vec<usize> = kept.iter().map(|&l| layout.ffn_widths[l]).collect();
    let width_at = |i: usize, width: &Width, at: Location| -> Result<usize> {
        let (layer, full) = (kept[i], full[i]);
        match width {
            Width::Units(units) if *units <= full => Ok(*units),
            Width::Units(units) => Err(at_error(
                at,
                format!("layer {layer}'s FFN has {full} units; cannot keep {units}"),
            )),
            Width::Granularity(name) => granularity_width(name, full).ok_or_else(|| {
                at_error(
                    at,
                    format!("unknown granularity `{name}` (S, M, L or XL, or a number of units)"),
                )
            }),
        }
    };
    let widths = match &recipe.widths {
        WidthChoice::Full => full.clone(),
        WidthChoice::Uniform(width, at) => (0..kept.len())
            .map(|i| width_at(i, width, *at))
            .collect::<Result<_>>()?,
        WidthChoice::PerLayer(items) => {
            if items.len() != kept.len() {
                let at = items.first().map_or(recipe.model_at, |(_, at)| *at);
                return Err(at_error(
                    at,
                    format!(
                        "{} widths for {} kept layers (one per layer left after skipping)",
                        items.len(),
                        kept.len()
                    ),
                ));
            }
            items
                .iter()
                .enumerate()
                .map(|(i, (width, at))| width_at(i, width, *at))
                .collect::<Result<_>>()?
        }
        WidthChoice::SlicingTable { .. } => {
            let row = table_widths.expect("read above");
            if row.widths.len() != kept.len() {
                return Err(row_error(format!(
                    "{} widths for {} kept layers",
                    row.widths.len(),
                    kept.len()
                )));
            }
            for (i, (&w, &f)) in row.widths.iter().zip(&full).enumerate() {
                if w == 0 || w > f {
                    return Err(row_error(format!(
                        "width {w} for layer {} whose FFN has {f} units",
                        kept[i]
                    )));
                }
            }
            row.widths
        }
        WidthChoice::Budget(budget, at) => {
            let limit = match *budget {
                Budget::Parameters(n) => n,
                Budget::Fraction(f) => (checkpoint.parameter_count() as f64 * f).floor() as u64,
            };
            if kept.len() > mixnmatch::MAX_LAYERS {
                return Err(at_error(
                    *at,
                    format!(
                        "a budget search over {} kept layers: amalgam searches at most {} \
                         (give `ffn_widths` instead)",
                        kept.len(),
                        mixnmatch::MAX_LAYERS
                    ),
                ));
            }
            let cost = CostModel::new(checkpoint, layout, &kept);
            let widths_of = |choice: &[usize]| -> Vec<usize> {
                choice
                    .iter()
                    .zip(&full)
                    .map(|(&g, &f)| nested_width(f, GRANULARITIES[g].1))
                    .collect()
            };
            // Each layer's parameters at each granularity (non-decreasing:
            // nested widths grow with the fraction).
            let costs: Vec<Vec<u64>> = (0..kept.len())
                .map(|i| {
                    GRANULARITIES
                        .iter()
                        .map(|&(_, fraction)| {
                            cost.per_unit[i].saturating_mul(nested_width(full[i], fraction) as u64)
                        })
                        .collect()
                })
                .collect();
            match mixnmatch::choose(cost.fixed, &costs, limit) {
                Some(choice) => widths_of(&choice),
                None => {
                    let smallest = cost.parameters(&widths_of(&vec![0; kept.len()]));
                    return Err(at_error(
                        *at,
                        format!(
                            "a budget of {limit} parameters is below the smallest submodel the \
                             rule allows ({smallest}: every kept layer at S)"
                        ),
                    ));
                }
            }
        }
    };
    Ok(SliceSpec { kept, widths })
}

/// The submodel's parameter count as a function of the widths, for kept
/// layers fixed: everything else is constant, and each FFN unit costs the
/// same number of parameters within a layer.
struct CostModel {
    fixed: u64,
    per_unit: Vec<u64>,
}

impl CostModel {
    fn new(checkpoint: &Checkpoint, layout: &ModelLayout, kept: &[usize]) -> Self {
        let layers = layout.layers();
        let mut cost = CostModel {
            fixed: 0,
            per_unit: vec![0; kept.len()],
        };
        for entry in checkpoint.tensors() {
            let numel = entry.numel();
            match layout.part(&entry.name) {
                Part::Global => cost.fixed += numel,
                Part::PerLayerBlocks { .. } => {
                    cost.fixed += numel / layers as u64 * kept.len() as u64
                }
                Part::Layer { index, rest } => {
                    let Some(i) = kept.iter().position(|&l| l == index) else {
                        continue;
                    };
                    match layout.ffn_axis(rest) {
                        Some(_) => cost.per_unit[i] += numel / layout.ffn_widths[index] as u64,
                        None => cost.fixed += numel,
                    }
                }
            }
        }
        cost
    }

    fn parameters(&self, widths: &[usize]) -> u64 {
        self.fixed
            + self
                .per_unit
                .iter()
                .zip(widths)
                .map(|(&c, &w)| c * w as u64)
                .sum::<u64>()
    }
}
