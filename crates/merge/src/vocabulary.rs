//! The output's vocabulary (`tokenizer_source:` / `tokenizer:`), as mergekit
//! builds it: the base's tokenizer, one model's, or the union (the base's
//! with every other model's tokens added after it, in model order, each
//! model's in id order); tokens the recipe's `tokens:` names are added if
//! missing. [`plan`] maps every model's embedding rows onto that vocabulary
//! by token (from each `tokenizer.json`, read and edited with the
//! `tokenizers` crate); [`align`] builds each model's aligned tensor before
//! the method runs, filling the rows a model lacks: from the recipe's source
//! for the token, else the only model that has it, else the base, else the
//! mean of the models that have it, else zeros. `pad_to_multiple_of` rows are
//! each model's mean row.
//!
//! Adding a token to a `tokenizers` tokenizer rebuilds its added-token
//! matcher in time quadratic in the token's length, so every token added here
//! (another model's plain token in a union, a recipe's `tokens:`) is at most
//! [`MAX_ADDED_TOKEN_BYTES`] long, like the added tokens a tokenizer is read
//! with: the work stays linear in the tokens' total length.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;

use amalgam_checkpoint::MAX_ADDED_TOKEN_BYTES;
use amalgam_recipe::{
    Plan, PlannedTensor, Recipe, TokenRef, TokenSource, TokenizerSource, TokenizerSpec,
    VocabularyAlignment,
};
use tch::Tensor;
use tokenizers::{AddedToken, Tokenizer};

use crate::source::Source;
use crate::{MergeError, Result};

/// What the output's vocabulary needs.
pub struct Vocabulary {
    pub alignment: VocabularyAlignment,
    /// The `tokenizer.json` to write when it differs from the copied one
    /// (union, or tokens added by `tokens:`).
    pub tokenizer_json: Option<Vec<u8>>,
}

