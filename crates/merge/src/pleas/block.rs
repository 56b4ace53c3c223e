//! One block's weights in logical parts, whatever the family stores: fused
//! projections split (`[q; k; v]`, per-head interleaved, `[gate; up]`, as
//! the description's `RowSplit` reads them) and rejoined on the way out;
//! norms with the family's arithmetic. PLeaS fits and averages parts.

use std::collections::BTreeMap;

use amalgam_checkpoint::decoder::{NormKind, RowSplit};
pub use amalgam_nn::linear::LinearWeights;
use amalgam_nn::DecoderConfig;
use tch::{Kind, Tensor};

use crate::{MergeError, Result};

/// One block of one model, in parts.
pub(super) struct Block {
    /// q, k and v, each `[heads × head_dim, hidden]`.
    pub qkv: [LinearWeights; 3],
    pub output: LinearWeights,
    /// gate and up, or up alone (an ungated MLP).
    pub mlp_input: Vec<LinearWeights>,
    pub mlp_output: LinearWeights,
    /// Attention input, attention output, MLP input, MLP output norms.
    pub norms: [Option<LinearWeights>; 4],
    /// q and k norms: per head `[head_dim]`, or across heads.
    pub qk_norm: Option<[Tensor; 2]>,
}

pub(super) fn get<'t>(tensors: &'t BTreeMap<String, Tensor>, name: &str) -> Result<&'t Tensor> {
    tensors.get(name).ok_or_else(|| MergeError::Tensor {
        tensor: name.into(),
        message: "missing from the model".into(),
    })
}

fn linear(tensors: &BTreeMap<String, Tensor>, stem: &str) -> Result<LinearWeights> {
    Ok(LinearWeights {
        weight: get(tensors, &format!("{stem}.weight"))?.shallow_clone(),
        bias: tensors
            .get(&format!("{stem}.bias"))
            .map(Tensor::shallow_clone),
    })
}

impl Block {
    /// Block `layer` of a model of `config` from its tensors.
    pub fn read(
        config: &DecoderConfig,
        layer: usize,
        tensors: &BTreeMap<String, Tensor>,
    ) -> Result<Self> {
        let names = config.block_names(layer);
        let layout = config.architecture.layout;
        let (heads, kv, hd) = config.attention_sizes();
        let qkv: [LinearWeights; 3] = match layout.attention.qkv.row_split(heads, kv, hd) {
            RowSplit::Separate => names
                .qkv
                .iter()
                .map(|stem| linear(tensors, stem))
                .collect::<Result<Vec<_>>>()?,
            fused => linear(tensors, &names.qkv[0])?.split(&fused),
        }
        .try_into()
        .unwrap_or_else(|_| unreachable!("three parts"));
        let mlp_output = linear(tensors, &names.mlp_output)?;
        let width = mlp_output.weight.size()[1];
        let mlp_input = match layout.mlp.input.row_split(width) {
            RowSplit::Separate => names
                .mlp_input
                .iter()
                .map(|stem| linear(tensors, stem))
                .collect::<Result<_>>()?,
            fused => linear(tensors, &names.mlp_input[0])?.split(&fused),
        };
        let mut norms = [None, None, None, None];
        for (slot, stem) in names.norms.iter().enumerate() {
            if let Some(stem) = stem {
                norms[slot] = Some(linear(tensors, stem)?);
            }
        }
        let qk_norm = match &names.qk_norm {
            Some([q, k]) => Some([
                get(tensors, &format!("{q}.weight"))?.shallow_clone(),
                get(tensors, &format!("{k}.weight"))?.shallow_clone(),
            ]),
            None => None,
        };
        Ok(Block {
            qkv,
            output: linear(tensors, &names.output)?,
            mlp_input,
            mlp_output,
            norms,
            qk_norm,
        })
    }

