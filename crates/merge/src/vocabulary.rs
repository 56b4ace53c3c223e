//! `tokenizer_source`: the output is written with one model's tokenizer (or
//! the base's), so its embedding and head must have that tokenizer's rows.
//! [`alignment`] maps every model's rows onto that vocabulary by token text
//! (from each model's `tokenizer.json`); [`align`] builds each model's
//! aligned tensor before the method runs, filling the rows a model lacks as
//! mergekit does: from the only model that has the token, else from the
//! base, else with the average of the models that have it, else zeros.

use amalgam_recipe::{Plan, PlannedTensor, Recipe, TokenizerSource, VocabularyAlignment};
use tch::Tensor;

use crate::source::Source;
use crate::{MergeError, Result};

/// Each of the plan's models' rows of the vocabulary of `recipe`'s
/// `tokenizer_source`. Every model needs a `tokenizer.json`.
pub fn alignment(recipe: &Recipe, plan: &Plan, sources: &[Source]) -> Result<VocabularyAlignment> {
    let located = recipe.referenced_models();
    let source = match &recipe.tokenizer_source {
        Some(TokenizerSource::Model(m)) => plan
            .models
            .iter()
            .position(|p| *p == m.path)
            .expect("the planner indexes every referenced model"),
        _ => plan.layout_model,
    };
    let vocabularies = sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            source.checkpoint.vocabulary()?.ok_or_else(|| {
                MergeError::Recipe(recipe.error(
                    located[i].at,
                    format!(
                        "model `{}` has no tokenizer.json, which `tokenizer_source` needs to map \
                         its embedding rows onto the written tokenizer's",
                        plan.models[i]
                    ),
                ))
            })
        })
        .collect::<Result<Vec<_>>>()?;
    let written = &vocabularies[source];
    let size = written
        .values()
        .map(|&id| id as usize + 1)
        .max()
        .unwrap_or(0);
    let mut tokens: Vec<Option<&str>> = vec![None; size];
    for (token, &id) in written {
        tokens[id as usize] = Some(token);
    }
    let rows = vocabularies
        .iter()
        .map(|vocabulary| {
            tokens
                .iter()
                .map(|token| token.and_then(|t| vocabulary.get(t).copied()))
                .collect()
        })
        .collect();
    Ok(VocabularyAlignment { size, rows })
}

/// The inputs of a vocabulary tensor (`inputs[i]` is model
/// `tensor.inputs[i].model`'s), each made `alignment.size` rows long.
pub fn align(
    alignment: &VocabularyAlignment,
    tensor: &PlannedTensor,
    inputs: &[Tensor],
    base_model: Option<usize>,
) -> Result<Vec<Tensor>> {
    let fail = |message: String| MergeError::Tensor {
        tensor: tensor.name.clone(),
        message,
    };
    let torch = |cause| MergeError::Torch {
        tensor: tensor.name.clone(),
        cause,
    };
    let size = alignment.size;
    let rows: Vec<&Vec<Option<u32>>> = tensor
        .inputs
        .iter()
        .map(|input| &alignment.rows[input.model])
        .collect();
    for (input, (x, own)) in tensor.inputs.iter().zip(inputs.iter().zip(&rows)) {
        let stored = x.size()[0];
        if let Some(row) = own.iter().flatten().find(|&&r| i64::from(r) >= stored) {
            return Err(fail(format!(
                "model {}'s tokenizer has token id {row}, but the tensor has {stored} rows",
                input.model
            )));
        }
        if x.size()[1..] != inputs[0].size()[1..] {
            return Err(fail(format!(
                "rows of {:?} and {:?} cannot be aligned",
                x.size(),
                inputs[0].size()
            )));
        }
    }
    let base = base_model.and_then(|b| tensor.inputs.iter().position(|i| i.model == b));
    // For each row some input lacks: which inputs' rows make its default.
    let mut contributes = vec![vec![false; size]; inputs.len()];
    let mut counts = vec![1.0f32; size];
    for r in 0..size {
        let have: Vec<usize> = (0..inputs.len())
            .filter(|&i| rows[i][r].is_some())
            .collect();
        if have.len() == inputs.len() {
            continue;
        }
        let from: Vec<usize> = match base {
            _ if have.len() <= 1 => have,
            Some(b) if have.contains(&b) => vec![b],
            _ => have,
        };
        counts[r] = from.len().max(1) as f32;
        for i in from {
            contributes[i][r] = true;
        }
    }
    let device = inputs[0].device();
    let own_rows = |i: usize| {
        let index: Vec<i64> = rows[i].iter().map(|r| r.map_or(0, i64::from)).collect();
        let has: Vec<bool> = rows[i].iter().map(Option::is_some).collect();
        let gathered = inputs[i]
            .f_index_select(0, &Tensor::from_slice(&index).to_device(device))
            .map_err(torch)?;
        Ok::<_, MergeError>((gathered, Tensor::from_slice(&has).to_device(device)))
    };
    let row_mask = |mask: Tensor, like: &Tensor| {
        let mut shape = vec![size as i64];
        shape.extend(std::iter::repeat_n(1, like.dim() - 1));
        mask.reshape(shape)
    };
    let mut gathered = vec![];
    let mut default = inputs[0]
        .f_new_zeros(
            [size as i64]
                .into_iter()
                .chain(inputs[0].size()[1..].iter().copied())
                .collect::<Vec<_>>()
                .as_slice(),
            (inputs[0].kind(), device),
        )
        .map_err(torch)?;
    // Summed in model order, then divided: mergekit's accumulation, rounding included.
    for (i, adds) in contributes.iter().enumerate() {
        let (own, has) = own_rows(i)?;
        let adds = row_mask(Tensor::from_slice(adds).to_device(device), &own);
        default += own.where_self(&adds, &own.zeros_like());
        gathered.push((own, row_mask(has, &default)));
    }
    let counts = row_mask(Tensor::from_slice(&counts).to_device(device), &default);
    let kind = default.kind();
    let default = default / counts.to_kind(kind);
    Ok(gathered
        .into_iter()
        .map(|(own, has)| own.where_self(&has, &default))
        .collect())
}
