//! The output's tokenizer: `tokenizer_source: base | union | PATH`, or the
//! `tokenizer:` block (`source`, per-token embedding rules `tokens`, and
//! `pad_to_multiple_of`), with mergekit's meaning.

use crate::schema::model_ref;
use crate::yaml::{location, Node, Reader};
use crate::{Location, ModelRef, RecipeError, Scalar};

/// Whose vocabulary the output has.
#[derive(Debug, Clone, PartialEq)]
pub enum TokenizerSource {
    /// The base model's (or the first model's, without a base).
    Base,
    /// The base's, with every token of the other models' added after it.
    Union,
    /// This model's.
    Model(ModelRef),
}

/// Where a token's embedding row comes from when a model lacks the token
/// (or always, with `force`).
#[derive(Debug, Clone, PartialEq)]
pub enum TokenSource {
    Zero,
    /// That model's row of the same token.
    Model(ModelRef),
    /// That model's row of another token (by text or id).
    ModelToken {
        model: ModelRef,
        token: TokenRef,
    },
}

#[derive(Debug, Clone, PartialEq)]
pub enum TokenRef {
    Text(String),
    Id(u32),
}

/// One entry of `tokens:`.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenRule {
    pub token: String,
    pub source: Option<TokenSource>,
    /// Use the source's row even for models that have the token.
    pub force: bool,
    pub at: Location,
}

/// A recipe's tokenizer settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenizerSpec {
    pub source: TokenizerSource,
    pub tokens: Vec<TokenRule>,
    /// Embedding rows rounded up to a multiple of this (new rows: the mean row).
    pub pad_to_multiple_of: Option<usize>,
    pub at: Location,
}

impl TokenizerSpec {
    /// The models the settings name (token sources), for checks.
    pub fn named_models(&self) -> Vec<&ModelRef> {
        let mut models: Vec<&ModelRef> = vec![];
        if let TokenizerSource::Model(m) = &self.source {
            models.push(m);
        }
        for rule in &self.tokens {
            match &rule.source {
                Some(TokenSource::Model(m)) | Some(TokenSource::ModelToken { model: m, .. }) => {
                    models.push(m)
                }
                _ => {}
            }
        }
        models
    }
}

/// `tokenizer_source: VALUE`.
pub(crate) fn source(reader: &Reader<'_>, node: &Node<'_>) -> Result<TokenizerSource, RecipeError> {
    Ok(match reader.string(node, "tokenizer_source")?.as_str() {
        "base" => TokenizerSource::Base,
        "union" => TokenizerSource::Union,
        _ => TokenizerSource::Model(model_ref(reader, node)?),
    })
}

/// The `tokenizer:` block.
pub(crate) fn spec(reader: &Reader<'_>, node: &Node<'_>) -> Result<TokenizerSpec, RecipeError> {
    let mut spec = TokenizerSpec {
        // mergekit's default for the block.
        source: TokenizerSource::Union,
        tokens: vec![],
        pad_to_multiple_of: None,
        at: location(node),
    };
    for (key, value, at) in reader.mapping(
        node,
        "tokenizer",
        &["source", "tokens", "pad_to_multiple_of"],
    )? {
        match key.as_str() {
            "source" => spec.source = source(reader, value)?,
            "pad_to_multiple_of" => {
                let n = reader.usize(value, "pad_to_multiple_of")?;
                if n == 0 {
                    return Err(reader.error(at, "pad_to_multiple_of must be at least 1"));
                }
                spec.pad_to_multiple_of = Some(n);
            }
            "tokens" => {
                for (token, rule, at) in reader.mapping(value, "tokens", &[])? {
                    spec.tokens.push(token_rule(reader, token, rule, at)?);
                }
            }
            _ => unreachable!("mapping() admits only the listed keys"),
        }
    }
    Ok(spec)
}

fn token_rule(
    reader: &Reader<'_>,
    token: String,
    node: &Node<'_>,
    at: Location,
) -> Result<TokenRule, RecipeError> {
    let mut rule = TokenRule {
        token,
        source: None,
        force: false,
        at,
    };
    for (key, value, at) in reader.mapping(node, "a token's settings", &["source", "force"])? {
        match key.as_str() {
            "force" => match reader.scalar(value) {
                Some(Scalar::Bool(b)) => rule.force = b,
                _ => return Err(reader.error(at, "force must be true or false")),
            },
            "source" => rule.source = Some(token_source(reader, value)?),
            _ => unreachable!("mapping() admits only the listed keys"),
        }
    }
    if rule.force && rule.source.is_none() {
        return Err(reader.error(
            at,
            format!("token `{}`: `force` needs a `source`", rule.token),
        ));
    }
    Ok(rule)
}

