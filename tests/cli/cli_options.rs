//! The shared flags (defined once, in src/options.rs), the subcommands that
//! replaced mode flags, the old spellings kept hidden, and `amalgam --help`'s
//! groups.

use std::ffi::OsStr;
use std::path::Path;
use std::process::Output;

use crate::common::*;

/// Exit 2 (clap refused the command line), every needle in stderr.
fn usage_error(result: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert_eq!(result.status.code(), Some(2), "{stderr}");
    for needle in needles {
        assert!(stderr.contains(needle), "missing {needle:?} in: {stderr}");
    }
}

fn stdout(result: &Output) -> String {
    succeeded(result);
    String::from_utf8(result.stdout.clone()).unwrap()
}

/// `--memory-budget` is `--max-memory`'s old name: the same plan, the same
/// refusal, whichever is given.
#[test]
fn memory_budget_is_max_memory_by_its_old_name() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let recipe = write_recipe(tmp.path(), "dare.yml", DARE_RECIPE);
    let plan = |flag: &str| dry_run_plan(tmp.path(), &recipe, &[flag, "123MB"]);
    let new = plan("--max-memory");
    assert_eq!(new["memory_budget"], 123_000_000);
    assert_eq!(new, plan("--memory-budget"));
    assert!(!tmp.path().join("out").exists());

    // A cap set either way refuses the same run, naming --max-memory.
    for flag in ["--max-memory", "--memory-budget"] {
        let out = tmp.path().join("family");
        let result = amalgam([
            "synth".as_ref(),
            out.as_os_str(),
            "--shape".as_ref(),
            "tinyllama".as_ref(),
            flag.as_ref(),
            "100MB".as_ref(),
        ]);
        refused_unwritten(&result, &out, &["needs about", "--max-memory 100MB"]);
    }
    // A size that is not one is refused as the command line is read.
    let result = amalgam_in(
        tmp.path(),
        &[
            "merge".as_ref(),
            recipe.as_os_str(),
            "out".as_ref(),
            "--memory-budget".as_ref(),
            "4 parsecs".as_ref(),
        ],
    );
    usage_error(&result, &["--max-memory", "unknown unit"]);
}

/// `--device` is typed: a name that is no device is refused by every command
/// that takes one, before anything is read or written.
#[test]
fn a_bad_device_is_refused_by_every_command_that_takes_one() {
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out");
    let out = out.as_os_str();
    let commands: [&[&OsStr]; 6] = [
        &["merge".as_ref(), "r.yml".as_ref(), out],
        &["stitch".as_ref(), "s.yml".as_ref(), out],
        &[
            "stitch".as_ref(),
            "export".as_ref(),
            "0:1-1:1".as_ref(),
            "f".as_ref(),
            out,
        ],
        &["eval".as_ref(), "model".as_ref()],
        &[
            "tune".as_ref(),
            "t.yml".as_ref(),
            out,
            "--domains".as_ref(),
            "c".as_ref(),
        ],
        &["zoo".as_ref(), "build".as_ref(), "--dir".as_ref(), out],
    ];
    for command in commands {
        for device in ["tpu", "cuda:x", "gpu0"] {
            let args = [command, &["--device".as_ref(), device.as_ref()]].concat();
            usage_error(
                &amalgam_in(tmp.path(), &args),
                &[
                    &format!("invalid value '{device}' for '--device <DEVICE>'"),
                    "use cpu, cuda or cuda:N",
                ],
            );
        }
    }
    assert!(listing(tmp.path()).is_empty());
}

