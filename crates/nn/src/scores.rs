//! The scores `amalgam eval --json` prints, read back (what `amalgam pareto`
//! tabulates and plots), as a hostile file may hand them over: a list of at
//! least one model, each scored on at least one domain, every number finite
//! (JSON has no NaN or infinity; a number too large for an `f64` is refused)
//! and no field given twice. Fields `eval` prints besides these are ignored.

use serde::Deserialize;

use crate::{NnError, Result};

/// One model's entry.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct EvaluatedModel {
    pub model: String,
    pub parameters: u64,
    #[serde(default)]
    pub flops_per_token: Option<u64>,
    /// A sub-series within the file (a stitched family's anchors or routes).
    #[serde(default)]
    pub group: Option<String>,
    pub domains: Vec<DomainLoss>,
}

/// One model's scores on one domain.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct DomainLoss {
    pub domain: String,
    pub loss: f64,
    #[serde(default)]
    pub agreement: Option<f64>,
    #[serde(default)]
    pub kl: Option<f64>,
}

/// The models of one `amalgam eval --json` output. Errors say what is wrong
/// without naming the file (the caller knows it).
pub fn parse_scores(json: &[u8]) -> Result<Vec<EvaluatedModel>> {
    let models: Vec<EvaluatedModel> = serde_json::from_slice(json)
        .map_err(|e| NnError::Invalid(format!("not the JSON `amalgam eval --json` prints: {e}")))?;
    if models.is_empty() {
        return Err(NnError::Invalid(
            "no models (an empty list): nothing to tabulate".into(),
        ));
    }
    if let Some(m) = models.iter().find(|m| m.domains.is_empty()) {
        return Err(NnError::Invalid(format!("{}: no scores", m.model)));
    }
    Ok(models)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_eval_prints_is_read_back() {
        let json = br#"[{"model": "work/a", "parameters": 10, "domains": [
            {"domain": "german", "tokens": 5, "loss": 2.5, "perplexity": 12.2, "accuracy": 0.4}]},
            {"model": "work/b", "parameters": 20, "flops_per_token": 40, "group": "anchors",
             "domains": [{"domain": "german", "loss": 2.0, "agreement": 0.9, "kl": 0.1}]}]"#;
        let models = parse_scores(json).unwrap();
        assert_eq!(models.len(), 2);
        assert_eq!(models[0].domains[0].loss, 2.5);
        assert_eq!(models[1].flops_per_token, Some(40));
        assert_eq!(models[1].domains[0].kl, Some(0.1));
    }

    #[test]
    fn empty_or_broken_input_is_an_error_not_a_panic() {
        for (json, expected) in [
            (&b"[]"[..], "no models"),
            (b"  [ ]\n", "no models"),
            (b"   \n", "not the JSON"),
            (b"", "not the JSON"),
            (b"{}", "not the JSON"),
            (b"[{\"model\": \"m\", \"parameters\": 1, \"domains\": []}]", "m: no scores"),
            (
                b"[{\"model\": \"m\", \"parameters\": 1, \"domains\": [{\"domain\": \"d\", \"loss\": 1e999}]}]",
                "not the JSON",
            ),
            (
                b"[{\"model\": \"m\", \"parameters\": -1, \"domains\": [{\"domain\": \"d\", \"loss\": 1}]}]",
                "not the JSON",
            ),
            (
                b"[{\"model\": \"m\", \"model\": \"n\", \"parameters\": 1, \"domains\": [{\"domain\": \"d\", \"loss\": 1}]}]",
                "duplicate field",
            ),
        ] {
            let error = parse_scores(json).unwrap_err().to_string();
            assert!(
                error.contains(expected),
                "{:?}: {error}",
                String::from_utf8_lossy(json)
            );
        }
    }
}
