//! `p2prig`: builds the rig (QEMU, guest kernels, initramfs), boots it, runs scenarios and
//! reports which dma-buf revoke guarantees hold on which kernel.

mod accel;
mod cache;
mod client;
mod console;
mod image;
mod kernel;
mod paths;
mod process;
mod qemu;
mod recipe;
mod report;
mod rig;
mod smoke;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use clap::{Parser, Subcommand};

use accel::AccelChoice;
use cache::Cache;
use kernel::FlavorSpec;
use report::Suite;
use rig::{Accel, Rig, RigConfig, RunDir};

#[derive(Debug, Parser)]
#[command(
    name = "p2prig",
    version,
    about = "Reproduce PCI peer-to-peer dma-buf revoke bugs under QEMU, without the hardware"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Build (or find in the cache) QEMU, guest kernels and the initramfs.
    Build {
        #[command(subcommand)]
        what: BuildWhat,
    },
    /// Boot the rig on a kernel and run a scenario.
    Run(RunArgs),
    /// List the scenarios.
    List,
}

#[derive(Debug, Subcommand)]
enum BuildWhat {
    /// QEMU 10.2.2 with the vfio-user client (QEMU=/path uses an existing one).
    Qemu,
    /// A guest kernel: FLAVOR[:tiny|debug], e.g. v1 or v1:debug.
    Kernel { spec: FlavorSpec },
    /// The initramfs with the guest agent as /init.
    Image,
    /// QEMU, the initramfs and the given kernels (default: v1).
    All {
        #[arg(long = "kernel", default_value = "v1")]
        kernels: Vec<FlavorSpec>,
    },
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Kernel flavor[:variant] to boot.
    #[arg(long, default_value = "v1")]
    kernel: FlavorSpec,
    /// Scenario to run.
    #[arg(long, default_value = "smoke")]
    scenario: String,
    /// Accelerator: auto probes KVM once and falls back to TCG.
    #[arg(long, value_enum, default_value = "auto")]
    accel: AccelChoice,
    /// Write JUnit XML here (always also written into the run directory).
    #[arg(long)]
    junit: Option<PathBuf>,
    /// Seconds the guest gets to boot to a ready agent.
    #[arg(long, default_value_t = 300)]
    boot_timeout: u64,
    /// Guest memory in MiB.
    #[arg(long, default_value_t = 1024)]
    memory: u32,
}