/// Builds the written vocabulary and each of the plan's models' rows of it.
pub fn plan(
    recipe: &Recipe,
    spec: &TokenizerSpec,
    plan: &Plan,
    sources: &[Source],
) -> Result<Vocabulary> {
    let located = recipe.referenced_models();
    let at_model =
        |i: usize, message: String| MergeError::Recipe(recipe.error(located[i].at, message));
    let tokenizers = sources
        .iter()
        .enumerate()
        .map(|(i, source)| {
            source.checkpoint.tokenizer()?.ok_or_else(|| {
                at_model(
                    i,
                    format!(
                        "model `{}` has no tokenizer.json, which the recipe's tokenizer settings \
                         need to map its embedding rows onto the written tokenizer's",
                        plan.models[i]
                    ),
                )
            })
        })
        .collect::<Result<Vec<_>>>()?;
    // Each model's tokens with a row of its own (ids past its vocab_size are padding).
    let vocabularies: Vec<HashMap<String, u32>> = tokenizers
        .iter()
        .zip(sources)
        .map(|(tokenizer, source)| {
            let all = tokenizer.get_vocab(true);
            let rows = source
                .checkpoint
                .config()
                .get("vocab_size")
                .and_then(serde_json::Value::as_u64)
                .unwrap_or(all.len() as u64);
            all.into_iter()
                .filter(|(_, id)| u64::from(*id) < rows)
                .collect()
        })
        .collect();
    let model_index = |m: &amalgam_recipe::ModelRef| {
        plan.models
            .iter()
            .position(|p| *p == m.path)
            .ok_or_else(|| {
                MergeError::Recipe(recipe.error(
                    m.at,
                    format!("`{}` is not one of the models this recipe merges", m.path),
                ))
            })
    };
    let (mut written, mut edited) = match &spec.source {
        TokenizerSource::Base => (tokenizers[plan.layout_model].clone(), false),
        TokenizerSource::Model(m) => (tokenizers[model_index(m)?].clone(), false),
        TokenizerSource::Union => {
            let files: Vec<PathBuf> = sources
                .iter()
                .map(|s| s.dir().join("tokenizer.json"))
                .collect();
            let union = union(plan.layout_model, &tokenizers, &vocabularies, &files)?;
            (union, true)
        }
    };
    let present = written.get_vocab(true);
    let added_and_too_long =
        |token: &String| token.len() > MAX_ADDED_TOKEN_BYTES && !present.contains_key(token);
    if let Some(rule) = spec
        .tokens
        .iter()
        .find(|rule| added_and_too_long(&rule.token))
    {
        return Err(MergeError::Recipe(recipe.error(
            rule.at,
            format!(
                "this token is {} bytes long; amalgam adds tokens of at most \
                 {MAX_ADDED_TOKEN_BYTES} bytes (the tokenizers library's matcher takes time \
                 quadratic in a token's length)",
                rule.token.len()
            ),
        )));
    }
    let missing: Vec<AddedToken> = spec
        .tokens
        .iter()
        .filter(|rule| !present.contains_key(&rule.token))
        .map(|rule| AddedToken::from(rule.token.clone(), false))
        .collect();
    if !missing.is_empty() {
        written.add_tokens(&missing);
        edited = true;
    }
    let by_id = written.get_vocab(true);
    let tokens = by_id.values().map(|&id| id as usize + 1).max().unwrap_or(0);
    let mut names: Vec<Option<&str>> = vec![None; tokens];
    for (token, &id) in &by_id {
        names[id as usize] = Some(token);
    }
    let mut rows: Vec<Vec<Option<u32>>> = vocabularies
        .iter()
        .map(|v| {
            names
                .iter()
                .map(|t| t.and_then(|t| v.get(t).copied()))
                .collect()
        })
        .collect();

    let rules: HashMap<&str, &amalgam_recipe::TokenRule> =
        spec.tokens.iter().map(|r| (r.token.as_str(), r)).collect();
    let base = recipe
        .base_model
        .as_ref()
        .and_then(|b| plan.models.iter().position(|m| *m == b.path));
    let mut fill = vec![vec![]; tokens];
    for (r, token) in names.iter().enumerate() {
        let rule = token.and_then(|t| rules.get(t));
        if rule.is_some_and(|rule| rule.force) {
            rows.iter_mut().for_each(|own| own[r] = None);
        }
        let have: Vec<usize> = (0..rows.len()).filter(|&m| rows[m][r].is_some()).collect();
        if have.len() == rows.len() {
            continue;
        }
        let row_of = |m: usize, token: &str, at| {
            vocabularies[m].get(token).copied().ok_or_else(|| {
                MergeError::Recipe(recipe.error(
                    at,
                    format!("model `{}` has no token `{token}`", plan.models[m]),
                ))
            })
        };
        fill[r] = match rule.and_then(|rule| rule.source.as_ref().map(|s| (rule, s))) {
            Some((_, TokenSource::Zero)) => vec![],
            Some((rule, TokenSource::Model(m))) => {
                let m = model_index(m)?;
                vec![(m, row_of(m, &rule.token, rule.at)?)]
            }
            Some((rule, TokenSource::ModelToken { model, token })) => {
                let m = model_index(model)?;
                let row = match token {
                    TokenRef::Text(text) => row_of(m, text, rule.at)?,
                    TokenRef::Id(id) => *id,
                };
                vec![(m, row)]
            }
            None => {
                let from: Vec<usize> = match base {
                    _ if have.len() <= 1 => have,
                    Some(b) if have.contains(&b) => vec![b],
                    _ => have,
                };
                if from.is_empty() {
                    tracing::warn!(
                        "token {:?} is in no model's vocabulary: its embedding rows are zeros",
                        token.unwrap_or("")
                    );
                }
                from.into_iter()
                    .map(|m| (m, rows[m][r].expect("the model has the token")))
                    .collect()
            }
        };
    }
    for rule in &spec.tokens {
        if rule.source.is_none() && !vocabularies.iter().any(|v| v.contains_key(&rule.token)) {
            return Err(MergeError::Recipe(recipe.error(
                rule.at,
                format!(
                    "token `{}` is in no model's vocabulary: give it a `source`",
                    rule.token
                ),
            )));
        }
    }
    let size = match spec.pad_to_multiple_of {
        Some(n) => tokens.div_ceil(n) * n,
        None => tokens,
    };
    let tokenizer_json = if edited {
        Some(
            written
                .to_string(true)
                .map_err(|e| MergeError::Device(format!("cannot write the merged tokenizer: {e}")))?
                .into_bytes(),
        )
    } else {
        None
    };
    Ok(Vocabulary {
        alignment: VocabularyAlignment {
            size,
            tokens,
            rows,
            fill,
        },
        tokenizer_json,
    })
}

