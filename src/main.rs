//! The `amalgam` command line: parses arguments, calls the libraries, reports.
//! One module per subcommand.

mod convert;
mod device;
mod eval;
mod extract;
mod extract_lora;
mod inspect;
mod merge;
mod moe;
mod options;
mod pareto;
mod progress;
mod resources;
mod stitch;
mod synth;
mod tune;
mod zoo;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "amalgam",
    version,
    about = "Model merging and elastic models on Hugging Face checkpoints",
    after_help = "Examples:\n  \
        amalgam synth work/models --shape tiny --finetunes 2\n  \
        amalgam merge recipes/ties.yml work/merged\n  \
        amalgam extract recipes/extract/matformer-m.yml work/matformer-m\n  \
        amalgam stitch recipes/stitch/zoo.yml work/family\n  \
        amalgam inspect work/models/base\n  \
        amalgam convert work/models/base work/base-bf16 --dtype bfloat16 --out-shard-size 1GB\n  \
        amalgam zoo build --size small\n  \
        amalgam eval work/zoo/small/base work/zoo/small/expert-code --json\n  \
        amalgam tune recipes/zoo/ties-tune.yml work/tuned --domains german,c,spanish,perl --trials 30"
)]
struct Cli {
    /// More log output (-v debug, -vv trace).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    /// Only errors.
    #[arg(short, long, global = true, conflicts_with = "verbose")]
    quiet: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    Merge(merge::Args),
    Moe(moe::Args),
    ExtractLora(extract_lora::Args),
    Tune(tune::Args),
    Extract(extract::Args),
    Stitch(stitch::Args),
    /// Per-domain loss, perplexity and accuracy of models on held-out text.
    Eval(eval::Args),
    Pareto(pareto::Args),
    /// Train and cache the model zoo.
    Zoo(zoo::Args),
    Inspect(inspect::Args),
    Convert(convert::Args),
    Synth(synth::Args),
}

/// The commands by group, as `amalgam --help` lists them.
const GROUPS: &[(&str, &[&str])] = &[
    ("Merge", &["merge", "moe", "extract-lora", "tune"]),
    ("Elastic", &["extract", "stitch"]),
    ("Evaluate", &["eval", "pareto", "zoo"]),
    ("Inspect and convert", &["inspect", "convert", "synth"]),
];

/// The command line, `--help` listing the commands by group (each with the
/// first line of its own help) instead of in one list: a template, as clap
/// has headings for options but not for commands.
fn command() -> clap::Command {
    let command = Cli::command();
    let header = *command.get_styles().get_header();
    let literal = *command.get_styles().get_literal();
    let width = GROUPS
        .iter()
        .flat_map(|(_, names)| names.iter().map(|n| n.len()))
        .max()
        .unwrap_or(0);
    let mut listing = String::new();
    for (group, names) in GROUPS {
        listing += &format!(
            "{}{group} commands:{}\n",
            header.render(),
            header.render_reset()
        );
        for name in *names {
            let about = command
                .find_subcommand(name)
                .and_then(|c| c.get_about())
                .map(ToString::to_string)
                .unwrap_or_default();
            listing += &format!(
                "  {}{name:<width$}{}  {about}\n",
                literal.render(),
                literal.render_reset()
            );
        }
        listing.push('\n');
    }
    let options = format!("{}Options:{}", header.render(), header.render_reset());
    command.help_template(format!(
        "{{before-help}}{{about-with-newline}}\n{{usage-heading}} {{usage}}\n\n{listing}\
         {options}\n{{options}}{{after-help}}"
    ))
}

fn main() -> ExitCode {
    // Die quietly on a closed pipe (`amalgam inspect … | head`), like other Unix tools.
    // SAFETY: restoring the default disposition of a signal before any threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
    // Before any thread or tensor: a limit too small to run in is an error, not an abort.
    if let Err(error) = resources::check_address_space() {
        eprintln!("error: {error:#}");
        return ExitCode::FAILURE;
    }
    // Before any thread starts: interrupted runs remove their unfinished outputs.
    amalgam_checkpoint::interrupt::install();
    let cli = Cli::from_arg_matches(&command().get_matches()).unwrap_or_else(|e| e.exit());
    let level = match (cli.quiet, cli.verbose) {
        (true, _) => "error",
        (false, 0) => "info",
        (false, 1) => "debug",
        _ => "trace",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AMALGAM_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level)),
        )
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .init();
    let result = match cli.command {
        Command::Merge(args) => merge::run(args, cli.quiet),
        Command::Moe(args) => moe::run(args, cli.quiet),
        Command::Extract(args) => extract::run(args, cli.quiet),
        Command::ExtractLora(args) => extract_lora::run(args, cli.quiet),
        Command::Stitch(args) => stitch::run(args, cli.quiet),
        Command::Inspect(args) => inspect::run(args),
        Command::Convert(args) => convert::run(args, cli.quiet),
        Command::Synth(args) => synth::run(args, cli.quiet),
        Command::Zoo(args) => zoo::run(args, cli.quiet),
        Command::Eval(args) => eval::run(args, cli.quiet),
        Command::Pareto(args) => pareto::run(args),
        Command::Tune(args) => tune::run(args, cli.quiet),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            match options::flag_hint(&error) {
                Some(hint) => eprintln!("error: {error:#} ({hint})"),
                None => eprintln!("error: {error:#}"),
            }
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_command_is_in_one_group() {
        let mut grouped: Vec<&str> = GROUPS.iter().flat_map(|(_, n)| n.iter().copied()).collect();
        grouped.sort_unstable();
        let cli = Cli::command();
        let mut commands: Vec<&str> = cli.get_subcommands().map(|c| c.get_name()).collect();
        commands.sort_unstable();
        assert_eq!(grouped, commands);
    }

    #[test]
    fn the_command_line_is_well_formed() {
        command().debug_assert();
    }
}
