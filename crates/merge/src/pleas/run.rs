//! `merge_method: pleas` as a whole-model method: loads the two models into
//! the forward pass, feeds the PLeaS pipeline their features on calibration
//! batches, and writes the merged model (its FFN widths in the config).

use std::path::Path;
use std::time::Instant;

use amalgam_checkpoint::{Checkpoint, Dtype};
use amalgam_checkpoint::{InputRecord, ModelCard};
use amalgam_nn::calibration::CalibrationText;
use amalgam_nn::{Decoder, DecoderConfig, DecoderWriter, Part, SaveFiles};
use amalgam_recipe::{PleasMatching, PleasRecipe, Recipe, TokenizerSource};
use tch::{Device, Kind, Tensor};

use super::statistics::Metric;
use super::{Matching, PleasPlan, Widen};
use crate::source::Source;
use crate::{MergeError, Progress, Result, RunOptions, RunReport, WholeModelMethod};

/// PLeaS in the whole-model registry.
pub struct Pleas;

impl WholeModelMethod for Pleas {
    fn name(&self) -> &'static str {
        "pleas"
    }

    fn run(
        &self,
        recipe: &Recipe,
        out: &Path,
        options: &RunOptions,
        progress: &dyn Progress,
    ) -> Result<RunReport> {
        run(recipe, out, options, progress)
    }
}

/// Calibration batches `[batch, seq_len]` as the recipe asks (see
/// [`CalibrationText`]).
fn calibration(
    recipe: &Recipe,
    pleas: &PleasRecipe,
    vocab: usize,
    models: [&Path; 2],
) -> Result<Vec<Tensor>> {
    let c = &pleas.calibration;
    let mut source = CalibrationText::open(&c.source, &c.field, vocab, &models, c.seq_len, c.seed)
        .map_err(|e| MergeError::Recipe(recipe.error(c.source_at, e.to_string())))?;
    Ok(source.batches(c.samples, c.batch, c.seq_len))
}

