//! `amalgam moe` configs (mergekit-moe's schema): a base model and dense
//! experts assembled into a Mixtral-style mixture, with router ("gate")
//! weights from prompts or random.

use crate::schema::model_ref;
use crate::yaml::{load, location, Node, Reader};
use crate::{FloatDtype, Location, ModelRef, RecipeError, Scalar};

/// How router weights are made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GateMode {
    /// The base model's hidden state at the last token of each prompt, per layer.
    Hidden,
    /// The mean token embedding of the prompts, the same for every layer.
    CheapEmbed,
    /// Standard normal entries.
    Random,
    /// Uniform in ±1/√hidden (a fresh `nn.Linear`'s range).
    UniformRandom,
}

impl GateMode {
    pub const NAMES: &'static [&'static str] =
        &["hidden", "cheap_embed", "random", "uniform_random"];

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "hidden" => Self::Hidden,
            "cheap_embed" => Self::CheapEmbed,
            "random" => Self::Random,
            "uniform_random" => Self::UniformRandom,
            _ => return None,
        })
    }

    pub fn needs_prompts(self) -> bool {
        matches!(self, Self::Hidden | Self::CheapEmbed)
    }
}

/// The longest prompt accepted, in bytes of text. Prompts route by a few
/// words to a paragraph (mergekit-moe's examples are one line); a bound keeps
/// tokenizing them cheap whatever the config holds.
pub const MAX_PROMPT_BYTES: usize = 64 << 10;

/// The most prompts in one expert's `positive_prompts` (or
/// `negative_prompts`): each costs one forward pass of the base with
/// `gate_mode: hidden`, so the count bounds the work with the length.
pub const MAX_PROMPTS: usize = 256;

#[derive(Debug, Clone, PartialEq)]
pub struct Expert {
    pub model: ModelRef,
    pub positive_prompts: Vec<String>,
    pub negative_prompts: Vec<String>,
    /// Where each of `positive_prompts` is written.
    pub positive_at: Vec<Location>,
    /// Where each of `negative_prompts` is written.
    pub negative_at: Vec<Location>,
    /// Standard deviation of noise added to the expert's weights.
    pub noise_scale: Option<f64>,
    /// Factor on the expert's down projection (its residual write).
    pub residual_scale: Option<f64>,
    pub at: Location,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MoeRecipe {
    pub source_name: String,
    pub text: String,
    pub base_model: ModelRef,
    pub experts: Vec<Expert>,
    pub gate_mode: GateMode,
    /// Output dtype, by its PyTorch name whatever the spelling in the
    /// config ([`FloatDtype::name`]; default: the base's).
    pub dtype: Option<String>,
    pub experts_per_token: usize,
    /// Experts every token goes through (a Qwen2-MoE output has one).
    pub shared_experts: Vec<Expert>,
    /// A prefix of one of [`OUTPUTS`], lowercase; `None`: Mixtral unless
    /// there is a shared expert.
    pub architecture: Option<(String, Location)>,
    pub at: Location,
    /// Where the experts are listed.
    pub experts_at: Location,
}

/// The outputs `amalgam moe` writes, by mergekit's names (lowercase).
pub const OUTPUTS: &[&str] = &["mixtral", "qwen moe"];

const KEYS: &[&str] = &[
    "base_model",
    "experts",
    "gate_mode",
    "dtype",
    "experts_per_token",
    "shared_experts",
    "architecture",
];

impl MoeRecipe {
    /// Whether every expert is the same model: a mixture that costs more and
    /// computes the same (useful only as a start for training, as mergekit
    /// says; callers refuse it unless asked).
    pub fn identical_experts(&self) -> bool {
        self.experts.len() > 1
            && self
                .experts
                .iter()
                .all(|e| e.model.path == self.experts[0].model.path)
    }

