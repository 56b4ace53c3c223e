//! `amalgam merge`: run a mergekit-compatible recipe.

use std::path::{Path, PathBuf};
use std::time::Instant;

use amalgam_checkpoint::{ScratchDir, WriteOptions};
use amalgam_merge::executor::{ExecOptions, MergeJob};
use amalgam_merge::registry::{self, Method};
use amalgam_merge::stages::{check_stages, Placement, StageOutput, StageOutputs};
use amalgam_merge::RunOptions;
use amalgam_recipe::{InputTransform, Recipe, Stages};
use anyhow::Result;

/// Merge models as a recipe (mergekit's YAML schema) says.
///
/// Everything is checked before anything is written: the recipe (schema,
/// parameters, layer ranges), every input checkpoint (headers, shapes). The
/// output is a complete Hugging Face checkpoint whose model card carries the
/// recipe and the inputs' content hashes.
#[derive(clap::Args)]
#[command(mut_arg("max_memory", |a| a.help(
    "Most bytes of tensors in flight, e.g. 4GB (default: room for each thread to hold a \
     typical layer tensor, the largest ones apart, at most half the available memory); for \
     `pleas`, the most its forward passes may hold (default: the memory available), checked \
     before anything is loaded"
)))]
#[command(after_help = "Examples:\n  \
    amalgam merge recipes/ties.yml work/merged-ties\n  \
    amalgam merge recipes/ties.yml work/merged-ties --dry-run\n  \
    amalgam merge recipes/dare_ties.yml work/dare --seed 7 --threads 2 --out-shard-size 1GB\n  \
    amalgam merge recipes/ties.yml work/merged-ties --part 1/2   # on one machine\n  \
    amalgam merge recipes/ties.yml work/merged-ties --part 2/2   # on another\n  \
    amalgam merge recipes/ties.yml work/merged-ties --join")]
pub struct Args {
    /// The recipe (YAML).
    pub(crate) recipe: PathBuf,
    /// The output directory (must not exist or be empty, unless --force).
    pub(crate) output: PathBuf,
    /// Print the plan with its I/O and memory estimate; write nothing.
    #[arg(long)]
    pub(crate) dry_run: bool,
    /// With --dry-run: the plan as JSON.
    #[arg(long, requires = "dry_run")]
    pub(crate) json: bool,
    /// Seed for random methods (DARE, DELLA): same seed, same output.
    #[arg(long, default_value_t = 0)]
    pub(crate) seed: u64,
    /// Tensors merged at once (default: the number of cores).
    #[arg(long)]
    pub(crate) threads: Option<usize>,
    #[command(flatten)]
    pub(crate) memory: crate::options::MaxMemory,
    #[command(flatten)]
    pub(crate) device: crate::options::DeviceOption,
    /// For a multi-stage recipe: keep each named stage's output in DIR/NAME
    /// (a later run reuses one whose recipe is unchanged); default: a scratch
    /// directory beside OUTPUT, removed at the end.
    #[arg(long, value_name = "DIR")]
    pub(crate) intermediate_dir: Option<PathBuf>,
    #[command(flatten)]
    pub(crate) write: crate::options::CheckpointOutput,
    /// Write the output even if the merge makes NaN or infinite values from
    /// finite inputs (otherwise an error naming the tensor).
    #[arg(long)]
    pub(crate) allow_nonfinite: bool,
    /// Compute only part I of N of the output tensors (balanced by bytes)
    /// into OUTPUT.parts/part-I-of-N; `--join` makes OUTPUT once all N are
    /// there (a shared filesystem for several machines).
    #[arg(long, value_name = "I/N", conflicts_with_all = ["dry_run", "join"])]
    pub(crate) part: Option<String>,
    /// Write OUTPUT from the parts in OUTPUT.parts (all N, same recipe and
    /// seed), byte for byte what one process writes; removes the parts.
    #[arg(long, conflicts_with = "dry_run")]
    pub(crate) join: bool,
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let text = crate::resources::read_recipe(&args.recipe)?;
    let mut stages = Stages::parse(&text, &args.recipe.display().to_string())?;
    if (args.part.is_some() || args.join) && !stages.is_single() {
        return Err(anyhow::anyhow!(
            "--part and --join split a single-stage recipe; run a multi-stage one's stages \
             as separate recipes"
        ));
    }
    if stages.is_single() {
        let recipe = stages.run_order.remove(0).recipe;
        return run_stage(recipe, &args.output, &args, args.write.force(), quiet);
    }
    run_stages(stages, &args, quiet)
}