fn run(
    recipe: &Recipe,
    out: &Path,
    options: &RunOptions,
    progress: &dyn Progress,
) -> Result<RunReport> {
    let started = Instant::now();
    let pleas = PleasRecipe::from_recipe(recipe)?;
    let checkpoints = pleas
        .models
        .iter()
        .map(|m| {
            let source = Source::open(recipe, m)?;
            match source.adapter {
                Some(_) => Err(MergeError::Recipe(recipe.error(
                    m.at,
                    "pleas reads whole checkpoints; merge the adapter into its base first \
                     (a linear merge of `BASE+ADAPTER` alone with weight 1 writes it)",
                ))),
                None => Ok(source.checkpoint),
            }
        })
        .collect::<Result<Vec<_>>>()?;
    // What the output carries besides the weights: checked before any work.
    let dtype = output_dtype(recipe, &checkpoints[0]);
    let tokenizer_source = tokenizer_source(recipe, &pleas, &checkpoints)?;
    let chat_template = crate::output::chat_template(recipe, checkpoints.iter())?;
    let device = options.device;
    // Matrix products split their sums by thread: the same recipe and the
    // same thread count give bit-identical output (other counts differ in
    // the last bits of a few weights).
    let threads = options.threads;
    tch::set_num_threads(threads as i32);
    let configs = checkpoints
        .iter()
        .zip(&pleas.models)
        .map(|(checkpoint, m)| {
            DecoderConfig::from_model_config(
                checkpoint.config(),
                &checkpoint.dir().join("config.json"),
            )
            .map_err(|e| MergeError::Recipe(recipe.error(m.at, format!("model `{}`: {e}", m.path))))
        })
        .collect::<Result<Vec<_>>>()?;
    let config = configs[0].clone();
    let settings = super::Options {
        matching: match pleas.matching {
            PleasMatching::Activation if pleas.metric == "distance" => {
                Matching::Activation(Metric::Distance)
            }
            PleasMatching::Activation => Matching::Activation(Metric::Correlation),
            PleasMatching::Weight => Matching::Weight { seed: pleas.seed },
            PleasMatching::None => Matching::None,
        },
        budget: pleas.budget,
        ridge: pleas.ridge,
        kind: if pleas.precision == "float32" {
            Kind::Float
        } else {
            Kind::Double
        },
        least_squares: pleas.least_squares,
        device: options.device,
        widen: if pleas.widen == "ffn" {
            Widen::Ffn
        } else {
            Widen::All
        },
    };
    // The memory estimate first (from each config alone: a config claiming
    // huge sizes is refused before anything is read), then each config
    // against its weights, then the two models against each other.
    let batch = pleas.calibration.batch.min(pleas.calibration.samples);
    let estimate_of = |plan: &PleasPlan, config: &DecoderConfig| {
        plan.memory(
            &settings,
            pleas.calibration.samples * pleas.calibration.seq_len,
            batch * pleas.calibration.seq_len,
        )
        .estimate(config.forward_bytes(batch, pleas.calibration.seq_len))
    };
    let mut planned = vec![];
    for config in &configs {
        let plan = PleasPlan::new(config, &settings)?;
        let memory = estimate_of(&plan, config);
        if let Some(limit) = &options.memory_limit {
            limit
                .check(&memory, "this PLeaS merge")
                .map_err(MergeError::Memory)?;
        }
        planned.push((plan, memory));
    }
    for (checkpoint, m) in checkpoints.iter().zip(&pleas.models) {
        let nothing = Part {
            embedding: false,
            layers: 0..0,
            head: false,
        };
        Decoder::load_part(checkpoint.dir(), Device::Cpu, Kind::Float, Some(&nothing)).map_err(
            |e| MergeError::Recipe(recipe.error(m.at, format!("model `{}`: {e}", m.path))),
        )?;
    }
    let shape_of = |c: &DecoderConfig| {
        let a = &c.architecture;
        (
            (
                a.model_type.clone(),
                a.qkv_bias,
                a.output_bias,
                a.mlp_bias,
                a.parallel_residual,
            ),
            c.hidden_size,
            c.intermediate_sizes.clone(),
            c.num_attention_heads,
            c.num_key_value_heads,
            c.vocab_size,
            c.tie_word_embeddings,
        )
    };
    if shape_of(&configs[1]) != shape_of(&config) {
        return Err(MergeError::Recipe(recipe.error(
            pleas.models[1].at,
            "pleas merges two models of one family and shape (model type, biases, hidden \
             size, layers, FFN widths, heads, vocabulary, tied or untied head)",
        )));
    }
    let (plan, memory) = planned.swap_remove(0);
    let batches = calibration(
        recipe,
        &pleas,
        config.vocab_size,
        [checkpoints[0].dir(), checkpoints[1].dir()],
    )?;
    let out_config = plan.merged_config();
    let passes = if plan.needs_residual_pass(settings.matching) {
        "two passes (the residual stream, then layer by layer)"
    } else {
        "one pass (layer by layer; no residual pass needed)"
    };
    let ratio = plan.parameters() as f64 / plan.input_parameters as f64;
    let summary = format!(
        "pleas: {} + {} ({} layers, hidden {}, FFN {}), {:?}, budget {}: hidden {} ({} channels \
         kept separately from each model), {} KV heads ({} separate), FFN {}; {} \
         parameters ({ratio:.3}× one input); {passes} over {} calibration batches of {} × {} \
         tokens ({}); {memory}",
        pleas.models[0].path,
        pleas.models[1].path,
        plan.shape.ffn.len(),
        plan.shape.hidden,
        widths(&plan.shape.ffn),
        settings.matching,
        settings.budget,
        plan.hidden(),
        plan.allocation.residual,
        plan.kv_heads(),
        plan.allocation.kv_groups,
        widths(&plan.ffn()),
        plan.parameters(),
        batches.len(),
        batch,
        pleas.calibration.seq_len,
        pleas.calibration.source,
    );
    if options.dry_run {
        let json = serde_json::json!({
            "method": "pleas",
            "models": [&pleas.models[0].path, &pleas.models[1].path],
            "layers": plan.shape.ffn.len(),
            "hidden": plan.shape.hidden,
            "ffn": plan.shape.ffn,
            "matching": format!("{:?}", settings.matching),
            "budget": settings.budget,
            "merged": {
                "hidden": plan.hidden(),
                "separate_residual": plan.allocation.residual,
                "kv_heads": plan.kv_heads(),
                "separate_kv_groups": plan.allocation.kv_groups,
                "ffn": plan.ffn(),
                "parameters": plan.parameters(),
                "input_parameters": plan.input_parameters,
            },
            "passes": if plan.needs_residual_pass(settings.matching) { 2 } else { 1 },
            "calibration": {
                "source": pleas.calibration.source,
                "batches": batches.len(),
                "batch": batch,
                "seq_len": pleas.calibration.seq_len,
            },
            "peak_memory_estimate": memory.peak(),
            "memory": memory.to_json(),
            "threads": threads,
        });
        return Ok(RunReport {
            text: summary,
            json,
        });
    }
    tracing::info!("{summary}");
    let source = |i: usize| {
        let (dir, m) = (checkpoints[i].dir(), &pleas.models[i]);
        move |part: &Part| {
            Decoder::load_part(dir, device, Kind::Float, Some(part)).map_err(|e| {
                MergeError::Recipe(recipe.error(m.at, format!("model `{}`: {e}", m.path)))
            })
        }
    };
    let (source_a, source_b) = (source(0), source(1));
    let mut write = options.write.clone();
    write.inputs = checkpoints.iter().map(|c| c.dir().to_path_buf()).collect();
    let writer = DecoderWriter::create(out, &out_config, dtype, &write)?;
    let report = super::merge(
        &plan,
        [&source_a, &source_b],
        &batches,
        &settings,
        &mut |name, tensor| Ok(writer.write(&name, &tensor)?),
        progress,
    )?;
    let inputs = checkpoints
        .iter()
        .zip(["model-a", "model-b"])
        .map(|(c, role)| InputRecord::hash(role, c))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let t = &report.timings;
    let phases = format!(
        "features {:.1} s, matching {:.1} s, least squares {:.1} s (first pass {:.1} s, \
         second {:.1} s)",
        t.features, t.matching, t.least_squares, t.first_pass, t.second_pass
    );
    let card = ModelCard {
        title: "PLeaS merge".into(),
        summary: format!(
            "Merged by `amalgam merge` (PLeaS: permutation alignment and least squares): \
             {} parameters ({ratio:.3}× one input), hidden size {} ({} channels kept separately \
             from each model), FFN widths {:?} ({:?} units kept separately). \
             {phases} ({threads} threads).",
            plan.parameters(),
            plan.hidden(),
            report.separate_residual,
            plan.ffn(),
            report.separate_ffn,
        ),
        recipe: Some(recipe.text.clone()),
        inputs,
    };
    let files = SaveFiles {
        dtype,
        tokenizer_source: Some(tokenizer_source),
        chat_template: chat_template.as_deref(),
        extra_files: &[],
    };
    let out = writer.finish(&card, &files)?;
    let seconds = started.elapsed().as_secs_f64();
    Ok(RunReport {
        text: format!(
            "merged 2 models with pleas into {}: {} parameters ({ratio:.3}×), hidden size {}, \
             FFN widths {:?}; {phases}, total {seconds:.1} s",
            out.display(),
            plan.parameters(),
            plan.hidden(),
            plan.ffn(),
        ),
        json: serde_json::json!({
            "method": "pleas",
            "out": out,
            "parameters": plan.parameters(),
            "hidden": plan.hidden(),
            "ffn": plan.ffn(),
            "seconds": seconds,
        }),
    })
}

