//! `p2prig fuzz`'s arguments and what the command does with them: a campaign, or `--replay`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context, Result};

use crate::build::cache::Cache;
use crate::build::kernel::{self, KernelChoice};
use crate::build::{image, qemu};
use crate::rig::accel::{self, AccelChoice};
use crate::rig::{RigConfig, RigShape, RunDir};

use super::campaign::{self, Budget, Campaign};
use super::program::Program;

#[derive(Debug, clap::Args)]
pub struct FuzzArgs {
    /// Kernel to fuzz, as for `run --kernel` (one).
    #[arg(long, default_value = "v1-fixed")]
    kernel: KernelChoice,
    /// How long: 90s, 10m, 1h (or seconds).
    #[arg(long, value_parser = parse_duration, conflicts_with = "programs")]
    time: Option<Duration>,
    /// How many programs.
    #[arg(long)]
    programs: Option<u64>,
    /// Seed of generation and mutation, decimal or 0x-hex (default: a fresh one, printed).
    #[arg(long, value_parser = crate::parse_seed)]
    seed: Option<u64>,
    /// The corpus directory, read at the start and grown as the campaign runs (default:
    /// target/p2prig/fuzz-corpus/<kernel>).
    #[arg(long)]
    corpus: Option<PathBuf>,
    /// Keep findings as found: no minimisation, no replays.
    #[arg(long)]
    no_minimise: bool,
    /// Run this program file (a finding's program.txt) instead of a campaign.
    #[arg(long, value_name = "FILE", conflicts_with_all = ["time", "programs"])]
    replay: Option<PathBuf>,
    /// With --replay: how many times.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=100))]
    times: u32,
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// vCPUs (default: 2 under KVM, 1 under TCG: with two, QEMU 10.2.2's TCG aborts now and
    /// then when a vfio-user device's BARs go away, docs/findings/Q1.md).
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..=8))]
    cpus: Option<u32>,
    /// Seconds the guest gets to boot to a ready agent.
    #[arg(long, default_value_t = 300)]
    boot_timeout: u64,
    /// A kernel report matching this regular expression is known noise (as for `run`).
    #[arg(long = "allow-splat", value_name = "REGEX")]
    allow_splat: Vec<String>,
}

fn parse_duration(text: &str) -> std::result::Result<Duration, String> {
    let (number, unit) = match text.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => text.split_at(i),
        None => (text, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration like 90s, 10m or 1h"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        _ => return Err(format!("`{text}`: the unit is s, m or h")),
    };
    Ok(Duration::from_secs(seconds))
}

pub fn run(cache: &Cache, args: FuzzArgs) -> Result<ExitCode> {
    let allowed_splats = crate::rig::console::AllowedSplats::new(&args.allow_splat)?;
    // A bad program file is refused before anything is built or booted.
    let replay = match &args.replay {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading the program {}", path.display()))?;
            let program = Program::parse(&text).map_err(|e| {
                anyhow::anyhow!(
                    "{}: {e} (one operation a line; see harness/src/fuzz/DESIGN.md)",
                    path.display()
                )
            })?;
            let repaired = super::model::repair(&program.ops);
            if repaired != program.ops {
                bail!(
                    "{}: the model does not allow every operation where it stands (the \
                     repaired program would be:\n{})",
                    path.display(),
                    Program { ops: repaired }
                );
            }
            Some(program)
        }
        None => None,
    };
    let budget = match (args.time, args.programs) {
        (Some(t), _) => Budget::Time(t),
        (None, Some(n)) => Budget::Programs(n),
        (None, None) => Budget::Time(Duration::from_secs(600)),
    };
    let qemu = qemu::build(cache)?;
    let image = image::build(cache)?;
    let kernel = kernel::resolve(cache, &args.kernel)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &kernel.bzimage)?;
    let seed = args.seed.unwrap_or_else(crate::fresh_seed);
    let rig = RigConfig {
        boot_timeout: Duration::from_secs(args.boot_timeout),
        shape: RigShape::Switch,
        cpus: args.cpus.or((accel == crate::rig::Accel::Tcg).then_some(1)),
        ..RigConfig::new(qemu.binary, kernel.bzimage.clone(), image.initramfs, accel)?
    };
    let campaign = Campaign {
        kernel: args.kernel.to_string(),
        uapi: kernel.uapi,
        debug: kernel.debug,
        budget,
        seed,
        corpus_dir: args.corpus.clone().unwrap_or_else(|| {
            crate::rig::paths::output_root()
                .join("fuzz-corpus")
                .join(args.kernel.dir_name())
        }),
        minimise: !args.no_minimise,
        allowed_splats,
        rig,
    };
    if let Some(program) = replay {
        let top = RunDir::create("fuzz-replay")?;
        println!(
            "replaying {} operations on {} (run directory {})",
            program.ops.len(),
            campaign.kernel,
            top.path.display()
        );
        let runs = campaign::replay(&campaign, &top, &program, args.times)?;
        let diverged = runs.iter().filter(|r| !r.is_empty()).count();
        println!("{diverged} of {} runs diverged from the model", runs.len());
        return Ok(if diverged == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let top = RunDir::create("fuzz")?;
    println!(
        "fuzz {} under {} for {} (run directory {})",
        campaign.kernel,
        accel.name(),
        match budget {
            Budget::Time(t) => format!("{} s", t.as_secs()),
            Budget::Programs(n) => format!("{n} programs"),
        },
        top.path.display()
    );
    println!(
        "seed {seed:#x} (the same programs again with --seed {seed:#x} and an empty --corpus)"
    );
    let report = campaign::run(&campaign, &top)?;
    std::fs::write(
        top.file("fuzz.json"),
        serde_json::to_string_pretty(&report)?,
    )?;
    println!(
        "{} programs ({:.1}/min), {} operations ({:.2}/s) in {:.0} s, {} boot(s); corpus {}, \
         features {}{}; {} finding(s){}",
        report.programs,
        report.programs_per_min(),
        report.operations,
        report.operations_per_s(),
        report.duration_s,
        report.boots,
        report.corpus,
        report.features,
        if kernel.debug {
            format!(", {} kmemleak checks", report.kmemleak_checks)
        } else {
            String::new()
        },
        report.findings.len(),
        if report.interrupted {
            " (interrupted; the corpus is kept)"
        } else {
            ""
        }
    );
    for f in &report.findings {
        println!(
            "  {} (x{}, first after {:.0} s; {} ops, {}/{} replays) {}",
            f.signature,
            f.occurrences,
            f.first_seen_s,
            f.minimised_ops,
            f.replays_reproduced,
            f.replays,
            f.dir.display()
        );
    }
    println!("results in {}", top.file("fuzz.json").display());
    if report.interrupted {
        crate::rig::process::check_interrupted()?;
    }
    Ok(if report.findings.is_empty() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_take_a_unit_and_bad_ones_say_how() {
        assert_eq!(parse_duration("90"), Ok(Duration::from_secs(90)));
        assert_eq!(parse_duration("10m"), Ok(Duration::from_secs(600)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert!(parse_duration("5d").is_err_and(|e| e.contains("s, m or h")));
        assert!(parse_duration("m").is_err_and(|e| e.contains("like 90s")));
    }
}