/// A multi-stage recipe: each stage into `--intermediate-dir`/NAME (or a
/// scratch directory removed at the end), the final one into OUTPUT; stage
/// names used as models are those outputs. An intermediate is replaced only
/// if amalgam wrote it as a stage (its marker file), never an input or a
/// directory someone else made, with or without `--force`.
fn run_stages(stages: Stages, args: &Args, quiet: bool) -> Result<()> {
    check_stages(&stages)?;
    let scratch = match (&args.intermediate_dir, args.dry_run) {
        (None, false) => Some(ScratchDir::create(&args.output)?),
        _ => None,
    };
    let dir = match (&args.intermediate_dir, &scratch) {
        (Some(dir), _) => dir.clone(),
        (None, Some(scratch)) => scratch.path().to_path_buf(),
        (None, None) => PathBuf::from("(scratch)"),
    };
    let placed = StageOutputs::new(&stages, &dir, &args.output);
    if !args.dry_run {
        placed.refuse_outputs_over_inputs(&stages)?;
    }
    for (i, stage) in stages.run_order.into_iter().enumerate() {
        let (label, out) = (placed.label(i), &placed.outputs[i]);
        let mut recipe = stage.recipe;
        placed.resolve_models(&mut recipe);
        if args.dry_run {
            println!("stage {label} → {}", out.display());
            if stage.uses.is_empty() {
                run_stage(recipe, out, args, args.write.force(), quiet)?;
            } else {
                let used: Vec<&str> = stage.uses.iter().map(|&j| placed.label(j)).collect();
                println!(
                    "  uses stages {}: planned once they are written",
                    used.join(", ")
                );
            }
            println!();
            continue;
        }
        let force = match placed.placement(i, &recipe)? {
            Placement::Final => args.write.force(),
            Placement::Reuse => {
                if !quiet {
                    println!(
                        "stage {label}: reusing {} (its recipe is unchanged)",
                        out.display()
                    );
                }
                continue;
            }
            Placement::Write { replace } => replace,
        };
        if !quiet {
            println!("stage {label} → {}", out.display());
        }
        run_stage(recipe, out, args, force, quiet)?;
        if i != placed.final_stage {
            StageOutput::mark(out)?;
        }
    }
    Ok(())
}

