//! The corpus' domains as `eval` and `tune` score them: names parsed, the
//! split checked, held-out text cut into windows.

use amalgam_nn::data::{Domain, Split};
use amalgam_nn::eval::{corpus_windows, EvalOptions, Window};
use anyhow::{anyhow, Result};

/// Domains by name, each with the `split` asked for; an unknown one is an
/// error listing the known ones.
pub fn domains(names: &[String], split: Split) -> Result<Vec<Domain>> {
    let domains = names
        .iter()
        .map(|name| {
            Domain::parse(name)
                .ok_or_else(|| anyhow!("unknown domain {name:?} (known: {})", Domain::names()))
        })
        .collect::<Result<Vec<_>>>()?;
    for domain in &domains {
        domain.check_split(split)?;
    }
    Ok(domains)
}

/// Each domain's `split` cut into windows. A `--seq-len` longer than a
/// domain's text is refused: no window would be scored (a loss of 0 over
/// nothing).
pub fn windows(
    domains: &[Domain],
    split: Split,
    options: &EvalOptions,
) -> Result<Vec<Vec<Window>>> {
    domains
        .iter()
        .map(|domain| {
            let windows = corpus_windows(&domain.tokens(split), options);
            if windows.is_empty() {
                return Err(anyhow!(
                    "--seq-len {} is longer than the {} held-out text",
                    options.seq_len,
                    domain.name()
                ));
            }
            Ok(windows)
        })
        .collect()
}
