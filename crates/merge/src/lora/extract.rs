//! `extract-lora` (mergekit-extract-lora): a PEFT LoRA adapter that turns a
//! base into (approximately) a fine-tune. Each 2-D weight's task vector
//! ΔW = W_ft − W_base is factored by SVD into `B·A` of at most `rank`
//! (A = √S·Vᵀ, B = U·√S, so scale 1: `lora_alpha = r`); embeddings (unless
//! `embed_lora`), the head (likewise) and 1-D weights (norms) are saved whole
//! as `modules_to_save`; the biases of factored layers are saved whole
//! (peft's `bias: lora_only`). Matrices whose smaller side exceeds
//! [`RANDOMIZED_ABOVE`] and four times the rank use a randomized SVD (seeded,
//! two power iterations), the rest libtorch's exact one. Every factored
//! module's relative reconstruction error ‖ΔW − B·A‖ / ‖ΔW‖ is reported.

use std::collections::BTreeMap;

use amalgam_checkpoint::family::{self, Place};
use amalgam_checkpoint::{kind_from_dtype, Checkpoint};
use serde_json::json;
use tch::{Kind, Tensor};

use crate::{MergeError, Result};

/// Exact SVD up to this smaller side (or when the rank is a quarter of it or more).
pub const RANDOMIZED_ABOVE: i64 = 1024;

/// What to extract.
#[derive(Debug, Clone)]
pub struct ExtractOptions {
    /// The largest rank of a factored module (each keeps at least 1).
    pub rank: usize,
    /// Factor the input embedding (transposed, `lora_embedding_A/B`) and the
    /// head instead of saving them whole.
    pub embed_lora: bool,
    /// Singular values at or below this are dropped, the largest always
    /// kept (0: keep up to `rank`).
    pub sv_epsilon: f64,
    /// Module names (last component, e.g. `lm_head`) saved whole.
    pub modules_to_save: Vec<String>,
    /// Seed of the randomized SVD's test matrices.
    pub seed: u64,
}

/// How one module went into the adapter.
#[derive(Debug, Clone)]
pub struct ModuleReport {
    pub module: String,
    /// `None`: saved whole.
    pub rank: Option<usize>,
    pub relative_error: Option<f64>,
    pub randomized: bool,
}

/// The adapter's tensors (in file order) and `adapter_config.json`.
pub struct Extracted {
    pub tensors: Vec<(String, Tensor)>,
    pub config: serde_json::Value,
    pub modules: Vec<ModuleReport>,
}

const PREFIX: &str = "base_model.model.";