/// Recipes and `--dtype` accept every spelling of a dtype: `bf16` merges as
/// `bfloat16` does, byte for byte.
#[test]
fn dtype_aliases_are_one_dtype() {
    let tmp = tempfile::tempdir().unwrap();
    example_models(tmp.path());
    let body = "merge_method: task_arithmetic\nbase_model: work/example/base\nmodels:\n  \
                - model: work/example/finetune-1\n    parameters: {weight: 0.7}\n";
    let mut digests = vec![];
    for (name, dtypes) in [
        ("named", "dtype: float32\nout_dtype: bfloat16\n"),
        ("short", "dtype: fp32\nout_dtype: bf16\n"),
        ("torch", "dtype: torch.float32\nout_dtype: BF16\n"),
    ] {
        let recipe = write_recipe(
            tmp.path(),
            &format!("{name}.yml"),
            &format!("{body}{dtypes}"),
        );
        merge_in(tmp.path(), &[recipe.as_os_str(), name.as_ref()]);
        let report = inspect_json(&tmp.path().join(name), true);
        assert_eq!(report["dtypes"].as_object().unwrap().len(), 1);
        assert!(report["dtypes"].get("BF16").is_some(), "{name}");
        digests.push(tensor_digests(&report));
    }
    assert!(digests.iter().all(|d| *d == digests[0]));

    // The line of a dtype no spelling names.
    let recipe = write_recipe(tmp.path(), "bad.yml", &format!("{body}out_dtype: bf8\n"));
    let result = amalgam_in(
        tmp.path(),
        &["merge".as_ref(), recipe.as_os_str(), "bad".as_ref()],
    );
    refused_unwritten(
        &result,
        &tmp.path().join("bad"),
        &[
            "bad.yml:6:12: `out_dtype: bf8` is not supported",
            "float32, float16, bfloat16",
        ],
    );

    // The command line too: `convert --dtype bf16` is `--dtype bfloat16`.
    let named = tmp.path().join("named");
    let mut converted = vec![];
    for dtype in ["bfloat16", "bf16"] {
        let out = tmp.path().join(format!("convert-{dtype}"));
        ok([
            "convert".as_ref(),
            named.as_os_str(),
            out.as_os_str(),
            "--dtype".as_ref(),
            dtype.as_ref(),
        ]);
        converted.push(tensor_digests(&inspect_json(&out, true)));
    }
    assert_eq!(converted[0], converted[1]);
    let out = tmp.path().join("int8");
    let result = amalgam([
        "convert".as_ref(),
        named.as_os_str(),
        out.as_os_str(),
        "--dtype".as_ref(),
        "int8".as_ref(),
    ]);
    usage_error(
        &result,
        &["'--dtype <DTYPE>'", "unknown dtype `int8`", "bf16"],
    );
    assert!(!out.exists());
}

/// `amalgam extract table` slices a checkpoint by a table row; the old
/// `extract --model` spelling still does the same.
#[test]
fn extract_table_and_its_old_spelling() {
    let tmp = tempfile::tempdir().unwrap();
    let base = synth_family(tmp.path()).join("base");
    let csv = write_recipe(
        tmp.path(),
        "configs.csv",
        "name,# Layers,# Effective Params (B),MMLU PT accuracy,FFN Hidden Dims,Layers Skipped\n\
         Main model,4,0.0,0%,\"[8 * 20, 8 * 20, 8 * 20, 8 * 20]\",\n\
         small,3,0.0,0%,\"[8 * 10, 8 * 20, 8 * 10]\",\"[2]\"\n",
    );
    let table: [&OsStr; 4] = [
        "--config-csv".as_ref(),
        csv.as_os_str(),
        "--slice".as_ref(),
        "small".as_ref(),
    ];
    let new = tmp.path().join("new");
    let old = tmp.path().join("old");
    let run = |args: &[&OsStr]| amalgam([&["extract".as_ref()], args, &table[..]].concat());
    let dry = [
        run(&[
            "table".as_ref(),
            base.as_os_str(),
            new.as_os_str(),
            "--dry-run".as_ref(),
        ]),
        run(&[
            "--model".as_ref(),
            base.as_os_str(),
            old.as_os_str(),
            "--dry-run".as_ref(),
        ]),
    ]
    .map(|r| stdout(&r));
    assert!(dry[0].starts_with("3 of 4 layers kept (skipped: [2]); FFN widths [80, 160, 80]"));
    assert_eq!(dry[0], dry[1]);
    assert!(!new.exists() && !old.exists());

    succeeded(&run(&["table".as_ref(), base.as_os_str(), new.as_os_str()]));
    succeeded(&run(&[
        "--model".as_ref(),
        base.as_os_str(),
        old.as_os_str(),
    ]));
    assert_eq!(
        tensor_digests(&inspect_json(&new, true)),
        tensor_digests(&inspect_json(&old, true))
    );
    let card = std::fs::read_to_string(new.join("README.md")).unwrap();
    assert!(card.contains("amalgam extract table"), "{card}");

    // The table subcommand needs its table; the recipe form still takes one.
    usage_error(
        &amalgam([
            "extract".as_ref(),
            "table".as_ref(),
            base.as_os_str(),
            new.as_os_str(),
        ]),
        &["--config-csv <FILE>", "--slice <NAME>"],
    );
}

