//! Helpers shared by the end-to-end tests: run the binary, ask the Python oracles.
#![allow(dead_code)] // each tier uses its own subset

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

pub fn amalgam<I, S>(args: I) -> Output
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(args)
        .arg("-q")
        .output()
        .expect("the amalgam binary runs")
}

/// Runs amalgam, expects success, returns stdout.
pub fn ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = amalgam(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "amalgam failed: {stderr}");
    String::from_utf8(out.stdout).unwrap()
}

/// Runs amalgam, expects a non-zero exit, returns stderr.
pub fn fails<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = amalgam(args);
    assert!(!out.status.success(), "amalgam should have failed");
    assert_eq!(out.status.code(), Some(1));
    String::from_utf8(out.stderr).unwrap()
}

/// The micro zoo this run's tests share: `amalgam zoo build --size micro
/// [--set SET]` into one directory, so members several sets hold (`base`
/// above all) are trained once per run. Builds are serialised (a set already
/// built is only checked); the directory is emptied at the first use in each
/// run. The `micro` directory and the set's member names.
pub fn micro_zoo(set: Option<&str>) -> (PathBuf, Vec<String>) {
    static ZOO: std::sync::Mutex<bool> = std::sync::Mutex::new(false);
    oracle_tier_only("trains no zoo");
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("micro-zoo");
    // A test that failed while building leaves the lock poisoned; the zoo's own
    // records decide what is reusable, so carry on.
    let mut started = ZOO.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    if !*started {
        if dir.exists() {
            std::fs::remove_dir_all(&dir).unwrap();
        }
        *started = true;
    }
    let mut args: Vec<&std::ffi::OsStr> = ["zoo", "build", "--size", "micro"]
        .map(std::ffi::OsStr::new)
        .to_vec();
    if let Some(set) = set {
        args.extend(["--set", set].map(std::ffi::OsStr::new));
    }
    args.extend(["--dir".as_ref(), dir.as_os_str()]);
    let members = ok(args)
        .lines()
        .map(|l| l.split('\t').next().unwrap().to_owned())
        .collect();
    (dir.join("micro"), members)
}

pub fn synth(out: &Path, extra: &[&str]) {
    let mut args: Vec<&std::ffi::OsStr> = vec!["synth".as_ref(), out.as_os_str()];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    ok(args);
}

pub fn inspect_json(dir: &Path, hashes: bool) -> Value {
    let mut args: Vec<&std::ffi::OsStr> =
        vec!["inspect".as_ref(), dir.as_os_str(), "--json".as_ref()];
    if hashes {
        args.push("--hashes".as_ref());
    }
    serde_json::from_str(&ok(args)).unwrap()
}

/// The project venv's Python (scripts/setup.sh makes it).
pub fn python() -> PathBuf {
    oracle_tier_only("runs no Python");
    let python = Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv/bin/python");
    assert!(
        python.exists(),
        "{} is missing: run scripts/setup.sh first",
        python.display()
    );
    python
}

/// Runs tests/oracles/hf_tensors.py over `dirs`; the JSON it prints, keyed by dir.
pub fn hf_oracle(dirs: &[&Path], meta: bool) -> Value {
    let mut args: Vec<&std::ffi::OsStr> = dirs.iter().map(|d| d.as_os_str()).collect();
    if meta {
        args.push("--meta".as_ref());
    }
    serde_json::from_str(&oracle_ok("hf_tensors.py", &args)).unwrap()
}