/// The base's tokenizer with the others' tokens added: first their plain
/// tokens the base lacks, then every model's added tokens (special ones stay
/// special). A plain token longer than [`MAX_ADDED_TOKEN_BYTES`] is refused,
/// naming its model's tokenizer file (`files[m]`) and id.
fn union(
    base: usize,
    tokenizers: &[Tokenizer],
    vocabularies: &[HashMap<String, u32>],
    files: &[PathBuf],
) -> Result<Tokenizer> {
    let mut out = tokenizers[base].clone();
    let base_vocabulary = out.get_vocab(true);
    if base_vocabulary.len() > vocabularies[base].len() {
        return Err(MergeError::Device(
            "`union`: the base's tokenizer has tokens past its vocab_size; amalgam does not \
             strip them"
                .into(),
        ));
    }
    let order = std::iter::once(base).chain((0..tokenizers.len()).filter(|&m| m != base));
    let mut plain: Vec<String> = vec![];
    let mut added: Vec<AddedToken> = vec![];
    let mut seen: HashSet<String> = HashSet::new();
    for m in order {
        let decoder = tokenizers[m].get_added_tokens_decoder();
        let mut own: Vec<(&String, u32)> = vocabularies[m].iter().map(|(t, &id)| (t, id)).collect();
        own.sort_by_key(|&(_, id)| id);
        for (token, id) in own {
            if decoder.contains_key(&id) || base_vocabulary.contains_key(token) {
                continue;
            }
            if token.len() > MAX_ADDED_TOKEN_BYTES {
                return Err(MergeError::Checkpoint(amalgam_checkpoint::Error::Input {
                    path: files[m].clone(),
                    message: format!(
                        "`tokenizer_source: union` would add its token id {id}, {} bytes long; \
                         amalgam adds tokens of at most {MAX_ADDED_TOKEN_BYTES} bytes (the \
                         tokenizers library's matcher takes time quadratic in a token's length)",
                        token.len()
                    ),
                }));
            }
            if seen.insert(token.clone()) {
                plain.push(token.clone());
            }
        }
        let mut specials: Vec<(&u32, &AddedToken)> = decoder.iter().collect();
        specials.sort_by_key(|&(id, _)| *id);
        for (id, token) in specials {
            if vocabularies[m].values().any(|v| v == id)
                && !base_vocabulary.contains_key(&token.content)
                && seen.insert(token.content.clone())
            {
                added.push(token.clone());
            }
        }
    }
    let plain: Vec<AddedToken> = plain
        .into_iter()
        .map(|t| AddedToken::from(t, false))
        .collect();
    out.add_tokens(&plain);
    let (special, normal): (Vec<AddedToken>, Vec<AddedToken>) =
        added.into_iter().partition(|t| t.special);
    out.add_tokens(&normal);
    out.add_special_tokens(&special);
    Ok(out)
}