/// `amalgam stitch export` writes one route as a family; the old
/// `stitch --export` spelling writes the same.
#[test]
fn stitch_export_and_its_old_spelling() {
    let tmp = tempfile::tempdir().unwrap();
    let models = synth_family(tmp.path());
    let recipe = write_recipe(
        tmp.path(),
        "stitch.yml",
        &format!(
            "kind: stitch\nanchors: [{}, {}]\ncalibration: {{source: random, samples: 4, \
             seq_len: 16, batch: 2}}\n",
            models.join("base").display(),
            models.join("finetune-1").display()
        ),
    );
    let family = tmp.path().join("family");
    ok(["stitch".as_ref(), recipe.as_os_str(), family.as_os_str()]);
    let new = tmp.path().join("new");
    let old = tmp.path().join("old");
    let route: &OsStr = "1:1-0:1".as_ref();
    ok([
        "stitch".as_ref(),
        "export".as_ref(),
        route,
        family.as_os_str(),
        new.as_os_str(),
    ]);
    ok([
        "stitch".as_ref(),
        "--export".as_ref(),
        route,
        family.as_os_str(),
        old.as_os_str(),
    ]);
    assert_eq!(listing(&new), listing(&old));
    for file in listing(&new) {
        let path = Path::new(&file);
        if path
            .extension()
            .is_some_and(|e| e == "safetensors" || e == "json")
        {
            assert!(
                std::fs::read(new.join(path)).unwrap() == std::fs::read(old.join(path)).unwrap(),
                "{file} differs"
            );
        }
    }
    // Both refuse a route the family does not have, alike.
    for how in ["export", "--export"] {
        let out = tmp.path().join(format!("x{how}"));
        let result = amalgam([
            "stitch".as_ref(),
            how.as_ref(),
            "9:9-9:9".as_ref(),
            family.as_os_str(),
            out.as_os_str(),
        ]);
        refused_unwritten(&result, &out, &["no route \"9:9-9:9\""]);
    }
}

/// `amalgam --help` lists every command under its group, with a line each.
#[test]
fn help_lists_the_commands_by_group() {
    let help = ok(["--help"]);
    let groups: Vec<&str> = help
        .lines()
        .filter(|line| line.ends_with(" commands:"))
        .collect();
    assert_eq!(
        groups,
        [
            "Merge commands:",
            "Elastic commands:",
            "Evaluate commands:",
            "Inspect and convert commands:"
        ]
    );
    for (command, group) in [
        ("merge", "Merge"),
        ("tune", "Merge"),
        ("extract", "Elastic"),
        ("stitch", "Elastic"),
        ("eval", "Evaluate"),
        ("synth", "Inspect and convert"),
    ] {
        let heading = help.find(&format!("{group} commands:")).unwrap();
        let line = help[heading..]
            .lines()
            .skip(1)
            .take_while(|l| !l.is_empty())
            .find(|l| l.split_whitespace().next() == Some(command))
            .unwrap_or_else(|| panic!("{command} not under {group}: {help}"));
        assert!(line.split_whitespace().count() > 2, "{line}");
    }
    assert!(
        help.contains("Usage: amalgam [OPTIONS] <COMMAND>"),
        "{help}"
    );
    // `amalgam help` says the same.
    let result = std::process::Command::new(env!("CARGO_BIN_EXE_amalgam"))
        .arg("help")
        .output()
        .unwrap();
    assert_eq!(stdout(&result), help);
}

/// Experts that are all one model are refused at the recipe's `experts`
/// line, the binary naming the flag that builds them anyway; with it, the
/// mixture is built.
#[test]
fn identical_experts_need_their_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let family = tmp.path().join("m");
    synth(&family, &["--finetunes", "1"]);
    let config = write_recipe(
        tmp.path(),
        "moe.yml",
        &format!(
            "base_model: {0}/base\ngate_mode: random\nexperts:\n  - source_model: {0}/finetune-1\n  \
             - source_model: {0}/finetune-1\n",
            family.display()
        ),
    );
    let out = tmp.path().join("moe");
    let message = fails(["moe".as_ref(), config.as_os_str(), out.as_os_str()]);
    assert!(
        message.contains("moe.yml:3:")
            && message.contains("every expert is the same model")
            && message.contains("(pass --allow-identical-experts"),
        "{message}"
    );
    assert!(!out.exists());
    ok([
        "moe".as_ref(),
        config.as_os_str(),
        out.as_os_str(),
        "--allow-identical-experts".as_ref(),
    ]);
    assert!(out.join("config.json").is_file());
}
