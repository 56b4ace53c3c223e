//! Output finishing: what surrounds the merged tensors — the `config.json`
//! describing them, the card, the chat template, the recipe and tokenizer
//! files — committed with the checkpoint. The chat-template rule is shared
//! with PLeaS.

use std::path::Path;

use amalgam_checkpoint::arch::{
    layer_index, restack_layer_lists, LayerOrigin, PER_LAYER_CONFIG_FIELDS,
};
use amalgam_checkpoint::family;
use amalgam_checkpoint::{
    Checkpoint, CheckpointWriter, Finish, ModelCard, ModelConfig, TensorSpec,
};
use amalgam_recipe::{ChatTemplate, Recipe};
use serde_json::Value;

use crate::executor::{MergeJob, MergeSummary};
use crate::{MergeError, Result};

/// The recipe's chat template; for `auto`, the template most of `inputs`
/// carry (the first of equals in recipe order), none if none has one.
pub fn chat_template<'c>(
    recipe: &Recipe,
    inputs: impl Iterator<Item = &'c Checkpoint>,
) -> Result<Option<String>> {
    match &recipe.chat_template {
        None => return Ok(None),
        Some(ChatTemplate::Text(text)) => return Ok(Some(text.clone())),
        Some(ChatTemplate::Auto) => {}
    }
    let mut counts: Vec<(String, usize)> = vec![];
    for checkpoint in inputs {
        let Some(found) = checkpoint.chat_template()? else {
            continue;
        };
        let found = found.trim().to_owned();
        match counts.iter_mut().find(|(t, _)| *t == found) {
            Some((_, n)) => *n += 1,
            None => counts.push((found, 1)),
        }
    }
    let most = counts.iter().map(|(_, n)| *n).max();
    let chosen = counts.into_iter().find(|(_, n)| Some(*n) == most);
    if chosen.is_none() {
        tracing::warn!("`chat_template: auto`: no input model has a chat template; none written");
    }
    Ok(chosen.map(|(t, _)| t))
}

impl MergeJob {
    pub fn output_specs(&self) -> Vec<TensorSpec> {
        self.plan
            .tensors
            .iter()
            .map(|t| TensorSpec::new(&t.name, self.output_dtype(t), t.shape.clone()))
            .collect()
    }

