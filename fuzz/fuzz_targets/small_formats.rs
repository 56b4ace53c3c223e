//! The small formats a user or another process hands amalgam, on hostile
//! bytes; the first byte picks which: a LoRA `adapter_config.json`, a split
//! merge's `part.json` (and part directory names), or a `pareto`/`eval`
//! series. None may panic; what parses must hold the invariants its parser
//! promises.
#![no_main]

use amalgam_merge::lora::AdapterConfig;
use amalgam_merge::split::manifest::{parse_manifest, parse_part_name, MAX_PARTS};
use amalgam_nn::scores::parse_scores;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&which, rest)) = data.split_first() else {
        return;
    };
    match which % 3 {
        0 => {
            let _ = AdapterConfig::parse(rest);
        }
        1 => {
            if let Ok(manifest) = parse_manifest(rest) {
                assert!((1..=manifest.count).contains(&manifest.part));
                assert!(manifest.count <= MAX_PARTS);
            }
            if let Some((part, count)) = parse_part_name(&String::from_utf8_lossy(rest)) {
                assert!((1..=count).contains(&part) && count <= MAX_PARTS);
            }
        }
        _ => {
            if let Ok(models) = parse_scores(rest) {
                assert!(!models.is_empty(), "a series holds a model");
                assert!(models.iter().all(|m| !m.domains.is_empty()));
            }
        }
    }
});