/// One recipe into `out`.
fn run_stage(recipe: Recipe, out: &Path, args: &Args, force: bool, quiet: bool) -> Result<()> {
    let started = Instant::now();
    let threads = crate::resources::threads(args.threads);
    let method = match registry::of_recipe(&recipe)? {
        Method::PerTensor(method) => method,
        Method::WholeModel(method) => {
            if args.part.is_some() || args.join {
                return Err(recipe
                    .error(
                        recipe.merge_method_at,
                        format!(
                            "`{}` runs on whole models; --part and --join split per-tensor merges",
                            recipe.merge_method
                        ),
                    )
                    .into());
            }
            let options = RunOptions {
                seed: args.seed,
                device: args.device.resolve()?,
                threads,
                memory_limit: args.memory.limit(),
                write: write_options(args, force, vec![]),
                dry_run: args.dry_run,
            };
            let said = method.run(&recipe, out, &options, &crate::progress::Steps::new(quiet))?;
            if args.dry_run && args.json {
                println!("{}", serde_json::to_string_pretty(&said.json)?);
            } else if args.dry_run || !quiet {
                println!("{said}");
            }
            return Ok(());
        }
    };
    let job = MergeJob::prepare(recipe, method)?;

    let memory_budget = match &args.memory.max_memory {
        Some(size) => size.bytes,
        None => job.default_memory_budget(threads, amalgam_merge::half_the_available_memory()),
    };
    if args.dry_run {
        return print_plan(&job, threads, memory_budget, args.json);
    }
    let options = ExecOptions {
        seed: args.seed,
        device: args.device.resolve()?,
        threads,
        memory_budget,
        write: write_options(args, force, job.input_dirs()),
    };
    if args.join {
        let summary = job.join(out, &options)?;
        if !quiet {
            println!(
                "joined the parts of {} into {}: {} tensors, {:.1} MB, {:.1} s",
                job.plan.method,
                summary.out.display(),
                summary.tensors,
                summary.bytes_written as f64 / 1e6,
                started.elapsed().as_secs_f64()
            );
        }
        return Ok(());
    }
    let part = args.part.as_deref().map(parse_part).transpose()?;
    let total: u64 = job.output_specs().iter().map(|s| s.byte_len()).sum();
    let bar = crate::progress::bytes(total, &job.recipe.merge_method, quiet);
    let summary = match part {
        Some((i, n)) => job.execute_part(out, i, n, &options, &|bytes| bar.inc(bytes))?,
        None => job.execute(out, &options, &|bytes| bar.inc(bytes))?,
    };
    bar.finish_and_clear();
    if let (Some((i, n)), false) = (part, quiet) {
        println!(
            "part {i}/{n} of {} into {}: {} tensors, {:.1} MB written, {:.1} s; when all {n} \
             parts are done: amalgam merge {} {} --join",
            job.plan.method,
            summary.out.display(),
            summary.tensors,
            summary.bytes_written as f64 / 1e6,
            started.elapsed().as_secs_f64(),
            args.recipe.display(),
            out.display()
        );
        return Ok(());
    }
    if !quiet {
        println!(
            "merged {} models with {} into {}: {} tensors, {:.1} MB read, {:.1} MB written, {:.1} s",
            job.plan.models.len(),
            job.plan.method,
            summary.out.display(),
            summary.tensors,
            summary.bytes_read as f64 / 1e6,
            summary.bytes_written as f64 / 1e6,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// How a stage's output is written: `force` for this stage (a stage output
/// amalgam wrote before is replaced without `--force`).
fn write_options(args: &Args, force: bool, inputs: Vec<PathBuf>) -> WriteOptions {
    WriteOptions {
        force,
        allow_nonfinite: args.allow_nonfinite,
        ..args.write.write_options(inputs)
    }
}

/// `I/N` (1 ≤ I ≤ N ≤ `parts::MAX_PARTS`), refused before anything is
/// planned or allocated for N parts.
fn parse_part(text: &str) -> Result<(usize, usize)> {
    let parsed = text
        .split_once('/')
        .and_then(|(i, n)| Some((i.trim().parse().ok()?, n.trim().parse().ok()?)));
    match parsed {
        Some((i, n)) if amalgam_merge::split::manifest::check_numbers(i, n).is_ok() => Ok((i, n)),
        _ => Err(anyhow::anyhow!(
            "--part {text:?}: expected I/N with 1 ≤ I ≤ N ≤ {}, e.g. --part 1/4",
            amalgam_merge::split::manifest::MAX_PARTS
        )),
    }
}

/// Half of MemAvailable (or 4 GB where /proc/meminfo cannot be read): the
/// most the default budget may take.
fn print_plan(job: &MergeJob, threads: usize, memory_budget: u64, json: bool) -> Result<()> {
    let plan = &job.plan;
    let specs = job.output_specs();
    let written: u64 = specs.iter().map(|s| s.byte_len()).sum();
    let read = job.bytes_to_read();
    let memory = job.memory_estimate(threads, memory_budget);
    if json {
        let tensors: Vec<serde_json::Value> = plan
            .tensors
            .iter()
            .zip(&specs)
            .map(|(t, spec)| {
                serde_json::json!({
                    "name": t.name,
                    "shape": t.shape,
                    "dtype": format!("{:?}", spec.dtype),
                    "t": t.t,
                    "base": t.base,
                    "params": params_json(&t.params),
                    "inputs": t.inputs.iter().map(|i| serde_json::json!({
                        "model": plan.models[i.model],
                        "tensor": i.tensor,
                        "transform": format!("{:?}", i.transform),
                        "params": params_json(&i.params),
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        let out = serde_json::json!({
            "method": plan.method,
            "models": plan.models,
            "layers": plan.layers,
            "tensor_count": plan.tensors.len(),
            "bytes_read": read,
            "bytes_written": written,
            "peak_memory_estimate": memory.peak(),
            "memory": memory.to_json(),
            "threads": threads,
            "memory_budget": memory_budget,
            "tensors": tensors,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
        return Ok(());
    }
    println!("method        {}", plan.method);
    for (i, model) in plan.models.iter().enumerate() {
        let role = if i == plan.layout_model {
            " (config from here)"
        } else {
            ""
        };
        println!("model {i}       {model}{role}");
    }
    println!(
        "output        {} tensors, {} layers",
        plan.tensors.len(),
        plan.layers
    );
    println!("read          {:.1} MB", read as f64 / 1e6);
    println!("write         {:.1} MB", written as f64 / 1e6);
    println!("memory        {memory} with {threads} threads");
    println!();
    for (t, spec) in plan.tensors.iter().zip(&specs) {
        let inputs: Vec<String> = t
            .inputs
            .iter()
            .map(|i| {
                let params: Vec<String> = i
                    .params
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.value))
                    .collect();
                let transform = match i.transform {
                    InputTransform::AsStored => "",
                    InputTransform::Narrow => " cut",
                    InputTransform::AlignRows => " rows aligned",
                };
                format!("{}[{}]{transform}", i.model, params.join(","))
            })
            .collect();
        let params: Vec<String> = t
            .params
            .iter()
            .filter(|(_, v)| v.at.is_some())
            .map(|(k, v)| format!("{k}={}", v.value))
            .collect();
        println!(
            "{:<48} {:?} {:?} ← {} {}",
            t.name,
            spec.dtype,
            t.shape,
            inputs.join(" "),
            params.join(" ")
        );
    }
    Ok(())
}

fn params_json(
    params: &std::collections::BTreeMap<String, amalgam_recipe::Resolved>,
) -> serde_json::Value {
    use amalgam_recipe::Scalar;
    params
        .iter()
        .map(|(name, resolved)| {
            let value = match &resolved.value {
                Scalar::Number(n) => serde_json::json!(n),
                Scalar::Bool(b) => serde_json::json!(b),
                Scalar::Text(t) => serde_json::json!(t),
            };
            (name.clone(), value)
        })
        .collect::<serde_json::Map<_, _>>()
        .into()
}
