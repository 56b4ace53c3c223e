//! `amalgam zoo build`: train (or reuse) the model zoo.

use std::path::PathBuf;

use anyhow::{anyhow, Result};
use clap::{Args as ClapArgs, Subcommand};

use amalgam_zoo::{self as zoo, ZooEvent, ZooSet, ZooSize};

#[derive(ClapArgs)]
pub struct Args {
    #[command(subcommand)]
    command: ZooCommand,
}

#[derive(Subcommand)]
enum ZooCommand {
    /// Train every zoo model that is missing or out of date.
    Build {
        /// micro (seconds, for CI) or small (minutes, the book's results).
        #[arg(long, default_value = "small")]
        size: String,
        /// Where the zoo lives; each size gets its own subdirectory.
        #[arg(long, default_value = "work/zoo")]
        dir: PathBuf,
        /// Which members: merging (base, experts, init-b, init-b-code,
        /// anchor-small), matformer (base, matformer, baseline-s/m/l), study
        /// (base, study experts, multitask models, base-short, base-long and
        /// their experts) or stitching (base, anchor-small, both trained
        /// further, deep-narrow, deep-wide).
        #[arg(long, default_value = "merging")]
        set: String,
        #[command(flatten)]
        device: crate::options::DeviceOption,
    },
}

pub fn run(args: Args, quiet: bool) -> Result<()> {
    let ZooCommand::Build {
        size,
        dir,
        set,
        device,
    } = args.command;
    let size = ZooSize::named(&size)
        .ok_or_else(|| anyhow!("unknown zoo size {size:?} (micro or small)"))?;
    let set = ZooSet::named(&set)
        .ok_or_else(|| anyhow!("unknown zoo set {set:?} ({})", ZooSet::NAMES))?;
    let device = device.resolve()?;
    let dir = dir.join(size.name);
    let mut bar = None;
    let built = zoo::build(&dir, &size, set, device, &mut |event| match event {
        ZooEvent::Cached { member } => tracing::info!("{member}: up to date"),
        ZooEvent::Start { member, steps } => {
            bar = Some(crate::progress::steps(steps as u64, member, quiet));
        }
        ZooEvent::Step { step, loss } => {
            if let Some(bar) = &bar {
                bar.set_position(step as u64 + 1);
                if step % 10 == 0 {
                    bar.set_message(format!("loss {loss:.3}"));
                }
            }
        }
        ZooEvent::Done {
            member,
            seconds,
            final_loss,
        } => {
            if let Some(bar) = bar.take() {
                bar.finish_and_clear();
            }
            tracing::info!(
                "{member}: trained in {seconds:.1} s, final training loss {final_loss:.3}"
            );
        }
    })?;
    for (name, path) in built {
        println!("{name}\t{}", path.display());
    }
    Ok(())
}