/// Runs `python ARGS…` (a script and its arguments, or `-c CODE …`) in one of
/// this test binary's long-lived interpreters (tests/oracles/serve.py), so
/// torch, transformers and mergekit are imported once per interpreter, not
/// once per call. As many interpreters as calls at once; each call as a
/// fresh `python` would run it, its exit status and output returned.
pub fn run_python(args: &[&std::ffi::OsStr]) -> Output {
    use std::io::{BufRead, Write};
    use std::os::unix::process::ExitStatusExt;
    struct Interpreter {
        child: std::process::Child,
        replies: std::io::BufReader<std::process::ChildStdout>,
    }
    static IDLE: std::sync::Mutex<Vec<Interpreter>> = std::sync::Mutex::new(Vec::new());
    let idle = IDLE.lock().unwrap_or_else(|p| p.into_inner()).pop();
    let mut interpreter = idle.unwrap_or_else(|| {
        let mut child = Command::new(python())
            .arg(oracle_path("serve.py"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        let replies = std::io::BufReader::new(child.stdout.take().unwrap());
        Interpreter { child, replies }
    });
    let argv: Vec<&str> = args
        .iter()
        .map(|a| a.to_str().expect("oracle arguments are UTF-8"))
        .collect();
    let mut request = serde_json::to_string(&json!({ "argv": argv })).unwrap();
    request.push('\n');
    let stdin = interpreter.child.stdin.as_mut().unwrap();
    stdin.write_all(request.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let mut reply = String::new();
    interpreter.replies.read_line(&mut reply).unwrap();
    assert!(
        !reply.is_empty(),
        "tests/oracles/serve.py ended while running {argv:?}"
    );
    let reply: Value = serde_json::from_str(&reply).unwrap();
    IDLE.lock()
        .unwrap_or_else(|p| p.into_inner())
        .push(interpreter);
    let text = |key: &str| reply[key].as_str().unwrap().as_bytes().to_vec();
    Output {
        status: std::process::ExitStatus::from_raw((reply["code"].as_i64().unwrap() as i32) << 8),
        stdout: text("stdout"),
        stderr: text("stderr"),
    }
}

/// Names in a directory, sorted.
pub fn listing(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    names
}

/// (name → (dtype, shape, sha256)) from `amalgam inspect --json --hashes`.
pub fn tensor_digests(
    report: &Value,
) -> std::collections::BTreeMap<String, (String, Value, String)> {
    report["tensors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| {
            (
                t["name"].as_str().unwrap().to_owned(),
                (
                    t["dtype"].as_str().unwrap().to_owned(),
                    t["shape"].clone(),
                    t["sha256"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

/// Runs one of tests/oracles/ with the project venv's Python.
pub fn oracle(script: &str, args: &[&std::ffi::OsStr]) -> std::process::Output {
    let path = oracle_path(script);
    let mut all = vec![path.as_os_str()];
    all.extend(args);
    run_python(&all)
}

pub fn oracle_path(script: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/oracles")
        .join(script)
}

/// [`oracle`], which must succeed; its stdout.
pub fn oracle_ok(script: &str, args: &[&std::ffi::OsStr]) -> String {
    let path = oracle_path(script);
    let mut all = vec![path.as_os_str()];
    all.extend(args);
    python_ok(all)
}

/// The venv's Python with `args` (a script and its arguments, or `-c CODE …`),
/// which must succeed; its stdout.
pub fn python_ok<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let args: Vec<S> = args.into_iter().collect();
    let args: Vec<&std::ffi::OsStr> = args.iter().map(AsRef::as_ref).collect();
    let out = run_python(&args);
    assert!(
        out.status.success(),
        "python failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// transformers' `LlamaForCausalLM` on `model` against our `logits` for
/// `ids` (tests/oracles/hf_logits.py): the largest absolute difference, and
/// the oracle's report for messages. `scratch` holds the case file.
pub fn transformers_logit_diff(
    model: &Path,
    ids: &tch::Tensor,
    logits: &tch::Tensor,
    scratch: &Path,
) -> (f64, Value) {
    let case = scratch.join("hf-logits-case.safetensors");
    tch::Tensor::write_safetensors(&[("ids", ids), ("logits", logits)], &case).unwrap();
    let report: Value = serde_json::from_str(&oracle_ok(
        "hf_logits.py",
        &[model.as_os_str(), case.as_os_str()],
    ))
    .unwrap();
    (report["max_logit_diff"].as_f64().unwrap(), report)
}

/// Writes `yaml` to `dir/NAME.yml`, merges it into `dir/NAME` (which must
/// succeed); the recipe's and the output's paths.
pub fn merge_ok(dir: &Path, name: &str, yaml: &str) -> (PathBuf, PathBuf) {
    let recipe = dir.join(format!("{name}.yml"));
    std::fs::write(&recipe, yaml).unwrap();
    let out = dir.join(name);
    ok(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()]);
    (recipe, out)
}

/// Copies the files of `from` (not recursively) into a new directory `to`.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

/// Rewrites the JSON file at `path` by `edit`.
pub fn edit_json(path: &Path, edit: impl FnOnce(&mut Value)) {
    let mut value: Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut value);
    std::fs::write(path, serde_json::to_vec_pretty(&value).unwrap()).unwrap();
}

/// amalgam's `BASE+ADAPTER`, a weight-1 linear merge of it alone, into `dir/NAME`.
pub fn apply_adapter(dir: &Path, name: &str, base: &Path, adapter: &Path) -> PathBuf {
    let recipe = format!(
        "merge_method: linear\nmodels:\n  - model: {}+{}\n    parameters: {{weight: 1.0}}\n",
        base.display(),
        adapter.display()
    );
    merge_ok(dir, name, &recipe).1
}

/// [`apply_adapter`] and peft's `merge_and_unload` (saved as `dir/NAME-peft`)
/// give the same bits; amalgam's output.
pub fn applies_as_peft(dir: &Path, name: &str, base: &Path, adapter: &Path) -> PathBuf {
    let by_peft = dir.join(format!("{name}-peft"));
    oracle_ok(
        "lora_extract.py",
        &[
            "apply".as_ref(),
            base.as_os_str(),
            adapter.as_os_str(),
            by_peft.as_os_str(),
        ],
    );
    let ours = apply_adapter(dir, name, base, adapter);
    let digests = |d: &Path| tensor_digests(&inspect_json(d, true));
    assert_eq!(digests(&ours), digests(&by_peft), "{name}");
    ours
}

/// `python -c CODE PATHS…` with the venv's Python, which must succeed; its stdout.
pub fn python_code(code: &str, paths: &[&Path]) -> String {
    let mut args: Vec<&std::ffi::OsStr> = vec!["-c".as_ref(), code.as_ref()];
    args.extend(paths.iter().map(|p| p.as_os_str()));
    python_ok(args)
}

/// Every case's tensors are mergekit's within `tolerance`, no tensor on one side only.
pub fn assert_matches(results: &Value, cases: &[Value], tolerance: f64) {
    for case in cases {
        let r = &results[case["name"].as_str().unwrap()];
        eprintln!("{}: {r}", case["name"]);
        assert!(
            r.get("error").is_none()
                && r["max_abs"].as_f64().unwrap() <= tolerance
                && r["only_ours"] == json!([])
                && r["only_theirs"] == json!([])
                && r["dtype_mismatch"] == json!({}),
            "{}: {r}",
            case["name"]
        );
    }
}

/// Runs tests/oracles/mergekit_diff.py over `cases`; its report, keyed by case name.
pub fn mergekit_oracle(dir: &Path, cases: &[Value]) -> Value {
    let list = dir.join("cases.json");
    std::fs::write(&list, serde_json::to_vec(cases).unwrap()).unwrap();
    serde_json::from_str(&oracle_ok("mergekit_diff.py", &[list.as_os_str()])).unwrap()
}

/// A tiny random model of `family` that transformers builds (initialised
/// from `seed`), with the published tokenizer `tokenizer` (its vocabulary
/// size `vocab`) beside it, fetched by scripts/setup.sh.
pub fn model_with_tokenizer(
    dir: &Path,
    family: &str,
    tokenizer: &str,
    vocab: usize,
    seed: u64,
) -> PathBuf {
    let model = dir.join(format!("{family}-{tokenizer}-{seed}"));
    let script = "import sys, shutil, torch, transformers\n\
                  torch.manual_seed(int(sys.argv[5]))\n\
                  c = transformers.AutoConfig.for_model(sys.argv[3], vocab_size=int(sys.argv[4]), \
                  hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, \
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256)\n\
                  transformers.AutoModelForCausalLM.from_config(c).save_pretrained(sys.argv[1])\n\
                  for f in ['tokenizer.json', 'tokenizer_config.json']:\n    shutil.copy(sys.argv[2] + '/' + f, sys.argv[1])\n";
    let source = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(".cache/tokenizers")
        .join(tokenizer);
    python_code(
        script,
        &[
            &model,
            &source,
            Path::new(family),
            Path::new(&vocab.to_string()),
            Path::new(&seed.to_string()),
        ],
    );
    model
}

/// `amalgam merge RECIPE OUT EXTRA…` (no -q: warnings are part of what is tested).
pub fn merge_run(recipe: &Path, out: &Path, extra: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .args(["merge".as_ref(), recipe.as_os_str(), out.as_os_str()])
        .args(extra)
        .output()
        .unwrap()
}

/// Writes `text` to `dir/NAME`; its path.
pub fn write_recipe(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// Exit 1 (an error, not a panic or an abort), every needle in stderr; the stderr.
pub fn refused(result: &Output, needles: &[&str]) -> String {
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert_eq!(result.status.code(), Some(1), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
    stderr
}

/// [`refused`], and nothing written at `out`.
pub fn refused_unwritten(result: &Output, out: &Path, needles: &[&str]) {
    refused(result, needles);
    assert!(!out.exists(), "nothing written");
}

/// Success; the stderr (warnings included).
pub fn succeeded(result: &Output) -> String {
    let stderr = String::from_utf8_lossy(&result.stderr).into_owned();
    assert!(result.status.success(), "{stderr}");
    stderr
}

/// A tiny family (base + 2 fine-tunes, single files) under `dir/m`.
pub fn synth_family(dir: &Path) -> PathBuf {
    synth(&dir.join("m"), &["--finetunes", "2"]);
    dir.join("m")
}

/// The example models the recipes in recipes/ refer to, under `dir/work/example`.
pub fn example_models(dir: &Path) {
    synth(
        &dir.join("work/example"),
        &["--finetunes", "2", "--seed", "0"],
    );
}

/// The recipes shipped in recipes/ (top level).
pub fn shipped_recipes() -> Vec<PathBuf> {
    let mut recipes: Vec<PathBuf> =
        std::fs::read_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("recipes"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "yml"))
            .collect();
    recipes.sort();
    recipes
}

/// Runs `amalgam merge ARGS…` in `dir` (recipes use paths relative to the
/// working directory) and expects success.
pub fn merge_in(dir: &Path, args: &[&std::ffi::OsStr]) {
    let mut all: Vec<&std::ffi::OsStr> = vec!["merge".as_ref()];
    all.extend_from_slice(args);
    let result = amalgam_in(dir, &all);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
}

/// `amalgam merge RECIPE out --dry-run --json EXTRA…` run in `dir`: the plan.
pub fn dry_run_plan(dir: &Path, recipe: &Path, extra: &[&str]) -> Value {
    let mut args: Vec<&std::ffi::OsStr> = vec![
        "merge".as_ref(),
        recipe.as_os_str(),
        "out".as_ref(),
        "--dry-run".as_ref(),
        "--json".as_ref(),
    ];
    args.extend(extra.iter().map(std::ffi::OsStr::new));
    let result = amalgam_in(dir, &args);
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    serde_json::from_slice(&result.stdout).unwrap()
}

/// `amalgam ARGS… -q` run in `dir`.
pub fn amalgam_in(dir: &Path, args: &[&std::ffi::OsStr]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .current_dir(dir)
        .args(args)
        .arg("-q")
        .output()
        .unwrap()
}

/// A DARE-TIES recipe over [`example_models`].
pub const DARE_RECIPE: &str = "merge_method: dare_ties
base_model: work/example/base
models:
  - model: work/example/finetune-1
    parameters: {weight: 0.5, density: 0.3}
  - model: work/example/finetune-2
    parameters: {weight: 0.5, density: 0.6}
";

/// Stops a test that would do what only the oracle tier does (`what`).
fn oracle_tier_only(what: &str) {
    if !crate::ORACLE_TIER {
        panic!("the everyday tier {what}: move this test to tests/oracle/");
    }
}