/// Extracts the adapter; `progress` gets each tensor's name as it is done.
pub fn extract(
    base: &Checkpoint,
    finetune: &Checkpoint,
    options: &ExtractOptions,
    base_path: &str,
    progress: &dyn Fn(&str),
) -> Result<Extracted> {
    let fail = |tensor: &str, message: String| MergeError::Tensor {
        tensor: tensor.to_owned(),
        message,
    };
    let torch = |tensor: &str| {
        let tensor = tensor.to_owned();
        move |cause| MergeError::Torch {
            tensor: tensor.clone(),
            cause,
        }
    };
    let family = family::of(finetune.config());
    let mut tensors = vec![];
    let mut modules: Vec<ModuleReport> = vec![];
    let mut to_save = options.modules_to_save.clone();
    let mut targets: Vec<String> = vec![];
    let mut ranks: BTreeMap<String, usize> = BTreeMap::new();
    let mut biases = false;
    for entry in finetune.tensors() {
        let name = entry.name.as_str();
        let module = name
            .strip_suffix(".weight")
            .or_else(|| name.strip_suffix(".bias"))
            .unwrap_or(name);
        let key = module.rsplit('.').next().unwrap_or(module).to_owned();
        let (place, vocab) = family::placement(family, name);
        let embedding = place == Some(Place::BeforeLayers) && entry.shape.len() == 2;
        let head = vocab && place == Some(Place::AfterLayers);
        let base_entry = base.entry(name).map_err(|_| {
            fail(
                name,
                format!("the fine-tune has it, the base `{base_path}` does not"),
            )
        })?;
        let whole = to_save.contains(&key)
            || entry.shape.len() == 1 && name.ends_with(".weight")
            || (embedding || head) && (!options.embed_lora || base_entry.shape != entry.shape);
        if whole {
            // Saved at full rank: the fine-tune's own tensor (a norm's bias goes with it).
            if !to_save.contains(&key) {
                to_save.push(key);
            }
            if !modules.iter().any(|m| m.module == module) {
                modules.push(ModuleReport {
                    module: module.to_owned(),
                    rank: None,
                    relative_error: None,
                    randomized: false,
                });
            }
            tensors.push((format!("{PREFIX}{name}"), finetune.tensor(name)?));
            progress(name);
            continue;
        }
        if base_entry.shape != entry.shape {
            return Err(fail(
                name,
                format!(
                    "shape {:?} in the fine-tune, {:?} in the base",
                    entry.shape, base_entry.shape
                ),
            ));
        }
        if name.ends_with(".bias") {
            // A factored layer's bias, whole, as peft saves it with `bias: lora_only`.
            biases = true;
            tensors.push((
                format!("{PREFIX}{module}.base_layer.bias"),
                finetune.tensor(name)?,
            ));
            progress(name);
            continue;
        }
        let stored = kind_from_dtype(entry.dtype).ok_or_else(|| {
            fail(
                name,
                format!(
                    "stored as {:?}, which amalgam cannot compute with",
                    entry.dtype
                ),
            )
        })?;
        // The change in the stored dtype, as mergekit forms it, then F32 for the SVD.
        let delta = finetune
            .read_as(name, stored)?
            .f_sub(&base.read_as(name, stored)?)
            .and_then(|d| d.f_to_kind(Kind::Float))
            .map_err(torch(name))?;
        if entry.shape.len() != 2 {
            return Err(fail(
                name,
                format!("a {}-D weight cannot be factored", entry.shape.len()),
            ));
        }
        if entry.shape.contains(&0) {
            return Err(fail(
                name,
                format!("an empty weight ({:?}) cannot be factored", entry.shape),
            ));
        }
        // Input embeddings are stored (vocabulary, hidden): peft factors the transpose.
        let transpose = embedding;
        let delta = if transpose {
            delta.f_tr().map_err(torch(name))?
        } else {
            delta
        };
        let (a, b, randomized) = factor(&delta, options, name).map_err(torch(name))?;
        let rank = a.size()[0] as usize;
        let norm_of = |t: &Tensor| t.f_norm().and_then(|n| n.f_double_value(&[]));
        let norm = norm_of(&delta).map_err(torch(name))?;
        let error = b
            .f_matmul(&a)
            .and_then(|rebuilt| delta.f_sub(&rebuilt))
            .and_then(|residual| norm_of(&residual))
            .map_err(torch(name))?;
        let relative_error = if norm > 0.0 { error / norm } else { 0.0 };
        let (a, b) = (
            a.f_to_kind(stored).map_err(torch(name))?,
            b.f_to_kind(stored).map_err(torch(name))?,
        );
        if transpose {
            tensors.push((format!("{PREFIX}{module}.lora_embedding_A"), a));
            tensors.push((format!("{PREFIX}{module}.lora_embedding_B"), b));
        } else {
            tensors.push((format!("{PREFIX}{module}.lora_A.weight"), a));
            tensors.push((format!("{PREFIX}{module}.lora_B.weight"), b));
        }
        if !targets.contains(&key) {
            targets.push(key);
        }
        ranks.insert(module.to_owned(), rank);
        modules.push(ModuleReport {
            module: module.to_owned(),
            rank: Some(rank),
            relative_error: Some(relative_error),
            randomized,
        });
        progress(name);
    }
    let r = ranks.values().copied().max().unwrap_or(options.rank.max(1));
    let lower: serde_json::Map<String, serde_json::Value> = ranks
        .iter()
        .filter(|&(_, &k)| k != r)
        .map(|(m, &k)| (m.clone(), json!(k)))
        .collect();
    targets.sort();
    let config = json!({
        "base_model_name_or_path": base_path,
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": lower,
        "alpha_pattern": lower,
        "use_rslora": false,
        "bias": if biases { "lora_only" } else { "none" },
        "target_modules": targets,
        "modules_to_save": to_save,
        "lora_dropout": 0.0,
        "fan_in_fan_out": false,
        "inference_mode": true,
    });
    // Biases of factored layers need their layer's LoRA pair.
    for (tensor, _) in &tensors {
        if let Some(module) = tensor.strip_suffix(".base_layer.bias") {
            if !tensors
                .iter()
                .any(|(t, _)| *t == format!("{module}.lora_B.weight"))
            {
                return Err(fail(
                    tensor,
                    "the bias of a layer that is neither factored nor saved whole".into(),
                ));
            }
        }
    }
    Ok(Extracted {
        tensors: tensors
            .into_iter()
            .map(|(n, t)| (n, t.contiguous()))
            .collect(),
        config,
        modules,
    })
}