const SCENARIOS: &[(&str, &str)] = &[(
    "smoke",
    "export BAR0's doorbell page as a dma-buf (size 4096), an unaligned slice is EINVAL, a guest write of 5 to SQ0TDBL lands exactly once in nvme-cmb",
)];

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = process::install_signal_handlers() {
        eprintln!("p2prig: {e:#}");
        return ExitCode::from(2);
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(e) => {
            if process::interrupted() {
                eprintln!("p2prig: interrupted; child processes stopped");
                return ExitCode::from(130);
            }
            eprintln!("p2prig: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    let cache = Cache::from_env()?;
    match cli.command {
        Cmd::Build { what } => {
            let started = Instant::now();
            match what {
                BuildWhat::Qemu => println!("{}", qemu::build(&cache)?.binary.display()),
                BuildWhat::Kernel { spec } => {
                    println!("{}", kernel::build(&cache, &spec)?.bzimage.display())
                }
                BuildWhat::Image => println!("{}", image::build(&cache)?.initramfs.display()),
                BuildWhat::All { kernels } => {
                    println!("qemu    {}", qemu::build(&cache)?.binary.display());
                    for spec in &kernels {
                        println!(
                            "kernel  {spec:<16} {}",
                            kernel::build(&cache, spec)?.bzimage.display()
                        );
                    }
                    println!("image   {}", image::build(&cache)?.initramfs.display());
                }
            }
            eprintln!("build finished in {:.1} s", started.elapsed().as_secs_f64());
            Ok(ExitCode::SUCCESS)
        }
        Cmd::List => {
            println!("scenarios:");
            for (name, what) in SCENARIOS {
                println!("  {name:<12} {what}");
            }
            println!("kernel flavors (each FLAVOR:tiny or FLAVOR:debug):");
            for name in kernel::flavor_names()? {
                match kernel::load_flavor(&name) {
                    Ok(flavor) => println!("  {name:<12} {}", flavor.description),
                    Err(e) => println!("  {name:<12} (unreadable: {e:#})"),
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Run(args) => run(&cache, args),
    }
}

fn run(cache: &Cache, args: RunArgs) -> Result<ExitCode> {
    if !SCENARIOS.iter().any(|(name, _)| *name == args.scenario) {
        let known: Vec<&str> = SCENARIOS.iter().map(|(n, _)| *n).collect();
        bail!(
            "unknown scenario `{}`; known: {}",
            args.scenario,
            known.join(", ")
        );
    }
    let qemu = qemu::build(cache)?;
    let kernel = kernel::build(cache, &args.kernel)?;
    let image = image::build(cache)?;
    let accel = accel::resolve(args.accel, cache, &qemu.binary, &kernel.bzimage)?;
    let cfg = RigConfig {
        qemu: qemu.binary,
        bzimage: kernel.bzimage.clone(),
        initramfs: Some(image.initramfs),
        nvme_cmb: paths::workspace_binary("nvme-cmb")?,
        accel,
        memory_mib: args.memory,
        boot_timeout: Duration::from_secs(args.boot_timeout),
        extra_cmdline: String::new(),
    };
    let run_dir = RunDir::create(&args.scenario)?;
    println!("run directory: {}", run_dir.path.display());
    println!("booting {} under {} ...", args.kernel, accel.name());
    let mut suite = Suite::new(&format!("{} {}", args.scenario, args.kernel));
    let boot_started = Instant::now();
    let outcome = Rig::boot(&cfg, &run_dir).and_then(|mut rig| {
        suite.record(
            "boot-to-agent-ready",
            true,
            format!(
                "{:.1} s under {}",
                rig.boot_time.as_secs_f64(),
                accel_label(accel)
            ),
            rig.boot_time,
        );
        let result = smoke::run(&mut rig, kernel.uapi, &mut suite);
        let console_text = std::fs::read_to_string(rig.console_path()).unwrap_or_default();
        if let Some(excerpt) = console::report_excerpt(&console_text) {
            suite.record("guest-console-clean", false, excerpt, Duration::ZERO);
        } else {
            suite.record("guest-console-clean", true, "", Duration::ZERO);
        }
        rig.shutdown()?;
        result
    });
    if let Err(e) = &outcome {
        // Ctrl-C also reaches QEMU through the terminal, so whatever failed after it is a
        // consequence of the interruption, not a finding.
        process::check_interrupted()?;
        suite.record(
            "scenario-completed",
            false,
            format!("{e:#}"),
            boot_started.elapsed(),
        );
    }
    suite.write_junit(&run_dir.file("junit.xml"))?;
    if let Some(path) = &args.junit {
        suite.write_junit(path)?;
    }
    let failures = suite.failures();
    println!(
        "{}: {} checks, {} failed; artifacts in {}",
        suite.name,
        suite.checks.len(),
        failures,
        run_dir.path.display()
    );
    Ok(if failures == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn accel_label(accel: Accel) -> &'static str {
    accel.name()
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;
    use clap::CommandFactory;

    #[test]
    fn cli_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn run_defaults_to_v1_smoke_auto() -> Result<()> {
        let cli = Cli::try_parse_from(["p2prig", "run"]).context("parses")?;
        let Cmd::Run(args) = cli.command else {
            bail!("not run")
        };
        assert_eq!(args.kernel.to_string(), "v1:tiny");
        assert_eq!(args.scenario, "smoke");
        assert_eq!(args.accel, AccelChoice::Auto);
        Ok(())
    }
}