fn token_source(reader: &Reader<'_>, node: &Node<'_>) -> Result<TokenSource, RecipeError> {
    if reader.scalar(node).is_some() {
        return Ok(TokenSource::Model(model_ref(reader, node)?));
    }
    let entries = reader.mapping(
        node,
        "a token source",
        &["kind", "model", "token", "token_id"],
    )?;
    let get = |name: &str| entries.iter().find(|(k, _, _)| k == name);
    let kind = match get("kind") {
        Some((_, value, _)) => reader.string(value, "kind")?,
        None => {
            return Err(reader.error(
                location(node),
                "a token source needs `kind: zero` or `kind: model_token`",
            ))
        }
    };
    match kind.as_str() {
        "zero" => Ok(TokenSource::Zero),
        "model_token" => {
            let model = match get("model") {
                Some((_, value, _)) => model_ref(reader, value)?,
                None => {
                    return Err(reader.error(location(node), "`kind: model_token` needs `model`"))
                }
            };
            let token = match (get("token"), get("token_id")) {
                (Some((_, value, _)), None) => TokenRef::Text(reader.string(value, "token")?),
                (None, Some((_, value, _))) => {
                    let id = reader.usize(value, "token_id")?;
                    TokenRef::Id(
                        u32::try_from(id)
                            .map_err(|_| reader.error(location(value), "token_id is too large"))?,
                    )
                }
                _ => {
                    return Err(reader.error(
                        location(node),
                        "`kind: model_token` needs one of `token` or `token_id`",
                    ))
                }
            };
            Ok(TokenSource::ModelToken { model, token })
        }
        other => Err(reader.error(
            location(node),
            format!("unknown token source kind `{other}` (known: zero, model_token)"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use crate::{Recipe, TokenRef, TokenSource, TokenizerSource};

    const MODELS: &str = "merge_method: linear\nmodels:\n  - model: a\n  - model: b\n";

    fn parse(tail: &str) -> Result<Recipe, String> {
        Recipe::parse(&format!("{MODELS}{tail}"), "r.yml").map_err(|e| e.to_string())
    }

    #[test]
    fn the_block_and_its_rules() {
        let recipe = parse(
            "tokenizer:\n  pad_to_multiple_of: 8\n  tokens:\n    x: {source: a, force: true}\n    \
             y: {source: {kind: zero}}\n    z: {source: {kind: model_token, model: b, token_id: 3}}\n",
        )
        .unwrap();
        let spec = recipe.tokenizer.unwrap();
        assert_eq!(spec.source, TokenizerSource::Union, "mergekit's default");
        assert_eq!(spec.pad_to_multiple_of, Some(8));
        assert!(spec.tokens[0].force);
        assert_eq!(spec.tokens[1].source, Some(TokenSource::Zero));
        assert!(matches!(
            &spec.tokens[2].source,
            Some(TokenSource::ModelToken { model, token: TokenRef::Id(3) }) if model.path == "b"
        ));
        assert_eq!(
            parse("tokenizer_source: union\n")
                .unwrap()
                .tokenizer
                .unwrap()
                .source,
            TokenizerSource::Union
        );
    }

    #[test]
    fn bad_settings_name_their_line() {
        let both = parse("tokenizer_source: base\ntokenizer: {source: base}\n").unwrap_err();
        assert!(
            both.starts_with("r.yml:6:1:") && both.contains("not both"),
            "{both}"
        );
        let force = parse("tokenizer:\n  tokens:\n    x: {force: true}\n").unwrap_err();
        assert!(
            force.starts_with("r.yml:7:5:") && force.contains("needs a `source`"),
            "{force}"
        );
        let kind = parse("tokenizer:\n  tokens:\n    x: {source: {kind: mean}}\n").unwrap_err();
        assert!(kind.contains("unknown token source kind `mean`"), "{kind}");
        let pad = parse("tokenizer: {pad_to_multiple_of: 0}\n").unwrap_err();
        assert!(pad.contains("at least 1"), "{pad}");
    }
}