/// (A, B, randomized) with B·A ≈ `delta` (2-D, not empty), A = √S·Vᵀ and
/// B = U·√S truncated to the rank and `sv_epsilon`, keeping at least one
/// singular value (peft refuses rank 0; an unchanged module's is zero).
fn factor(
    delta: &Tensor,
    options: &ExtractOptions,
    name: &str,
) -> std::result::Result<(Tensor, Tensor, bool), tch::TchError> {
    let (m, n) = (delta.size()[0], delta.size()[1]);
    let smaller = m.min(n);
    // A rank beyond i64 (`--rank` is a usize) is the full rank.
    let want = i64::try_from(options.rank)
        .unwrap_or(i64::MAX)
        .min(smaller)
        .max(1);
    let randomized = smaller > RANDOMIZED_ABOVE && want * 4 < smaller;
    let (u, s, vh) = if randomized {
        randomized_svd(delta, want, options.seed, name)?
    } else {
        svd(delta)?
    };
    let mut rank = want.min(s.size()[0]);
    if options.sv_epsilon > 0.0 {
        let above = s
            .f_gt(options.sv_epsilon)?
            .f_sum(Kind::Int64)?
            .f_int64_value(&[])?;
        rank = rank.min(above.max(1));
    }
    let root = s.f_narrow(0, 0, rank)?.f_sqrt()?;
    let a = root.f_unsqueeze(1)?.f_mul(&vh.f_narrow(0, 0, rank)?)?;
    let b = u.f_narrow(1, 0, rank)?.f_mul(&root.f_unsqueeze(0)?)?;
    Ok((a, b, randomized))
}

/// (U, S, Vᵀ), reduced: libtorch's `svd` (LAPACK's gesdd, as `torch.linalg.svd`
/// on the CPU; tch's `linalg_svd` cannot leave its CUDA-only driver unset).
fn svd(x: &Tensor) -> std::result::Result<(Tensor, Tensor, Tensor), tch::TchError> {
    let (u, s, v) = x.f_svd(true, true)?;
    Ok((u, s, v.f_transpose(0, 1)?))
}

/// Halko–Martinsson–Tropp: an orthonormal basis Q of the range of `x` from
/// `x·Ω` (Ω Gaussian, `rank` + 10 columns, two power iterations), then the
/// exact SVD of the small Qᵀ·x.
fn randomized_svd(
    x: &Tensor,
    rank: i64,
    seed: u64,
    name: &str,
) -> std::result::Result<(Tensor, Tensor, Tensor), tch::TchError> {
    let n = x.size()[1];
    let columns = (rank + 10).min(n);
    let omega = seeded_normal(
        &[n, columns],
        amalgam_checkpoint::stream_seed(seed, name, 0),
    )?;
    let orthonormal = |t: Tensor| Tensor::f_linalg_qr(&t, "reduced").map(|(q, _)| q);
    let mut q = orthonormal(x.f_matmul(&omega)?)?;
    for _ in 0..2 {
        let z = orthonormal(x.f_tr()?.f_matmul(&q)?)?;
        q = orthonormal(x.f_matmul(&z)?)?;
    }
    let small = q.f_tr()?.f_matmul(x)?;
    let (u_small, s, vh) = svd(&small)?;
    Ok((q.f_matmul(&u_small)?, s, vh))
}

/// Standard normal entries from a seeded stream (independent of libtorch's global generator).
fn seeded_normal(shape: &[i64], seed: u64) -> std::result::Result<Tensor, tch::TchError> {
    use rand::SeedableRng;
    use rand_distr::{Distribution, StandardNormal};
    let mut rng = rand_xoshiro::Xoshiro256PlusPlus::seed_from_u64(seed);
    let count = shape.iter().product::<i64>() as usize;
    let values: Vec<f32> = (0..count)
        .map(|_| StandardNormal.sample(&mut rng))
        .collect();
    Tensor::from_slice(&values).f_reshape(shape)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options(rank: usize) -> ExtractOptions {
        ExtractOptions {
            rank,
            embed_lora: false,
            sv_epsilon: 0.0,
            modules_to_save: vec![],
            seed: 3,
        }
    }

    /// Large matrices take the randomized path, which recovers a low-rank
    /// change as the exact SVD does, and is seeded.
    #[test]
    fn randomized_svd_recovers_low_rank_changes() {
        let left = seeded_normal(&[1300, 6], 1).unwrap();
        let right = seeded_normal(&[6, 1100], 2).unwrap();
        let noise = seeded_normal(&[1300, 1100], 4).unwrap() * 1e-4;
        let delta = left.matmul(&right) + noise;
        let (a, b, randomized) = factor(&delta, &options(16), "m").unwrap();
        assert!(randomized);
        assert_eq!(a.size(), [16, 1100]);
        let error =
            (&delta - b.matmul(&a)).norm().double_value(&[]) / delta.norm().double_value(&[]);
        assert!(error < 1e-4, "relative error {error}");
        let (again, _, _) = factor(&delta, &options(16), "m").unwrap();
        assert!(a.equal(&again), "same seed, same factors");
        // sv_epsilon drops the noise directions.
        let mut sparse = options(16);
        sparse.sv_epsilon = 1.0;
        assert_eq!(factor(&delta, &sparse, "m").unwrap().0.size()[0], 6);
    }
}