/// Per-layer widths, `N × W` when every layer has the same.
fn widths(widths: &[usize]) -> String {
    match widths {
        [first, rest @ ..] if rest.iter().all(|w| w == first) => {
            format!("{} × {first}", widths.len())
        }
        _ => format!("{widths:?}"),
    }
}

/// The written dtype: the recipe's `out_dtype`, else its `dtype`, else the
/// first model's (its embedding's). PLeaS itself computes in F32 and F64.
fn output_dtype(recipe: &Recipe, first: &Checkpoint) -> Dtype {
    let named = recipe.out_dtype.as_ref().or(recipe.dtype.as_ref());
    match named {
        Some((dtype, _)) => dtype.safetensors(),
        None => first.weights_dtype(),
    }
}

/// Whose tokenizer files the output carries: `tokenizer_source: base` (the
/// first model, PLeaS having no base) or one of the two models. PLeaS keeps
/// the vocabulary the two models share, so a union, token rules or padding
/// are refused at their line.
fn tokenizer_source<'c>(
    recipe: &Recipe,
    pleas: &PleasRecipe,
    checkpoints: &'c [Checkpoint],
) -> Result<&'c Path> {
    let Some(spec) = &recipe.tokenizer else {
        return Ok(checkpoints[0].dir());
    };
    let refuse = |what: &str| {
        MergeError::Recipe(recipe.error(
            spec.at,
            format!("pleas keeps the vocabulary its two models share; {what} is not supported"),
        ))
    };
    if !spec.tokens.is_empty() {
        return Err(refuse("a `tokens:` block"));
    }
    if spec.pad_to_multiple_of.is_some() {
        return Err(refuse("`pad_to_multiple_of`"));
    }
    match &spec.source {
        TokenizerSource::Base => Ok(checkpoints[0].dir()),
        TokenizerSource::Union => Err(refuse("`union`")),
        TokenizerSource::Model(m) => pleas
            .models
            .iter()
            .position(|p| p.path == m.path)
            .map(|i| checkpoints[i].dir())
            .ok_or_else(|| {
                MergeError::Recipe(recipe.error(
                    m.at,
                    format!("tokenizer source `{}` is not one of the two models", m.path),
                ))
            }),
    }
}
