//! Split merges (`merge --part I/N`, `--join`) against hostile or mismatched
//! parts: a part's data must be the data its manifest vouches for (a SHA-256
//! of every tensor's bytes, bound to the recipe, seed, tensors and
//! `--allow-nonfinite`); NaN a part vouched for needs `--allow-nonfinite` at
//! the join too; a join that fails leaves no output and the parts as they
//! were; part counts and part directory names are bounded before anything
//! is allocated for them.

use crate::common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use amalgam_merge::executor::{ExecOptions, MergeJob};
use amalgam_merge::split::manifest::{self as parts, PartManifest, MAX_PARTS};
use amalgam_recipe::Recipe;
use common::*;

/// A tiny family (base + 2 fine-tunes) under `dir/m`.
fn family(dir: &Path) -> PathBuf {
    synth(&dir.join("m"), &["--finetunes", "2", "--seed", "0"]);
    dir.join("m")
}

/// DARE-TIES over the family: its output depends on the seed.
fn dare(dir: &Path, m: &Path) -> PathBuf {
    let path = dir.join("dare.yml");
    let text = format!(
        "merge_method: dare_ties\nbase_model: {0}/base\nmodels:\n  - model: {0}/finetune-1\n    \
         parameters: {{weight: 0.5, density: 0.3}}\n  - model: {0}/finetune-2\n    parameters: \
         {{weight: 0.5, density: 0.6}}\n",
        m.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Linear with weights summing to zero under `normalize`: every value 0/0, NaN.
fn nan_recipe(dir: &Path, m: &Path) -> PathBuf {
    let path = dir.join("nan.yml");
    let text = format!(
        "merge_method: linear\nmodels:\n  - model: {0}/base\n    parameters: {{weight: 1.0}}\n  \
         - model: {0}/finetune-1\n    parameters: {{weight: -1.0}}\n",
        m.display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Every file under `dir` (relative path → bytes).
fn files(dir: &Path) -> BTreeMap<PathBuf, Vec<u8>> {
    let mut all = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(at) = stack.pop() {
        for entry in std::fs::read_dir(&at).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                let bytes = std::fs::read(&path).unwrap();
                all.insert(path.strip_prefix(dir).unwrap().to_path_buf(), bytes);
            }
        }
    }
    all
}

/// Nothing at `out` and nothing beside it but the parts (no staging, lock
/// or moved-aside siblings), the parts unchanged.
fn nothing_written(out: &Path, parts_before: &BTreeMap<PathBuf, Vec<u8>>) {
    assert!(!out.exists(), "{} written by a failed join", out.display());
    let parent = out.parent().unwrap();
    let name = out.file_name().unwrap().to_str().unwrap();
    let beside: Vec<String> = listing(parent)
        .into_iter()
        .filter(|n| n.contains(name) && *n != format!("{name}.parts"))
        .collect();
    assert!(beside.is_empty(), "left beside the output: {beside:?}");
    assert!(
        files(&parts::parts_dir(out)) == *parts_before,
        "the parts changed"
    );
}

fn manifest_path(out: &Path, part: usize, count: usize) -> PathBuf {
    parts::part_dir(out, part, count).join(parts::MANIFEST)
}

#[test]
fn a_part_computed_with_another_seed_is_refused_at_the_join() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let recipe = dare(tmp.path(), &m);
    let (out, other) = (tmp.path().join("merged"), tmp.path().join("other"));
    for part in ["1/2", "2/2"] {
        succeeded(&merge_run(
            &recipe,
            &out,
            &["--part", part, "--seed", "7", "-q"],
        ));
    }
    succeeded(&merge_run(
        &recipe,
        &other,
        &["--part", "2/2", "--seed", "6", "-q"],
    ));
    let (ours, theirs) = (
        parts::part_dir(&out, 2, 2).join("model.safetensors"),
        parts::part_dir(&other, 2, 2).join("model.safetensors"),
    );
    let original = std::fs::read(&ours).unwrap();
    assert_ne!(
        original,
        std::fs::read(&theirs).unwrap(),
        "the seed matters"
    );

    // Seed-6 data under the seed-7 manifest.
    std::fs::copy(&theirs, &ours).unwrap();
    let before = files(&parts::parts_dir(&out));
    refused(
        &merge_run(&recipe, &out, &["--join", "--seed", "7"]),
        &["part-2-of-2", "computed by another run"],
    );
    nothing_written(&out, &before);

    // The whole seed-6 part, its manifest relabelled seed 7.
    std::fs::write(&ours, &original).unwrap();
    let ours_manifest = std::fs::read(manifest_path(&out, 2, 2)).unwrap();
    let relabelled = String::from_utf8(std::fs::read(manifest_path(&other, 2, 2)).unwrap())
        .unwrap()
        .replace("\"seed\": 6", "\"seed\": 7");
    std::fs::write(manifest_path(&out, 2, 2), relabelled).unwrap();
    std::fs::copy(&theirs, &ours).unwrap();
    let before = files(&parts::parts_dir(&out));
    refused(
        &merge_run(&recipe, &out, &["--join"]),
        &["part-2-of-2", "part.json", "checksum", "changed after"],
    );
    nothing_written(&out, &before);

    // Put back, the join is the single-process merge byte for byte.
    std::fs::write(&ours, &original).unwrap();
    std::fs::write(manifest_path(&out, 2, 2), ours_manifest).unwrap();
    succeeded(&merge_run(&recipe, &out, &["--join", "-q"]));
    let single = tmp.path().join("single/merged");
    succeeded(&merge_run(&recipe, &single, &["--seed", "7", "-q"]));
    assert!(
        files(&single) == files(&out),
        "the join is the single merge"
    );
    assert!(!parts::parts_dir(&out).exists());
}

#[test]
fn nan_a_part_vouched_for_needs_allow_nonfinite_at_the_join() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let recipe = nan_recipe(tmp.path(), &m);
    let out = tmp.path().join("merged");
    refused(
        &merge_run(&recipe, &out, &["--part", "1/2"]),
        &["NaN or infinite values from finite inputs"],
    );
    for part in ["1/2", "2/2"] {
        succeeded(&merge_run(
            &recipe,
            &out,
            &["--part", part, "--allow-nonfinite", "-q"],
        ));
    }
    let before = files(&parts::parts_dir(&out));
    refused(
        &merge_run(&recipe, &out, &["--join"]),
        &[
            "computed allowing non-finite values",
            "(pass --allow-nonfinite to write them anyway)",
        ],
    );
    nothing_written(&out, &before);

    // Manifests forged to say they were computed without --allow-nonfinite
    // (their checksums made anew): the join counts the NaN as one process does.
    let forge = |part: usize, edit: &dyn Fn(&mut PartManifest)| {
        let path = manifest_path(&out, part, 2);
        let mut manifest = parts::parse_manifest(&std::fs::read(&path).unwrap()).unwrap();
        assert!(!manifest.accepted_nonfinite.is_empty());
        edit(&mut manifest);
        manifest.checksum = parts::hex(&manifest.expected_checksum());
        std::fs::write(&path, manifest.to_json()).unwrap();
    };
    forge(1, &|m| m.allow_nonfinite = false);
    forge(2, &|m| m.allow_nonfinite = false);
    let before = files(&parts::parts_dir(&out));
    refused(
        &merge_run(&recipe, &out, &["--join"]),
        &[
            "NaN or infinite values from finite inputs",
            "--allow-nonfinite",
        ],
    );
    nothing_written(&out, &before);
    // Nor may a manifest leave out the tensors it holds NaN in.
    forge(1, &|m| m.accepted_nonfinite.clear());
    let before = files(&parts::parts_dir(&out));
    refused(
        &merge_run(&recipe, &out, &["--join", "--allow-nonfinite"]),
        &["part-1-of-2", "does not vouch for"],
    );
    nothing_written(&out, &before);

    // Computed and joined with --allow-nonfinite: written, as one process would.
    std::fs::remove_dir_all(parts::part_dir(&out, 1, 2)).unwrap();
    succeeded(&merge_run(
        &recipe,
        &out,
        &["--part", "1/2", "--allow-nonfinite", "-q"],
    ));
    succeeded(&merge_run(
        &recipe,
        &out,
        &["--join", "--allow-nonfinite", "-q"],
    ));
    let single = tmp.path().join("single/merged");
    succeeded(&merge_run(&recipe, &single, &["--allow-nonfinite", "-q"]));
    assert!(
        files(&single) == files(&out),
        "the join is the single merge"
    );
}