    /// The output's `config.json`: the layout model's, with the layer count,
    /// vocabulary and FFN width of the planned tensors, and every per-layer
    /// list following the layers stacked (each entry from the config of the
    /// model and layer it comes from). Layers of different FFN widths are
    /// refused unless the config already holds per-layer widths: one integer
    /// `intermediate_size` cannot describe them, and transformers would not
    /// load the model.
    pub fn output_config(&self) -> Result<ModelConfig> {
        let layout = self.sources[self.plan.layout_model].checkpoint.config();
        let mut config = layout.clone();
        config.set_layer_count(self.plan.layers);
        if let Some(embedding) = self
            .plan
            .tensors
            .iter()
            .find(|t| family::is_embedding(family::of(layout), &t.name))
        {
            config.set("vocab_size", embedding.shape[0].into());
        }
        // Where each output layer comes from: (model, layer) of its first input.
        let mut sources: Vec<Option<(usize, usize)>> = vec![None; self.plan.layers];
        let mut widths: Vec<Option<usize>> = vec![None; self.plan.layers];
        for tensor in &self.plan.tensors {
            let Some(layer) = layer_index(&tensor.name) else {
                continue;
            };
            let input = &tensor.inputs[0];
            if let Some(from) = layer_index(&input.tensor) {
                sources[layer].get_or_insert((input.model, from));
            }
            if let Some(width) = family::mlp_width(family::of(layout), &tensor.name, &tensor.shape)
            {
                widths[layer] = Some(width);
            }
        }
        let lists = PER_LAYER_CONFIG_FIELDS
            .iter()
            .any(|field| matches!(config.get(field), Some(Value::Array(_))));
        if lists {
            let origins = sources
                .iter()
                .enumerate()
                .map(|(layer, source)| {
                    let (model, from) = source.ok_or_else(|| {
                        self.config_error(format!(
                            "output layer {layer} has no tensors to take its per-layer config \
                             entries from"
                        ))
                    })?;
                    let config = self.sources[model].checkpoint.config().fields();
                    Ok(LayerOrigin {
                        config,
                        layer: from,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let mut fields = config.fields().clone();
            restack_layer_lists(&mut fields, &origins).map_err(|(field, layer)| {
                let (model, from) = sources[layer].expect("every origin is known");
                self.config_error(format!(
                    "model `{}` has no `{field}` entry for its layer {from}",
                    self.plan.models[model]
                ))
            })?;
            config = ModelConfig::from_json(fields);
        }
        let known: Vec<(usize, usize)> = widths
            .iter()
            .enumerate()
            .filter_map(|(layer, w)| Some((layer, (*w)?)))
            .collect();
        if let Some(&(first_layer, first)) = known.first() {
            let odd = known.iter().find(|(_, w)| *w != first);
            match (layout.get("intermediate_size"), odd) {
                (Some(Value::Array(_)), _) => {} // per-layer widths, set above
                (_, None) => config.set("intermediate_size", first.into()),
                (_, Some(&(layer, width))) => {
                    return Err(self.config_error(format!(
                        "the stacked layers have different FFN widths (layer {first_layer}: \
                         {first}, layer {layer}: {width}), but `{}` configs hold one integer \
                         `intermediate_size`, so the output would not load; stack layers of \
                         one width",
                        layout.model_type().unwrap_or("this model's")
                    )))
                }
            }
        }
        Ok(config)
    }

    fn config_error(&self, message: String) -> MergeError {
        MergeError::Config {
            model: self.plan.models[self.plan.layout_model].clone(),
            message,
        }
    }

    /// The output's card, config and files around the written tensors, committed.
    pub(crate) fn finish_output(
        &self,
        writer: CheckpointWriter,
        config: &ModelConfig,
        out: &Path,
        seed: u64,
    ) -> Result<MergeSummary> {
        let base = self.recipe.base_model.as_ref().map(|b| b.path.as_str());
        let inputs = self
            .plan
            .models
            .iter()
            .zip(&self.sources)
            .map(|(path, source)| {
                let role = if Some(path.as_str()) == base {
                    "base"
                } else {
                    "model"
                };
                source.records(role)
            })
            .collect::<Result<Vec<_>>>()?
            .concat();
        let card = ModelCard {
            title: out.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
            summary: format!(
                "A merge of {} models with the `{}` method, made by amalgam from the recipe below (seed {}).",
                self.plan.models.len(),
                self.plan.method,
                seed
            ),
            recipe: Some(self.recipe.text.clone()),
            inputs,
        };
        let mut extra: Vec<(&str, Vec<u8>)> =
            vec![("mergekit_config.yml", self.recipe.text.clone().into_bytes())];
        if let Some(tokenizer) = &self.tokenizer_json {
            extra.push(("tokenizer.json", tokenizer.clone()));
        }
        let chat_template = self.chat_template()?;
        let bytes_written = writer.layout().total_bytes();
        let out = writer.finish(Finish {
            config,
            tokenizer_source: Some(self.sources[self.plan.tokenizer_model].dir()),
            chat_template: chat_template.as_deref(),
            extra_files: &extra,
            card: &card,
        })?;
        Ok(MergeSummary {
            out,
            tensors: self.plan.tensors.len(),
            bytes_read: self.bytes_to_read(),
            bytes_written,
        })
    }
    /// The recipe's chat template (see [`chat_template`]).
    pub fn chat_template(&self) -> Result<Option<String>> {
        chat_template(&self.recipe, self.sources.iter().map(|s| &s.checkpoint))
    }
}