/// The inputs of a vocabulary tensor (`inputs[i]` is model
/// `tensor.inputs[i].model`'s), each made `alignment.size` rows long.
pub fn align(
    alignment: &VocabularyAlignment,
    tensor: &PlannedTensor,
    inputs: &[Tensor],
) -> Result<Vec<Tensor>> {
    let fail = |message: String| MergeError::Tensor {
        tensor: tensor.name.clone(),
        message,
    };
    let torch = |cause| MergeError::Torch {
        tensor: tensor.name.clone(),
        cause,
    };
    let tokens = alignment.tokens;
    let position = |model: usize| tensor.inputs.iter().position(|i| i.model == model);
    for (input, x) in tensor.inputs.iter().zip(inputs) {
        let stored = x.size()[0];
        let own = alignment.rows[input.model].iter().flatten();
        let fills = alignment
            .fill
            .iter()
            .flatten()
            .filter(|(m, _)| *m == input.model);
        if let Some(row) = own
            .chain(fills.map(|(_, r)| r))
            .find(|&&r| i64::from(r) >= stored)
        {
            return Err(fail(format!(
                "model {}'s row {row} is asked for, but the tensor has {stored} rows",
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
    let device = inputs[0].device();
    let kind = inputs[0].kind();
    let row_shape = |rows: i64| -> Vec<i64> {
        std::iter::once(rows)
            .chain(inputs[0].size()[1..].iter().copied())
            .collect()
    };
    let column = |mask: Vec<bool>| {
        let mut shape = vec![mask.len() as i64];
        shape.extend(std::iter::repeat_n(1, inputs[0].dim() - 1));
        Tensor::from_slice(&mask).to_device(device).reshape(shape)
    };
    // The fill rows: for each contributing (model, row), summed in order, then
    // divided by the count (mergekit's accumulation, rounding included).
    let mut default = inputs[0]
        .f_new_zeros(row_shape(tokens as i64).as_slice(), (kind, device))
        .map_err(torch)?;
    let most = alignment.fill.iter().map(Vec::len).max().unwrap_or(0);
    for k in 0..most {
        let mut rows = vec![0i64; tokens];
        let mut from = vec![None; tokens];
        for (r, pairs) in alignment.fill.iter().enumerate() {
            if let Some(&(m, row)) = pairs.get(k) {
                rows[r] = i64::from(row);
                from[r] = Some(m);
            }
        }
        for (i, input) in tensor.inputs.iter().enumerate() {
            let mask: Vec<bool> = from.iter().map(|m| *m == Some(input.model)).collect();
            if !mask.contains(&true) {
                continue;
            }
            let index: Vec<i64> = rows
                .iter()
                .zip(&mask)
                .map(|(&row, &mine)| if mine { row } else { 0 })
                .collect();
            let picked = inputs[i]
                .f_index_select(0, &Tensor::from_slice(&index).to_device(device))
                .map_err(torch)?;
            default += picked.where_self(&column(mask), &picked.zeros_like());
        }
        if let Some(missing) = from.iter().flatten().find(|m| position(**m).is_none()) {
            return Err(fail(format!(
                "a row is filled from model {missing}, which does not contribute this tensor"
            )));
        }
    }
    let counts: Vec<f32> = alignment
        .fill
        .iter()
        .map(|f| f.len().max(1) as f32)
        .collect();
    let counts = Tensor::from_slice(&counts).to_device(device).to_kind(kind);
    let mut shape = vec![tokens as i64];
    shape.extend(std::iter::repeat_n(1, inputs[0].dim() - 1));
    let default = default / counts.reshape(shape);
    tensor
        .inputs
        .iter()
        .zip(inputs)
        .map(|(input, x)| {
            let own = &alignment.rows[input.model];
            let index: Vec<i64> = own.iter().map(|r| r.map_or(0, i64::from)).collect();
            let has = column(own.iter().map(Option::is_some).collect());
            let gathered = x
                .f_index_select(0, &Tensor::from_slice(&index).to_device(device))
                .map_err(torch)?;
            let aligned = gathered.where_self(&has, &default);
            if alignment.size == tokens {
                return Ok(aligned);
            }
            // Padding rows: the mean of this model's aligned token rows.
            let mean = aligned.f_mean_dim(0, true, kind).map_err(torch)?;
            let padding = mean.expand(
                row_shape((alignment.size - tokens) as i64).as_slice(),
                false,
            );
            Tensor::f_cat(&[aligned, padding], 0).map_err(torch)
        })
        .collect()
}