#[test]
fn huge_part_counts_are_refused_before_anything_is_allocated() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let recipe = dare(tmp.path(), &m);
    let out = tmp.path().join("merged");
    for part in [
        "1/1000000000",
        "1/1000000000000",
        "1/18446744073709551615",
        "4097/4097",
    ] {
        refused(
            &merge_run(&recipe, &out, &["--part", part]),
            &[&format!("1 ≤ I ≤ N ≤ {MAX_PARTS}")],
        );
    }
    assert!(!parts::parts_dir(&out).exists());
    succeeded(&merge_run(&recipe, &out, &["--part", "1/4096", "-q"]));

    // A directory named as part 1 of 10^12 is named in the join's error.
    let huge = parts::parts_dir(&out).join("part-1-of-1000000000000");
    std::fs::create_dir_all(&huge).unwrap();
    refused(
        &merge_run(&recipe, &out, &["--join"]),
        &["part-1-of-1000000000000", "not a part's name"],
    );
    std::fs::remove_dir(&huge).unwrap();
    refused(
        &merge_run(&recipe, &out, &["--join"]),
        &["the parts do not make one whole", "part-2-of-4096", "more"],
    );
    assert!(!out.exists());
}

#[test]
fn the_library_bounds_the_part_count_too() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let text = std::fs::read_to_string(dare(tmp.path(), &m)).unwrap();
    let recipe = Recipe::parse(&text, "dare.yml").unwrap();
    let method = amalgam_merge::registry::per_tensor("dare_ties").unwrap();
    let job = MergeJob::prepare(recipe, method).unwrap();
    let tensors = job.plan.tensors.len();
    assert_eq!(job.part_assignment(usize::MAX).len(), tensors);
    assert_eq!(
        job.part_assignment(usize::MAX),
        job.part_assignment(tensors)
    );
    let options = ExecOptions {
        seed: 0,
        device: tch::Device::Cpu,
        threads: 1,
        memory_budget: u64::MAX,
        write: Default::default(),
    };
    let out = tmp.path().join("merged");
    for (part, count) in [(1, 1_000_000_000_000), (1, usize::MAX), (0, 2), (3, 2)] {
        let error = job
            .execute_part(&out, part, count, &options, &|_| {})
            .err()
            .unwrap()
            .to_string();
        assert!(
            error.starts_with(&format!("part {part}/{count}: ")),
            "{error}"
        );
    }
    assert!(!parts::parts_dir(&out).exists());
}

