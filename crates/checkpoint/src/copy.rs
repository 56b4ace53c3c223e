//! A checkpoint rewritten tensor by tensor (one in memory at a time): its
//! tensors as stored or cast to another float dtype, re-sharded, with its
//! own config and tokenizer files — `amalgam convert`, and a stitched
//! family's untouched anchors.

use std::path::{Path, PathBuf};

use crate::{
    count_nonfinite, kind_from_dtype, Checkpoint, CheckpointWriter, Dtype, Finish, ModelCard,
    Result, TensorSpec, WriteOptions,
};

/// Writes `input` to `out`, float tensors cast to `dtype` when given (else
/// bit-identical); `progress` gets the input bytes of each tensor done.
pub fn copy_checkpoint(
    input: &Checkpoint,
    out: &Path,
    dtype: Option<Dtype>,
    options: &WriteOptions,
    card: &ModelCard,
    progress: &dyn Fn(u64),
) -> Result<PathBuf> {
    let out_dtype = |stored: Dtype| match dtype {
        Some(t) if is_float(stored) => t,
        _ => stored,
    };
    let specs: Vec<TensorSpec> = input
        .tensors()
        .iter()
        .map(|t| TensorSpec::new(&t.name, out_dtype(t.dtype), t.shape.clone()))
        .collect();
    let writer = CheckpointWriter::create(out, specs, options)?;
    for entry in input.tensors() {
        let dtype = out_dtype(entry.dtype);
        let raw = input.read_bytes(entry)?;
        let nonfinite = if dtype == entry.dtype {
            writer.write_bytes(&entry.name, &raw)?
        } else {
            let kind = |d| kind_from_dtype(d).expect("float dtypes map to kinds");
            let shape: Vec<i64> = entry.shape.iter().map(|&d| d as i64).collect();
            let tensor = tch::Tensor::f_from_data_size(&raw, &shape, kind(entry.dtype))
                .map_err(|e| crate::Error::Write {
                    path: out.into(),
                    message: format!("tensor {}: {e}", entry.name),
                })?
                .to_kind(kind(dtype));
            writer.write_tensor(&entry.name, &tensor)?
        };
        // NaN/inf the input had are carried over; ones a cast made are not.
        if nonfinite > 0 && count_nonfinite(entry.dtype, &raw) > 0 {
            writer.accept_nonfinite(&entry.name)?;
        }
        progress(entry.byte_range.end - entry.byte_range.start);
    }
    writer.finish(Finish {
        config: input.config(),
        tokenizer_source: Some(input.dir()),
        chat_template: None,
        extra_files: &[],
        card,
    })
}

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64)
}