    /// The stored tensors of block `layer` of a model of `config` (the
    /// merged model's) from these parts: fused layouts rejoined.
    pub fn write(self, config: &DecoderConfig, layer: usize) -> Vec<(String, Tensor)> {
        let names = config.block_names(layer);
        let layout = config.architecture.layout;
        let mut out = vec![];
        let mut push = |stem: &str, l: LinearWeights| {
            out.push((format!("{stem}.weight"), l.weight));
            if let Some(bias) = l.bias {
                out.push((format!("{stem}.bias"), bias));
            }
        };
        let (heads, kv, hd) = config.attention_sizes();
        let parts = |stems: &[String], parts: Vec<LinearWeights>, rows: RowSplit| match rows {
            RowSplit::Separate => stems.iter().cloned().zip(parts).collect::<Vec<_>>(),
            fused => {
                let parts: Vec<&LinearWeights> = parts.iter().collect();
                vec![(stems[0].clone(), LinearWeights::join(&parts, &fused))]
            }
        };
        let qkv = layout.attention.qkv.row_split(heads, kv, hd);
        for (stem, part) in parts(&names.qkv, self.qkv.into(), qkv) {
            push(&stem, part);
        }
        push(&names.output, self.output);
        let width = self.mlp_output.weight.size()[1];
        let mlp_input = layout.mlp.input.row_split(width);
        for (stem, part) in parts(&names.mlp_input, self.mlp_input, mlp_input) {
            push(&stem, part);
        }
        push(&names.mlp_output, self.mlp_output);
        for (stem, norm) in names.norms.iter().zip(self.norms) {
            if let (Some(stem), Some(norm)) = (stem, norm) {
                push(stem, norm);
            }
        }
        if let (Some([q, k]), Some([qn, kn])) = (&names.qk_norm, self.qk_norm) {
            out.push((format!("{q}.weight"), qn));
            out.push((format!("{k}.weight"), kn));
        }
        out
    }
}

/// A family's norm arithmetic, for folding norms into the layers that read
/// them and for writing merged norms.
#[derive(Debug, Clone, Copy)]
pub(super) struct NormMath {
    pub kind: NormKind,
    pub eps: f64,
}

impl NormMath {
    pub fn of(config: &DecoderConfig) -> Self {
        NormMath {
            kind: config.architecture.layout.norm,
            eps: config.norm_eps,
        }
    }

    /// The norm without its scale and shift: x / rms(x), or (x − mean) / std.
    pub fn normalise(&self, x: &Tensor) -> Tensor {
        match self.kind {
            NormKind::Layer => {
                let centred = x - x.mean_dim(-1, true, Kind::Float);
                let variance = centred.square().mean_dim(-1, true, Kind::Float);
                centred * (variance + self.eps).rsqrt()
            }
            _ => x * (x.square().mean_dim(-1, true, Kind::Float) + self.eps).rsqrt(),
        }
    }

    /// The scale a stored norm weight multiplies by (`1 + w` for Gemma's).
    pub fn scale(&self, weight: &Tensor) -> Tensor {
        match self.kind {
            NormKind::RmsUnitOffset => weight + 1.0,
            _ => weight.shallow_clone(),
        }
    }

    /// The stored weight of a norm that multiplies by `scale`.
    pub fn stored(&self, scale: Tensor) -> Tensor {
        match self.kind {
            NormKind::RmsUnitOffset => scale - 1.0,
            _ => scale,
        }
    }

    /// A norm of `width` channels that only normalises (scale 1, shift 0).
    pub fn identity(&self, width: usize) -> LinearWeights {
        let ones = Tensor::ones([width as i64], (Kind::Float, tch::Device::Cpu));
        LinearWeights {
            weight: self.stored(ones),
            bias: (self.kind == NormKind::Layer)
                .then(|| Tensor::zeros([width as i64], (Kind::Float, tch::Device::Cpu))),
        }
    }

    /// What a layer reading this norm's output computes from the normalised
    /// input: `W·diag(scale)` and `b + W·shift`.
    pub fn fold(&self, reader: &LinearWeights, norm: &LinearWeights) -> LinearWeights {
        let weight = &reader.weight * self.scale(&norm.weight).unsqueeze(0);
        let bias = match (&reader.bias, &norm.bias) {
            (Some(b), Some(shift)) => Some(b + reader.weight.mv(shift)),
            (None, Some(shift)) => Some(reader.weight.mv(shift)),
            (b, None) => b.as_ref().map(Tensor::shallow_clone),
        };
        LinearWeights { weight, bias }
    }
}