    /// Parses and checks a config (experts that are all one model are
    /// accepted here: see [`MoeRecipe::identical_experts`]).
    pub fn parse(text: &str, source_name: &str) -> Result<Self, RecipeError> {
        let reader = Reader { source_name };
        let root = load(text, source_name)?;
        let at = location(&root);
        let mut base_model = None;
        let mut experts = vec![];
        let mut experts_at = at;
        let mut gate_mode = GateMode::Hidden;
        let mut dtype = None;
        let mut experts_per_token = 2;
        let mut shared_experts = vec![];
        let mut shared_at = at;
        let mut architecture = None;
        for (key, node, key_at) in reader.mapping(&root, "an moe config", KEYS)? {
            match key.as_str() {
                "base_model" => base_model = Some(model_ref(&reader, node)?),
                "experts" => {
                    experts_at = key_at;
                    for item in reader.sequence(node, "experts")? {
                        experts.push(expert(&reader, item)?);
                    }
                }
                "gate_mode" => {
                    let name = reader.string(node, "gate_mode")?;
                    gate_mode = GateMode::parse(&name).ok_or_else(|| {
                        reader.error(
                            location(node),
                            format!(
                                "unknown gate_mode `{name}` (known: {})",
                                GateMode::NAMES.join(", ")
                            ),
                        )
                    })?;
                }
                "dtype" => {
                    let name = reader.string(node, "dtype")?;
                    let parsed: FloatDtype =
                        name.parse().map_err(|e| reader.error(location(node), e))?;
                    dtype = Some(parsed.name().to_owned());
                }
                "experts_per_token" => {
                    experts_per_token = reader.usize(node, "experts_per_token")?;
                    if experts_per_token == 0 {
                        return Err(
                            reader.error(location(node), "experts_per_token must be at least 1")
                        );
                    }
                }
                "shared_experts" if Reader::is_null(node) => {}
                "shared_experts" => {
                    shared_at = key_at;
                    for item in reader.sequence(node, "shared_experts")? {
                        shared_experts.push(expert(&reader, item)?);
                    }
                }
                "architecture" => {
                    let name = reader.string(node, "architecture")?.to_lowercase();
                    // mergekit's rule: an output whose name starts with the text given.
                    if name.is_empty() || !OUTPUTS.iter().any(|o| o.starts_with(name.as_str())) {
                        return Err(reader.error(location(node), format!("output architecture `{name}` is not supported (`amalgam moe` writes {})", OUTPUTS.join(" or "))));
                    }
                    architecture = Some((name, location(node)));
                }
                _ => unreachable!("mapping() admits only KEYS"),
            }
        }
        let base_model = base_model.ok_or_else(|| reader.error(at, "missing `base_model`"))?;
        if experts.len() < experts_per_token {
            return Err(reader.error(
                experts_at,
                format!(
                    "{} experts for experts_per_token {experts_per_token}: give at least as many experts",
                    experts.len()
                ),
            ));
        }
        if shared_experts.len() > 1 {
            return Err(reader.error(shared_at, "one shared expert at most (Qwen2-MoE has one)"));
        }
        if gate_mode.needs_prompts() {
            if let Some(e) = experts
                .iter()
                .chain(&shared_experts)
                .find(|e| e.positive_prompts.is_empty())
            {
                return Err(reader.error(e.at, "this expert has no positive_prompts, which the gate mode needs (or use gate_mode: random)"));
            }
            let prompts = |e: &Expert| (e.positive_prompts.clone(), e.negative_prompts.clone());
            if experts.len() > 1 && experts.iter().all(|e| prompts(e) == prompts(&experts[0])) {
                return Err(reader.error(
                    experts_at,
                    "every expert has the same prompts: the router could not tell them apart",
                ));
            }
        }
        Ok(Self {
            source_name: source_name.into(),
            text: text.into(),
            base_model,
            experts,
            gate_mode,
            dtype,
            experts_per_token,
            shared_experts,
            architecture,
            at,
            experts_at,
        })
    }

