//! `chat_template:` — Jinja text, one of the named templates below, or
//! `auto` (the template most of the input models carry).

/// A recipe's `chat_template`.
#[derive(Debug, Clone, PartialEq)]
pub enum ChatTemplate {
    /// Jinja text, as written or from a named template.
    Text(String),
    /// The template most input models carry (first among equals in recipe order).
    Auto,
}

/// The named templates (mergekit's set). chatml and mistral render as
/// mergekit's do; llama3 as Meta's published Llama 3 template does (no
/// newline between turns); alpaca and exaone without the stray blank lines
/// and indentation of mergekit's.
pub const NAMED: &[(&str, &str)] = &[
    ("alpaca", include_str!("../chat_templates/alpaca.jinja")),
    ("chatml", include_str!("../chat_templates/chatml.jinja")),
    ("exaone", include_str!("../chat_templates/exaone.jinja")),
    ("llama3", include_str!("../chat_templates/llama3.jinja")),
    ("mistral", include_str!("../chat_templates/mistral.jinja")),
];

impl ChatTemplate {
    /// Jinja text (it holds `{{` or `{%`), `auto`, or a name from [`NAMED`].
    pub fn parse(value: &str) -> Result<Self, String> {
        if value.contains("{{") || value.contains("{%") {
            return Ok(Self::Text(value.to_owned()));
        }
        if value == "auto" {
            return Ok(Self::Auto);
        }
        match NAMED.iter().find(|(name, _)| *name == value) {
            Some((_, text)) => Ok(Self::Text((*text).to_owned())),
            None => Err(format!(
                "unknown chat template `{value}`: give Jinja text, `auto`, or one of {}",
                NAMED.iter().map(|(n, _)| *n).collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_text_and_auto() {
        assert_eq!(ChatTemplate::parse("auto"), Ok(ChatTemplate::Auto));
        let chatml = ChatTemplate::parse("chatml").unwrap();
        assert!(matches!(&chatml, ChatTemplate::Text(t) if t.contains("<|im_start|>")));
        let own = "{{ messages[0].content }}";
        assert_eq!(ChatTemplate::parse(own), Ok(ChatTemplate::Text(own.into())));
        let err = ChatTemplate::parse("vicuna").unwrap_err();
        assert!(
            err.contains("alpaca, chatml, exaone, llama3, mistral"),
            "{err}"
        );
    }
}