/// The manifest names its tensors with the digest of their bytes, and the
/// checksum binds them.
#[test]
fn a_part_manifest_carries_a_digest_of_every_tensor() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    let recipe = dare(tmp.path(), &m);
    let out = tmp.path().join("merged");
    succeeded(&merge_run(
        &recipe,
        &out,
        &["--part", "1/1", "--seed", "3", "-q"],
    ));
    let manifest: PartManifest =
        parts::parse_manifest(&std::fs::read(manifest_path(&out, 1, 1)).unwrap()).unwrap();
    assert_eq!((manifest.part, manifest.count, manifest.seed), (1, 1, 3));
    assert_eq!(manifest.recipe, std::fs::read_to_string(&recipe).unwrap());
    let data = std::fs::read(parts::part_dir(&out, 1, 1).join("model.safetensors")).unwrap();
    // The safetensors layout read by hand: a length, a JSON header, the data.
    let length = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + length]).unwrap();
    let body = &data[8 + length..];
    let names = header.as_object().unwrap().keys();
    assert_eq!(
        manifest.tensors.len(),
        names.filter(|n| *n != "__metadata__").count()
    );
    for tensor in &manifest.tensors {
        let offsets = &header[&tensor.name]["data_offsets"];
        let (start, end) = (offsets[0].as_u64().unwrap(), offsets[1].as_u64().unwrap());
        let bytes = &body[start as usize..end as usize];
        let digest: [u8; 32] = <sha2::Sha256 as sha2::Digest>::digest(bytes).into();
        assert_eq!(tensor.sha256, parts::hex(&digest), "{}", tensor.name);
    }
}

/// Sets the first value of `tensor` in a single-file checkpoint to NaN,
/// in place (F32, F16 or BF16).
fn plant_nan(dir: &Path, tensor: &str) {
    let path = dir.join("model.safetensors");
    let mut data = std::fs::read(&path).unwrap();
    let length = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&data[8..8 + length]).unwrap();
    let start = 8 + length + header[tensor]["data_offsets"][0].as_u64().unwrap() as usize;
    let nan: &[u8] = match header[tensor]["dtype"].as_str().unwrap() {
        "F32" => &[0x00, 0x00, 0xc0, 0x7f],
        "F16" => &[0x00, 0x7e],
        "BF16" => &[0xc0, 0x7f],
        other => panic!("{other}"),
    };
    data[start..start + nan.len()].copy_from_slice(nan);
    std::fs::write(&path, data).unwrap();
}

/// NaN that came from the inputs is accepted at the join without
/// `--allow-nonfinite`, as a single process accepts it.
#[test]
fn nan_from_the_inputs_joins_as_one_process_writes_it() {
    let tmp = tempfile::tempdir().unwrap();
    let m = family(tmp.path());
    plant_nan(&m.join("finetune-1"), "model.norm.weight");
    let recipe = tmp.path().join("linear.yml");
    let text = format!(
        "merge_method: linear\nmodels:\n  - model: {0}/base\n    parameters: {{weight: 1.0}}\n  \
         - model: {0}/finetune-1\n    parameters: {{weight: 1.0}}\n",
        m.display()
    );
    std::fs::write(&recipe, text).unwrap();
    let out = tmp.path().join("merged");
    for part in ["1/2", "2/2"] {
        succeeded(&merge_run(&recipe, &out, &["--part", part, "-q"]));
    }
    let vouched: Vec<String> = (1..=2)
        .flat_map(|p| {
            parts::parse_manifest(&std::fs::read(manifest_path(&out, p, 2)).unwrap())
                .unwrap()
                .accepted_nonfinite
        })
        .collect();
    assert_eq!(vouched, ["model.norm.weight"]);
    succeeded(&merge_run(&recipe, &out, &["--join", "-q"]));
    let single = tmp.path().join("single/merged");
    succeeded(&merge_run(&recipe, &single, &["-q"]));
    assert!(
        files(&single) == files(&out),
        "the join is the single merge"
    );
}