    pub fn error(&self, at: Location, message: impl Into<String>) -> RecipeError {
        RecipeError {
            source_name: self.source_name.clone(),
            at,
            message: message.into(),
        }
    }
}

fn expert(reader: &Reader<'_>, node: &Node<'_>) -> Result<Expert, RecipeError> {
    let keys = [
        "source_model",
        "positive_prompts",
        "negative_prompts",
        "noise_scale",
        "residual_scale",
    ];
    let mut model = None;
    let mut expert = Expert {
        model: ModelRef {
            path: String::new(),
            at: location(node),
        },
        positive_prompts: vec![],
        negative_prompts: vec![],
        positive_at: vec![],
        negative_at: vec![],
        noise_scale: None,
        residual_scale: None,
        at: location(node),
    };
    for (key, value, _) in reader.mapping(node, "an expert", &keys)? {
        match key.as_str() {
            "source_model" => model = Some(model_ref(reader, value)?),
            "positive_prompts" | "negative_prompts" => {
                let items = reader.sequence(value, &key)?;
                if items.len() > MAX_PROMPTS {
                    return Err(reader.error(
                        location(value),
                        format!(
                            "{} {key}: amalgam takes at most {MAX_PROMPTS} prompts per expert \
                             (each runs the base once; the gate is their mean)",
                            items.len()
                        ),
                    ));
                }
                let mut prompts = vec![];
                let mut places = vec![];
                for item in items {
                    let prompt = reader.string(item, "a prompt")?;
                    if prompt.len() > MAX_PROMPT_BYTES {
                        return Err(reader.error(
                            location(item),
                            format!(
                                "this prompt is {} bytes; amalgam takes prompts of at most \
                                 {MAX_PROMPT_BYTES} bytes (a prompt routes by its topic: a \
                                 line to a paragraph is enough)",
                                prompt.len()
                            ),
                        ));
                    }
                    prompts.push(prompt);
                    places.push(location(item));
                }
                if key == "positive_prompts" {
                    expert.positive_prompts = prompts;
                    expert.positive_at = places;
                } else {
                    expert.negative_prompts = prompts;
                    expert.negative_at = places;
                }
            }
            "noise_scale" | "residual_scale" => {
                let number = match reader.scalar(value) {
                    Some(Scalar::Number(x)) if x.is_finite() => x,
                    _ => {
                        return Err(
                            reader.error(location(value), format!("{key} must be a finite number"))
                        )
                    }
                };
                if key == "noise_scale" {
                    expert.noise_scale = Some(number);
                } else {
                    expert.residual_scale = Some(number);
                }
            }
            _ => unreachable!("mapping() admits only the listed keys"),
        }
    }
    expert.model =
        model.ok_or_else(|| reader.error(expert.at, "an expert needs `source_model`"))?;
    Ok(expert)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TWO: &str =
        "base_model: b\nexperts:\n  - source_model: x\n    positive_prompts: [code]\n  \
                       - source_model: y\n    positive_prompts: [prose]\n";

    fn err(text: &str) -> String {
        MoeRecipe::parse(text, "m.yml").unwrap_err().to_string()
    }

    #[test]
    fn mergekit_configs_parse() {
        let recipe = MoeRecipe::parse(
            &format!("{TWO}gate_mode: cheap_embed\ndtype: bfloat16\n"),
            "m.yml",
        )
        .unwrap();
        assert_eq!(recipe.experts.len(), 2);
        assert_eq!(recipe.gate_mode, GateMode::CheapEmbed);
        assert_eq!(recipe.experts_per_token, 2);
        assert_eq!(recipe.experts[1].positive_prompts, ["prose"]);
        assert_eq!(recipe.dtype.as_deref(), Some("bfloat16"));
    }

    #[test]
    fn dtype_aliases_are_stored_by_their_pytorch_name() {
        for (written, name) in [
            ("bf16", "bfloat16"),
            ("fp16", "float16"),
            ("F32", "float32"),
        ] {
            let recipe = MoeRecipe::parse(&format!("{TWO}dtype: {written}\n"), "m.yml").unwrap();
            assert_eq!(recipe.dtype.as_deref(), Some(name), "{written}");
        }
        let error = err(&format!("{TWO}dtype: int8\n"));
        assert!(
            error.starts_with("m.yml:7:8: unknown dtype `int8`"),
            "{error}"
        );
    }

    #[test]
    fn configs_that_cannot_work_name_their_line() {
        assert!(err(&format!("{TWO}experts_per_token: 3\n")).starts_with("m.yml:2:1:"));
        assert!(err(&format!("{TWO}gate_mode: smart\n")).contains("unknown gate_mode `smart`"));
        let two_shared = format!("{TWO}shared_experts:\n  - source_model: s\n    positive_prompts: [a]\n  - source_model: t\n    positive_prompts: [b]\n");
        assert!(
            err(&two_shared).contains("one shared expert at most"),
            "{}",
            err(&two_shared)
        );
        assert!(err(&format!("{TWO}architecture: deepseek\n")).contains("mixtral or qwen moe"));
        let no_prompts = "base_model: b\nexperts:\n  - source_model: x\n  - source_model: y\n";
        assert!(
            err(no_prompts).starts_with("m.yml:3:5:"),
            "{}",
            err(no_prompts)
        );
        assert!(MoeRecipe::parse(&format!("{no_prompts}gate_mode: random\n"), "m.yml").is_ok());
        let same = TWO.replace("source_model: y", "source_model: x");
        assert!(MoeRecipe::parse(&same, "m.yml")
            .unwrap()
            .identical_experts());
        assert!(!MoeRecipe::parse(TWO, "m.yml").unwrap().identical_experts());
    }

    /// A prompt of megabytes (3 MB took minutes and gigabytes through the
    /// base) and a list of thousands are refused at their line, with the limit.
    #[test]
    fn prompts_are_bounded_in_length_and_count() {
        let long = "x".repeat(MAX_PROMPT_BYTES + 1);
        let text = TWO.replace("[prose]", &format!("[prose, {long}]"));
        let message = err(&text);
        assert!(
            message.starts_with("m.yml:6:31:")
                && message.contains(&format!("{} bytes", MAX_PROMPT_BYTES + 1))
                && message.contains(&format!("at most {MAX_PROMPT_BYTES} bytes")),
            "{}",
            &message[..200.min(message.len())]
        );
        let at_limit = TWO.replace("[prose]", &format!("[{}]", "x".repeat(MAX_PROMPT_BYTES)));
        let recipe = MoeRecipe::parse(&at_limit, "m.yml").unwrap();
        assert_eq!(
            recipe.experts[1].positive_prompts[0].len(),
            MAX_PROMPT_BYTES
        );
        let many = vec!["p"; MAX_PROMPTS + 1].join(", ");
        let text = TWO.replace("[code]", &format!("[{many}]"));
        let message = err(&text);
        assert!(
            message.starts_with("m.yml:4:23:")
                && message.contains(&format!("at most {MAX_PROMPTS} prompts")),
            "{message}"
        );
        let enough = vec!["p"; MAX_PROMPTS].join(", ");
        let recipe =
            MoeRecipe::parse(&TWO.replace("[code]", &format!("[{enough}]")), "m.yml").unwrap();
        assert_eq!(recipe.experts[0].positive_prompts.len(), MAX_PROMPTS);
        assert_eq!(recipe.experts[0].positive_at.len(), MAX_PROMPTS);
        assert_eq!(recipe.experts[1].positive_at[0].line, 6);
    }
}
